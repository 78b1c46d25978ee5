"""LLaDA-8B-Instruct as published, on a tiny checkpoint of the same format: tokenizer files, chat template, sharded
weights, EOS/eot stopping; through a real `sparse-lavida serve` and the openai client, against LLaDA's generate()."""

import json
import sys
from pathlib import Path

import pytest
import torch

from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model
from tests.serving_helpers import BOS, EOS, EOT, INSTRUCT_CHARS, MASK, TINY, Server, llada_instruct_checkpoint

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SH, EH = 244, 245  # <|start_header_id|>, <|end_header_id|>
# (message, the stop token its answer ends with): the tiny model's answers end at both kinds (asserted below)
CHATS = [("What is 2+2?", EOT), ("hi", EOS)]
KNOBS = dict(gen_length=32, block_length=8, steps=32)  # LLaDA's generate(): 4 blocks, one token per step


def chat_prompt(message: str) -> str:
    """LLaDA's Instruct prompt for one user turn, written out by hand (not through any template)."""
    return (f"<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def chat_prompt_ids(message: str) -> list[int]:
    """The same prompt's ids from the helper's id table (one id per character), again not through the tokenizer."""
    def chars(text: str) -> list[int]:
        return [INSTRUCT_CHARS.index(c) for c in text]
    return ([BOS, SH] + chars("user") + [EH] + chars("\n\n" + message) + [EOT, SH] + chars("assistant") + [EH]
            + chars("\n\n"))


def llada_generate_tokens(folder: Path, prompt_ids: list[int]) -> list[int]:
    """The answer of LLaDA's published generate() (re-implemented in benchmarks/peers.py), temperature 0."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from peers import llada_generate
    finally:
        sys.path.remove(str(BENCHMARKS))
    out, _ = llada_generate(load_pretrained(folder), torch.tensor(prompt_ids), KNOBS["gen_length"],
                            KNOBS["block_length"], KNOBS["steps"], temperature=0.0, seed=0)
    return out.tolist()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return llada_instruct_checkpoint(tmp_path_factory.mktemp("llada-instruct"))


def test_the_tiny_instruct_checkpoint_has_the_published_layout(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    config = MDMConfig.load(folder)
    # special tokens by name, and config.json / generation_config.json agree with the tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>",
                                                                 "<|start_header_id|>", "<|end_header_id|>",
                                                                 "<|eot_id|>")}
    assert list(ids.values()) == [BOS, EOS, MASK, SH, EH, EOT]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    assert (config.mask_token_id, config.eos_token_id, config.register_token_id) == (MASK, EOS, None)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [EOS, EOT]
    # the published chat template, inline in tokenizer_config.json, renders LLaDA's prompt
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "  What is 2+2? "}]  # the template trims the content
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == chat_prompt("What is 2+2?")
    assert tok(rendered, add_special_tokens=False)["input_ids"] == chat_prompt_ids("What is 2+2?")
    assert tok(rendered)["input_ids"] == chat_prompt_ids("What is 2+2?")  # add_bos_token false: one BOS
    # decoding as LLaDA's chat.py does drops eot, EOS padding and the other special tokens
    assert tok.decode([INSTRUCT_CHARS.index("4"), EOT, EOS, EOS], skip_special_tokens=True) == "4"
    # sharded weights with an index, as published, and our loader reads them
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    written = random_model(TINY, seed=0, std=0.3).state_dict()
    written["model.transformer.ff_out.weight"][[EOT, EOS]] *= 1.5  # the helper's stop_boost
    loaded = load_pretrained(folder).state_dict()
    assert set(index["weight_map"]) == set(loaded) == set(written)
    assert all(torch.equal(loaded[name], written[name]) for name in written)


@pytest.mark.slow
def test_chat_through_the_server_is_llada_generate_up_to_its_stop_token(folder, tmp_path):
    from openai import OpenAI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    srv = Server(folder, log_dir=tmp_path)
    try:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        for message, stop_id in CHATS:
            r = client.chat.completions.create(
                model=str(folder), messages=[{"role": "user", "content": message}], max_tokens=KNOBS["gen_length"],
                temperature=0, extra_body={"vllm_xargs": {k: KNOBS[k] for k in ("block_length", "steps")},
                                           "return_token_ids": True, "return_prompt_text": True})
            # (a) the prompt the server built: the published template, as transformers renders it and by hand
            templated = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                                tokenize=False)
            assert r.model_extra["prompt_text"] == templated == chat_prompt(message)
            prompt_ids = r.model_extra["prompt_token_ids"]
            assert prompt_ids == chat_prompt_ids(message)
            # (b) the dense answer is LLaDA's generate() on the same ids, cut after its first eot/EOS
            reference = llada_generate_tokens(folder, prompt_ids)
            stop = next(i for i, t in enumerate(reference) if t in (EOS, EOT))
            assert reference[stop] == stop_id and stop < KNOBS["gen_length"] - KNOBS["block_length"], reference
            choice = r.choices[0]
            assert choice.token_ids == reference[:stop + 1]  # the blocks after the stop are not sent
            assert choice.finish_reason == "stop" and r.usage.completion_tokens == stop + 1
            # eot stops as a generation_config.json eos id (vLLM's stop_token_ids, named as the stop_reason)
            assert choice.model_extra["stop_reason"] == (None if stop_id == EOS else EOT)
            assert r.model_extra["kv_transfer_params"]["sparse_lavida_metrics"]["mode"] == "dense"
            # (c) the text is the answer's, with no eot/EOS (nor other special tokens) in it
            text = choice.message.content
            assert text and text == tok.decode(reference[:stop], skip_special_tokens=True)
            assert "<|eot_id|>" not in text and "<|endoftext|>" not in text and "<|" not in text
    finally:
        srv.stop()
