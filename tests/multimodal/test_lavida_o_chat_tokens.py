"""LaViDa-O chat images tokenized as the publishers tokenize them, checked against an independent reading of their code
written here (adobe-research/LaVida-O: llava/conversation.py `conv_templates["llada"]` rendered by the tokenizer's chat
template, llava/mm_utils.py `tokenizer_image_token`), with LLaDA-8B-Instruct's tokenizer files (BOS written by the
chat template, none added by the tokenizer), offline and through vLLM's renderer and multimodal processor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from transformers import AutoTokenizer  # noqa: E402

from sparse_lavida_vllm.model_executor.lavida_o_vision import num_image_rows  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import write_tiny_checkpoint  # noqa: E402
from sparse_lavida_vllm.multimodal.lavida_o_layout import chat_image_ids  # noqa: E402
from tests.entrypoints.test_lavida_o_serving import sparse_lavida_config  # noqa: E402
from tests.serving_helpers import BOS, EOS, MASK, VLLM_ENV, save_llada_instruct_tokenizer  # noqa: E402

THEIR_IMAGE = -200  # llava/constants.py IMAGE_TOKEN_INDEX
THEIR_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                "the user provides, and assist the user with a variety of tasks using natural language.")
NEWLINE = 95  # "\n" in the tiny LLaDA-Instruct vocabulary (serving_helpers.INSTRUCT_CHARS)
SIZES = [(30, 30), (50, 23), (23, 50)]  # the images of the engine test, one per image part


def their_chat_ids(tok, user: str, system: str = THEIR_SYSTEM) -> list[int]:
    """What their code feeds the model for a chat turn: conv_templates["llada"] (SeparatorStyle.LLAMA_3: their
    system turn, the user message, the tokenizer's chat template with the generation prompt), then
    tokenizer_image_token: `tokenizer(chunk).input_ids` for each chunk of the text split at "<image>"; when the first
    chunk starts with BOS, it is kept whole and every later chunk loses its first token; -200 between chunks."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chunks = [tok(c).input_ids for c in text.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == tok.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    separated = []
    for chunk in chunks:
        separated += [chunk, [THEIR_IMAGE] * (offset + 1)]
    for piece in separated[:-1]:
        ids += piece[offset:]
    return ids


def vllm_user_text(images: int, question: str) -> str:
    """How vLLM's chat parser writes a user message of `images` image parts then a text part ("string" content
    format): each part on its own line, the model's placeholder for an image."""
    return "\n".join(["<image>"] * images + [question])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("published-chat") / "lavida-o"
    config = sparse_lavida_config(mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, image_token_id=BOS + 5,
                                  edit_image_token_id=BOS + 6, register_token_id=None, num_register_tokens=(),
                                  num_register_groups=(), register_code=None, block_causal=False)
    write_tiny_checkpoint(root, config, seed=0, std=0.3)
    save_llada_instruct_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def tok(folder):
    return AutoTokenizer.from_pretrained(str(folder))


def _rendered(tok, user: str) -> str:
    return tok.apply_chat_template([{"role": "system", "content": THEIR_SYSTEM}, {"role": "user", "content": user}],
                                   tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("user", [
    vllm_user_text(0, "What is this?"),
    vllm_user_text(1, "What is this?"),
    vllm_user_text(2, "Which is larger?"),
    vllm_user_text(3, "Count them."),
    "<image>\n Are there any person in the image?.",  # their Demo.ipynb's understanding question
    "Compare <image> with <image>\n\nplease",  # images inside the text, a double newline after one
])
def test_chat_prompt_ids_are_theirs(tok, user):
    assert chat_image_ids(tok, _rendered(tok, user), [THEIR_IMAGE]) == their_chat_ids(tok, user)


def test_the_newline_after_each_image_is_what_their_tokenization_drops(tok):
    """Before: vLLM tokenized the rendered chat whole, keeping the "\\n" after each `<image>`; theirs drops it (the
    rendering starts with BOS, the LLaDA tokenizer adds none to each chunk, so offset 1 cuts a real token)."""
    text = _rendered(tok, vllm_user_text(2, "Hi"))
    whole = tok.encode(text, add_special_tokens=False)
    ours = chat_image_ids(tok, text, tok.encode("<image>", add_special_tokens=False))
    assert tok.encode("\n", add_special_tokens=False) == [NEWLINE]
    assert whole[0] == ours[0] == BOS and tok(text).input_ids == whole  # BOS written by the template, none added
    image = tok.encode("<image>", add_special_tokens=False)
    assert tok.decode(whole).count("<image>\n") == 2
    assert len(whole) - len(ours) == 2 and tok.decode(ours).count("<image>\n") == 0
    assert tok.decode(ours).endswith("<image><image>Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    before = [i for i in range(len(whole)) if whole[i:i + len(image)] == image]
    assert len(before) == 2 and all(whole[i + len(image)] == NEWLINE for i in before)
    at = [i for i in range(len(ours)) if ours[i:i + len(image)] == image]
    assert len(at) == 2 and all(ours[i + len(image)] != NEWLINE for i in at)


SCRIPT = """
import base64, io, json, sys
import numpy as np
from PIL import Image
from vllm import LLM, SamplingParams
folder, system, sizes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def url(w, h, seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

def chat(n, question):
    parts = [{"type": "image_url", "image_url": {"url": url(w, h, i)}} for i, (w, h) in enumerate(sizes[:n])]
    user = {"role": "user", "content": [*parts, {"type": "text", "text": question}]}
    return [{"role": "system", "content": system}, user]

llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
params = SamplingParams(max_tokens=8, temperature=0, extra_args={"block_length": 8, "steps": 8})
outs = llm.chat([chat(0, "What is this?"), chat(1, "What is this?"), chat(2, "Which is larger?")], params)
result = {"chat": [list(o.prompt_token_ids) for o in outs]}
# a prompt given as token ids (an edit's are already theirs) is fed as given, never re-tokenized
ids = json.loads(sys.argv[4])
out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": Image.new("RGB", (30, 30))}}], params)
result["ids"] = list(out[0].prompt_token_ids)
print("RESULT " + json.dumps(result), flush=True)
"""


@pytest.mark.slow
def test_vllm_chat_feeds_their_ids_for_any_number_of_images(folder, tok):
    """LLM.chat through vLLM's renderer and LaViDa-O's multimodal processor: 0, 1 and 2 image parts give their ids
    with each -200 replaced by the image's rows (num_image_rows pad ids); a token-id prompt keeps its ids."""
    from sparse_lavida_vllm.model_executor.lavida_o_config import load_config

    config = load_config(folder)
    image = tok.encode("<image>", add_special_tokens=False)
    given = tok.encode(_rendered(tok, "<image>\nkeep"), add_special_tokens=False)  # with the "\n": given, kept
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), THEIR_SYSTEM, json.dumps(SIZES),
                          json.dumps(given)], env={**os.environ, **VLLM_ENV}, capture_output=True, text=True,
                         timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    rows = [num_image_rows(config.understanding, size) for size in SIZES]
    for n, (question, got) in enumerate(zip(["What is this?", "What is this?", "Which is larger?"], result["chat"])):
        theirs = their_chat_ids(tok, vllm_user_text(n, question))
        expanded, k = [], 0
        for t in theirs:
            if t == THEIR_IMAGE:
                expanded += [config.pad_token_id] * rows[k]
                k += 1
            else:
                expanded.append(t)
        assert k == n and got == expanded, n
    at = given.index(image[0])
    assert result["ids"] == given[:at] + [config.pad_token_id] * rows[0] + given[at + len(image):]
