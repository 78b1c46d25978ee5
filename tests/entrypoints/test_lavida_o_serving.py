"""LaViDa-O / Sparse-LaViDa (`llava_llada`) served through vLLM: a tiny checkpoint in the published layout (sharded,
dual tower with per-modality layers, generation branch, SigLIP understanding, vqvae/).

The text-path mapping is proved in PyTorch first: LaViDaOMDM's text-only logits and reference-sampler tokens equal
LLaDAMDM's over the checkpoint's `model.transformer.*` tensors (lavida_o_text.load_text_tower, the loader vLLM runs).
Then the engine (offline, a real `sparse-lavida serve`, TP=2) gives the reference tokens for text, images, edits and
chat images; TP=2 serves the whole model (both streams sharded), and the text path without vqvae/.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # write_tiny_checkpoint writes the vqvae/ a published checkpoint ships

from safetensors.torch import load_file, save_file  # noqa: E402

from sparse_lavida_vllm.diffusion.planners import text_plan  # noqa: E402
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig  # noqa: E402
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse  # noqa: E402
from sparse_lavida_vllm.model_executor.attention import SpanAttention  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_config import (  # noqa: E402
    LaViDaOConfig,
    UnderstandingConfig,
    VisionTowerConfig,
)
from sparse_lavida_vllm.model_executor.lavida_o_text import load_text_tower  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import load_lavida_o, write_tiny_checkpoint  # noqa: E402
from tests.serving_helpers import TINY, VLLM_ENV, Server, reference_tokens, save_char_tokenizer  # noqa: E402

ARCH = "LlavaLladaForMaskedDiffusion"
PROMPT = [40, 72, 69, 76, 76, 79, 12]
KNOBS = {"block_length": 8, "steps": 8}
GEN = 16


def sparse_lavida_config(**kw) -> LaViDaOConfig:
    """Sparse-LaViDa scaled down: text ids as the helpers' char tokenizer (mask 254, register 255), head_dim 32 (a
    vLLM CPU size), 3 layers of which 1-2 attend per modality, 4 text registers, step-causal training."""
    understanding = UnderstandingConfig(
        mm_vision_tower="google/siglip-so400m-patch14-384", mm_hidden_size=24,
        image_grid_pinpoints=((30, 60), (60, 30), (60, 60)), mm_resampler_type="spatial_pool",
        mm_spatial_pool_mode="conv", mm_spatial_pool_stride=2,
        vision=VisionTowerConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=30, patch_size=4))
    base = dict(vocab_size=256, d_model=64, n_layers=3, n_heads=2, n_kv_heads=2, mlp_hidden_size=128,
                rope_theta=500000.0, max_sequence_length=512, mask_token_id=TINY.mask_token_id, eos_token_id=2,
                pad_token_id=0, d_model_gen=32, mlp_hidden_size_gen=48, dual_tower=True, dual_tower_layers=0,
                downsample=True, num_vq_embeddings=16, image_token_id=200, edit_image_token_id=201,
                num_register_tokens=(4, 3), num_register_groups=(25, 25), block_causal=True,
                register_token_id=TINY.register_token_id, register_code=18, understanding=understanding)
    base.update(kw)
    return LaViDaOConfig(**base)


def plain_lavida_config() -> LaViDaOConfig:
    """LaViDa-O as published: no registers, no step-causal training."""
    return sparse_lavida_config(block_causal=False, num_register_tokens=(), num_register_groups=(),
                                register_token_id=None, register_code=None)


def lavida_checkpoint(folder: Path, config: LaViDaOConfig) -> Path:
    write_tiny_checkpoint(folder, config, seed=0, max_shard_tensors=12, std=0.3)  # sharded, with an index
    save_char_tokenizer(folder, TINY)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lavida-o")
    return {"sparse": lavida_checkpoint(root / "sparse-lavida", sparse_lavida_config()),
            "plain": lavida_checkpoint(root / "lavida-o", plain_lavida_config())}


# ---- the mapping, in PyTorch ----------------------------------------------------------------------------------

def test_config_maps_to_the_text_tower_with_the_checkpoints_defaults(checkpoints):
    from sparse_lavida_vllm.worker.vllm_model import LlavaLladaHFConfig
    from tests.model_executor.test_lavida_o_config import published_like_config

    raw = json.loads((checkpoints["sparse"] / "config.json").read_text())
    hf = LlavaLladaHFConfig(**raw)
    mdm = hf.to_mdm_config()
    assert (mdm.d_model, mdm.n_layers, mdm.vocab_size, mdm.mask_token_id) == (64, 3, 256, TINY.mask_token_id)
    # Sparse-LaViDa: sparse by default with its text register count (the first of "4,3")
    assert (mdm.block_causal, mdm.register_token_id, mdm.num_registers) == (True, TINY.register_token_id, 4)
    assert (hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers, hf.num_key_value_heads) == (64, 2, 3, 2)
    assert LlavaLladaHFConfig(**hf.to_dict()).to_mdm_config() == mdm  # vLLM re-creates configs from dicts
    plain = LlavaLladaHFConfig(**json.loads((checkpoints["plain"] / "config.json").read_text())).to_mdm_config()
    assert (plain.block_causal, plain.register_token_id, plain.num_registers) == (False, None, 0)  # like LLaDA
    # the published config.json: registers are declared but no register_token_id names their row -> none served
    published = LlavaLladaHFConfig(**published_like_config()).to_mdm_config()
    assert (published.d_model, published.n_layers, published.vocab_size) == (4096, 32, 126464)
    assert (published.block_causal, published.num_registers) == (True, 0)
    ours = LlavaLladaHFConfig(**{**published_like_config(), "register_token_id": 126350}).to_mdm_config()
    assert ours.num_registers == 64
    with pytest.raises(ValueError, match="weight_tying"):  # what the text tower would compute wrong: refused
        LlavaLladaHFConfig(**{**published_like_config(), "weight_tying": True})
    # image-path-only branches lavida_o_model.py does not model do not stop the text path
    assert LlavaLladaHFConfig(**{**published_like_config(), "gen_mlp_type": "unitok"}).to_mdm_config() == published


def test_text_rows_of_lavida_o_are_the_llada_tower(checkpoints):
    folder = checkpoints["sparse"]
    lavida, llada = load_lavida_o(folder), load_text_tower(folder)
    full = lavida.state_dict()
    assert set(llada.state_dict()) == {n for n in full if n.startswith("model.transformer.") and "_vision" not in n}
    assert all(torch.equal(t, full[n]) for n, t in llada.state_dict().items())
    assert lavida.config.first_split_layer == 1 < lavida.config.n_layers  # per-modality layers are in the pass
    ids = torch.randint(3, 250, (12,), generator=torch.Generator().manual_seed(0))
    ids[6:] = TINY.mask_token_id
    positions = torch.arange(12)
    with torch.no_grad():
        assert torch.allclose(lavida(ids, positions), llada(ids, positions), atol=1e-5)
        # step-causal spans: prompt rows see the prompt, masked rows everything
        spans = torch.tensor([[[0, 6], [0, 0]]] * 6 + [[[0, 12], [0, 0]]] * 6)
        assert torch.allclose(lavida(ids, positions, SpanAttention(spans)), llada(ids, positions, SpanAttention(spans)),
                              atol=1e-5)
    prompt = torch.tensor(PROMPT)
    for name, sampling in (("greedy", SamplingConfig()), ("sampled", SamplingConfig(temperature=0.9, seed=5))):
        plan = text_plan(GEN, 8, 8)
        assert torch.equal(generate_dense(lavida, prompt, plan, sampling).tokens,
                           generate_dense(llada, prompt, plan, sampling).tokens), name
        assert torch.equal(generate_sparse(lavida, prompt, plan, sampling, SparseOptions(num_registers=4)).tokens,
                           generate_sparse(llada, prompt, plan, sampling, SparseOptions(num_registers=4)).tokens), name


def test_chat_media_parts_are_found_and_refused_naming_the_architecture():
    from sparse_lavida_vllm.entrypoints.plugin import _media_part, image_part_error, media_refusal

    url = {"url": "data:image/png;base64,AAAA"}
    assert _media_part([{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text"}]}]) is None
    assert _media_part([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                     {"type": "image_url", "image_url": url}]}]) == "image_url"
    assert _media_part([{"role": "user", "content": [{"image_url": url}]}]) == "image_url"  # a part by its key
    assert ARCH in media_refusal(ARCH, "no vqvae/") and "no vqvae/" in media_refusal(ARCH, "no vqvae/")
    assert media_refusal("LLaDAModelLM").startswith("LLaDAModelLM serves text only")

    def error(part: dict) -> tuple[str, str] | None:
        return image_part_error([{"role": "user", "content": "hi"},
                                 {"role": "user", "content": [{"type": "text", "text": "x"}, part]}])

    good = f"data:image/png;base64,{base64.b64encode(_png()).decode()}"
    assert error({"type": "image_url", "image_url": {"url": good}}) is None
    assert error({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}) is None  # vLLM fetches
    field = "messages[1].content[1].image_url.url"
    got = error({"type": "image_url", "image_url": url})  # base64 of 3 zero bytes: not an image
    assert got[0] == field and got[1].startswith(f"{field}: not a decodable base64 image")
    assert "not a decodable" in error({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}})[1]
    assert "scheme 'ftp'" in error({"type": "image_url", "image_url": {"url": "ftp://host/a.png"}})[1]
    assert "scheme 'file'" in error({"image_url": {"url": "file:///etc/passwd"}})[1]
    assert "data:image/<format>;base64" in error({"type": "image_url", "image_url": {"url": "data:text/plain,hi"}})[1]
    assert error({"type": "input_audio", "input_audio": {}}) == (
        "messages[1].content[1]", "messages[1].content[1]: input_audio parts are not supported (this model takes "
        "image_url parts)")


def _rewrite(folder: Path, name: str, tensor: torch.Tensor | None) -> None:
    """Put `tensor` under `name` in the sharded checkpoint (None: delete it), keeping the index consistent."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].get(name) or sorted(set(index["weight_map"].values()))[0]
    state = load_file(str(folder / shard))
    if tensor is None:
        del state[name], index["weight_map"][name]
    else:
        state[name] = tensor
        index["weight_map"][name] = shard
    save_file(state, str(folder / shard))
    index_path.write_text(json.dumps(index))


def test_a_bad_text_tower_tensor_is_one_error_naming_it(tmp_path):
    cases = [
        ("model.transformer.blocks.1.ff_out.weight", None, r"missing weights: \['model.transformer.blocks.1.ff_out"),
        ("model.transformer.blocks.0.ff_proj.weight", torch.zeros(3, 3),
         r"'model.transformer.blocks.0.ff_proj.weight': checkpoint shard \(3, 3\) does not fit .*\(128, 64\)"),
        ("model.transformer.ln_f.weight", torch.zeros(3), r"'model.transformer.ln_f.weight'.*\(3,\)"),
        ("model.transformer.blocks.2.q_proj_vision.weight", torch.zeros(3, 3),
         r"model.transformer.blocks.2.q_proj_vision.weight has shape \(3, 3\), config.json implies \(64, 32\)"),
        ("model.transformer.blocks.7.q_proj_vision.weight", torch.zeros(64, 32),
         "blocks.7.q_proj_vision.weight is not a parameter"),
        ("lm_head.weight", torch.zeros(256, 64), "lm_head.weight is not a parameter of " + ARCH),
    ]
    for name, tensor, message in cases:
        folder = tmp_path / name.replace(".", "_")
        write_tiny_checkpoint(folder, sparse_lavida_config(understanding=None), seed=1, max_shard_tensors=12)
        _rewrite(folder, name, tensor)
        with pytest.raises(ValueError, match=message):
            load_text_tower(folder)


# ---- through vLLM ------------------------------------------------------------------------------------------------

SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
folder, prompt, knobs, gen = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
cases = {"default": {}, "dense": {"sparse": False}, "sparse": {"sparse": True}}
outs = llm.generate([{"prompt_token_ids": prompt}] * len(cases), [
    SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True, extra_args={**knobs, **c}) for c in cases.values()])
result = {name: {"tokens": list(o.outputs[0].token_ids), "metrics": o.kv_transfer_params["sparse_lavida_metrics"]}
          for name, o in zip(cases, outs)}
try:  # registers without a register token: refused when the request is added
    llm.generate([{"prompt_token_ids": prompt}], [SamplingParams(max_tokens=gen, extra_args={
        **knobs, "sparse": True, "num_registers": 4})])
    result["registers"] = "ran"
except Exception as e:
    result["registers"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(result), flush=True)
"""


def _offline(folder: Path) -> tuple[dict, str]:
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), json.dumps(PROMPT), json.dumps(KNOBS), str(GEN)],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), run.stdout + run.stderr


@pytest.fixture(scope="module")
def offline_sparse(checkpoints) -> dict:
    return _offline(checkpoints["sparse"])[0]


def _reference(model: torch.nn.Module, num_registers: int, sparse: bool) -> list[int]:
    return reference_tokens(model, PROMPT, GEN, KNOBS["block_length"], KNOBS["steps"], num_registers, sparse=sparse)


@pytest.mark.slow
def test_offline_engine_serves_sparse_lavida_text_sparse_by_default(checkpoints, offline_sparse):
    out = offline_sparse
    lavida = load_lavida_o(checkpoints["sparse"])  # the pure-PyTorch model of the whole architecture
    assert out["default"]["metrics"]["mode"] == "sparse" and out["default"]["metrics"]["num_registers"] == 4
    assert "warning" not in out["default"]["metrics"]
    assert out["default"]["tokens"] == out["sparse"]["tokens"] == _reference(lavida, 4, sparse=True)
    assert out["dense"]["metrics"]["mode"] == "dense"
    assert out["dense"]["tokens"] == _reference(lavida, 0, sparse=False)
    assert out["registers"] == "ran"  # this checkpoint has a register token


@pytest.mark.slow
def test_offline_engine_serves_plain_lavida_o_dense_by_default_and_warns_on_sparse(checkpoints):
    out, log = _offline(checkpoints["plain"])
    lavida = load_lavida_o(checkpoints["plain"])
    assert out["default"]["metrics"]["mode"] == "dense" and "warning" not in out["default"]["metrics"]
    assert out["default"]["tokens"] == out["dense"]["tokens"] == _reference(lavida, 0, sparse=False)
    assert out["sparse"]["metrics"]["mode"] == "sparse" and "Table 8" in out["sparse"]["metrics"]["warning"]
    assert out["sparse"]["tokens"] == _reference(lavida, 0, sparse=True)
    assert out["registers"].startswith("VLLMValidationError") and "num_registers" in out["registers"]
    assert "Table 8" in log
    # the whole model is served (one rank, a vqvae/), its vision tower included
    assert "serving text, image generation and image understanding" in log


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    # 512: the publishers' system turn is ~220 tokens in this char tokenizer (~40 in LLaDA's BPE)
    srv = Server(checkpoints["sparse"], ["--max-model-len", "512"], log_dir=tmp_path_factory.mktemp("lavida-o-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.slow
def test_server_answers_text(checkpoints, offline_sparse, client):
    folder = checkpoints["sparse"]
    r = client.completions.create(model=str(folder), prompt=PROMPT, max_tokens=GEN, temperature=0,
                                  extra_body={"vllm_xargs": KNOBS, "ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].token_ids == offline_sparse["default"]["tokens"]  # sparse by default, 4 registers
    metrics = r.model_extra["kv_transfer_params"]["sparse_lavida_metrics"]
    assert metrics["mode"] == "sparse" and metrics["num_registers"] == 4
    chat = client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0, extra_body={"vllm_xargs": {"steps": 4}})
    assert chat.choices[0].message.content is not None


# ---- image understanding: chat images through vLLM's multimodal processor == generate_understanding -----------

QUESTION = "What is this?"


def _picture(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def understanding_reference(folder: Path, images: list, sparse: bool, temperature: float,
                            seed: int, system: bool = True) -> tuple[list, list]:
    """(prompt ids with the images' rows as pad ids, answer tokens) from the PyTorch path: the chat template with
    LLaVA's `<image>` placeholders (one line each, before the text, as vLLM renders parts), tokenized around them
    (tokenizer_image_token), `understanding_prompt`, `generate_understanding` with the knobs the server gets.
    `system`: the publishers' system turn first, as the server's chat route adds it (offline LLM.chat does not)."""
    from transformers import AutoTokenizer

    from sparse_lavida_vllm.drivers.understanding import generate_understanding
    from sparse_lavida_vllm.model_executor.lavida_o_vision import IMAGE_TOKEN_INDEX, understanding_prompt
    from sparse_lavida_vllm.multimodal.lavida_o_layout import SYSTEM_PROMPT

    tok = AutoTokenizer.from_pretrained(str(folder))
    content = "".join("<image>\n" for _ in images) + QUESTION
    turns = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    text = tok.apply_chat_template(turns + [{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    pieces = text.split("<image>")
    ids = tok.encode(pieces[0], add_special_tokens=False)
    for piece in pieces[1:]:
        ids += [IMAGE_TOKEN_INDEX] + tok.encode(piece, add_special_tokens=False)
    model = load_lavida_o(folder)
    prompt = understanding_prompt(model, torch.tensor(ids), images)
    plan = text_plan(GEN, KNOBS["block_length"], KNOBS["steps"])
    sampling = SamplingConfig(temperature=temperature, seed=seed)
    options = SparseOptions(num_registers=model.config.registers("text")) if sparse else None
    tokens = generate_understanding(model, prompt, plan, sampling, options).tokens.tolist()
    pad = model.config.pad_token_id
    return [pad if i == IMAGE_TOKEN_INDEX else i for i in prompt.ids.tolist()], tokens


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [True, False])
def test_server_chat_image_equals_generate_understanding(checkpoints, client, server, sparse):
    """An image_url chat part on `sparse-lavida serve`: vLLM's processor tiles it and sizes its rows with
    num_image_rows, the runner feeds the tower's features at those rows; the answer is the PyTorch path's, token
    for token (sparse: the image rows prefilled and cached once; dense: re-fed every step)."""
    folder = checkpoints["sparse"]
    image = _picture(50, 23, 0)  # not square: a 2x1 anyres grid, unpadded rows
    r = client.chat.completions.create(
        model=str(folder), max_tokens=GEN, temperature=0.8, seed=3,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                               {"type": "text", "text": QUESTION}]}],
        extra_body={"vllm_xargs": {**KNOBS, "sparse": sparse}, "ignore_eos": True, "return_token_ids": True})
    prompt, tokens = understanding_reference(folder, [image], sparse, temperature=0.8, seed=3)
    choice = r.choices[0]
    assert r.prompt_token_ids == prompt and r.usage.prompt_tokens == len(prompt)
    assert choice.token_ids == tokens
    metrics = r.model_extra["kv_transfer_params"]["sparse_lavida_metrics"]
    assert metrics["mode"] == ("sparse" if sparse else "dense")
    assert server.metric("vllm:num_requests_running") == 0


@pytest.mark.slow
def test_server_chat_opens_with_the_publishers_system_turn_unless_the_client_sends_one(checkpoints, client):
    """conv_templates["llada"]: a LaViDa-O chat starts with the publishers' system turn; a client's own system message
    replaces it (never both)."""
    from transformers import AutoTokenizer

    from sparse_lavida_vllm.multimodal.lavida_o_layout import SYSTEM_PROMPT

    folder = checkpoints["sparse"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    for system in (None, "Answer briefly."):
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi"}]
        r = client.chat.completions.create(model=str(folder), messages=turns, max_tokens=8, temperature=0,
                                           extra_body={"vllm_xargs": KNOBS, "return_token_ids": True})
        expected = [{"role": "system", "content": system or SYSTEM_PROMPT}, {"role": "user", "content": "hi"}]
        text = tok.apply_chat_template(expected, add_generation_prompt=True, tokenize=False)
        assert r.prompt_token_ids == tok.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_server_chat_with_two_images_next_to_a_text_request(checkpoints, client, offline_sparse):
    """Two images in one message (each at its own placeholder range: two anyres grids), sent concurrently with a text
    request: both answers are what each gets alone in PyTorch."""
    from concurrent.futures import ThreadPoolExecutor

    folder = checkpoints["sparse"]
    images = [_picture(23, 50, 4), _picture(60, 60, 5)]  # portrait 1x2 grid, square 2x2 grid
    parts = [{"type": "image_url", "image_url": {"url": _data_url(image)}} for image in images]

    def chat():
        return client.chat.completions.create(
            model=str(folder), max_tokens=GEN, temperature=0, messages=[{"role": "user", "content": [
                *parts, {"type": "text", "text": QUESTION}]}],
            extra_body={"vllm_xargs": KNOBS, "ignore_eos": True, "return_token_ids": True})

    def text():
        return client.completions.create(model=str(folder), prompt=PROMPT, max_tokens=GEN, temperature=0,
                                         extra_body={"vllm_xargs": KNOBS, "ignore_eos": True,
                                                     "return_token_ids": True})

    with ThreadPoolExecutor(2) as pool:
        chat_future, text_future = pool.submit(chat), pool.submit(text)
        r, t = chat_future.result(), text_future.result()
    prompt, tokens = understanding_reference(folder, images, sparse=True, temperature=0.0, seed=0)
    assert r.prompt_token_ids == prompt and r.choices[0].token_ids == tokens
    assert t.choices[0].token_ids == offline_sparse["default"]["tokens"]


@pytest.mark.slow
def test_server_refuses_bad_images_naming_the_field(checkpoints, client, server):
    from openai import BadRequestError

    folder = checkpoints["sparse"]
    field = "messages[0].content[1].image_url.url"
    for url, why in [("data:image/png;base64,bm90IGEgcG5n", "not a decodable base64 image"),
                     ("data:image/png;base64,%%%", "not a decodable base64 image"),
                     ("ftp://example.com/a.png", "URL scheme 'ftp' is not supported")]:
        with pytest.raises(BadRequestError) as info:
            client.chat.completions.create(model=str(folder), max_tokens=8, messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
        assert field in str(info.value) and why in str(info.value), str(info.value)
        assert info.value.body.get("param") == field
    assert server.metric("vllm:num_requests_running") == 0
    r = client.chat.completions.create(model=str(folder), max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(_picture(30, 30, 1))}}, {"type": "text", "text": "hi"}]}],
        extra_body={"vllm_xargs": {"steps": 4}})
    assert r.choices[0].message.content is not None  # still serving images after the refusals


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.usefixtures("leaves_nothing")
def test_tp2_serves_the_text_tower_as_the_reference_without_a_vq(checkpoints, tmp_path):
    """Without vqvae/ the plugin's class is the text path (LlavaLladaTextForVLLM: the LLaDA tower, sharded by name)."""
    import shutil

    from tests.worker.test_tensor_parallel import check_tp2_result, run_tp2

    folder = tmp_path / "no-vq"
    shutil.copytree(checkpoints["sparse"], folder, ignore=shutil.ignore_patterns("vqvae"))
    check_tp2_result(run_tp2(folder, timeout=600), load_text_tower(folder))


@pytest.mark.slow
def test_the_engine_stops_on_a_bad_text_tower_tensor_naming_it(tmp_path):
    folder = lavida_checkpoint(tmp_path / "bad", sparse_lavida_config(understanding=None))
    _rewrite(folder, "model.transformer.blocks.0.ff_proj.weight", torch.zeros(3, 3))
    run = subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate", str(folder), "hi",
                          "--gen-length", "8", "--steps", "4", "--max-model-len", "128"],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "'model.transformer.blocks.0.ff_proj.weight': checkpoint shard (3, 3) does not fit" in run.stderr, \
        run.stderr[-3000:]


# ---- image generation and edits through the engine --------------------------------------------------------------

SIZE = (32, 32)  # the tiny VQ downsamples 4x: 8x8 codes, 4x4 positions of 2x2 codes


def reference_image(model: torch.nn.Module, prompt: list[int], seed: int, steps: int, guidance: float = 0.0,
                    image_guidance: float = 0.0, interval: tuple[float, float] = (0.0, 1.0), suffix: tuple = (),
                    source_span: tuple[int, int] | None = None, source_codes: torch.Tensor | None = None,
                    shift: float = 5.0, grid: tuple[int, int] = (4, 4), num_registers: int = 3,
                    dense: bool = False, understanding: tuple[torch.Tensor, torch.Tensor] | None = None,
                    temperature: float = 0.8, per_code: bool = False) -> list[int]:
    """The PyTorch driver's image (drivers.lavida_o_image.generate_image_sparse, or generate_image_dense) for the
    request the engine ran, as packed ids. `understanding`: an edit's SigLIP rows (lavida_o_vision.edit_understanding).
    The defaults (shift 5, temperature 0.8) are the routes' for LaViDa-O (the publishers' 1024_eval.yaml). `per_code`:
    the publishers' per-code plan (dense only; what the routes run for a dense request)."""
    from sparse_lavida_vllm.diffusion.planners import image_plan, publishers_code_plan
    from sparse_lavida_vllm.drivers.lavida_o_image import generate_image_dense, generate_image_sparse
    from sparse_lavida_vllm.model_executor.patch_ids import PatchIds

    plan = (publishers_code_plan(2 * grid[0], steps, shift) if per_code else
            image_plan(*grid, steps, "shift", "stratified", shift, torch.Generator().manual_seed(seed)))
    sampling = SamplingConfig(temperature=temperature, seed=seed, cfg_scale=guidance, image_cfg_scale=image_guidance,
                              cfg_interval=interval)
    rows = None if source_span is None else torch.arange(*source_span)
    if dense:
        result = generate_image_dense(model, torch.tensor(prompt), plan, sampling,
                                      torch.tensor(suffix, dtype=torch.long), rows, source_codes, understanding,
                                      code_width=2 * grid[1] if per_code else None)
        return PatchIds.of(model.config).pack(result.patches).tolist()
    result = generate_image_sparse(model, torch.tensor(prompt), plan, sampling, num_registers,
                                   suffix_ids=torch.tensor(suffix, dtype=torch.long), source_rows=rows,
                                   source_codes=source_codes, understanding=understanding)
    return PatchIds.of(model.config).pack(result.patches).tolist()


IMAGE_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
folder, cases, text = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
prompts = [{"prompt_token_ids": c["prompt"]} for c in cases] + [{"prompt_token_ids": text["prompt"]}]
params = [SamplingParams(max_tokens=16, temperature=1.0, seed=c["seed"], extra_args=c["extra"], detokenize=False)
          for c in cases]
params.append(SamplingParams(max_tokens=text["gen"], temperature=0, ignore_eos=True, extra_args=text["knobs"]))
core = llm.llm_engine.engine_core.engine_core
sched, runner = core.scheduler, core.model_executor.driver_worker.worker.model_runner
runner.profile_run()  # the largest step, through LaViDa-O's forward, before the requests (which must not see it)
profile = {"rows": runner.profile_rows, "max_num_seqs": sched.max_num_running_reqs,
           "budget": sched.max_num_scheduled_tokens}
outs = llm.generate(prompts, params, use_tqdm=False)
free = sched.num_free_blocks() == sched.num_blocks_total
print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                             "metrics": [o.kv_transfer_params["sparse_lavida_metrics"] for o in outs],
                             "batch": max(sched.batch_sizes), "free": free, "profile": profile}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("enc_use_image_branch", [False, True])
def test_offline_engine_images_equal_the_pytorch_driver_in_one_batch(checkpoints, tmp_path, enc_use_image_branch):
    """I4 for LaViDa-O images: the engine (packed positions, paged per-modality attention, CFG companions) gives the
    tokens of drivers.lavida_o_image.generate_image_sparse for the same seed, every case in one batch with a text
    request. Both source-image paths of edits: text-stream rows carrying the patch embedding, or image-stream rows."""
    folder = checkpoints["sparse"] if not enc_use_image_branch else \
        lavida_checkpoint(tmp_path / "image-branch", sparse_lavida_config(enc_use_image_branch=True))
    model = load_lavida_o(folder)
    g = torch.Generator().manual_seed(1)
    source = torch.randint(0, 16, (16, 4), generator=g)  # an edit's source image: 16 positions of 2x2 codes
    edit_prompt = [40, 41] + [201] * 16 + [42, 43, 44]
    base = {"kind": "image", "height": 4, "width": 4, "steps": 4, "shift": 3.0, "num_registers": 3}
    cases = {
        "plain": dict(prompt=PROMPT, seed=3, extra={}),
        "suffix": dict(prompt=PROMPT, seed=4, extra={"suffix_ids": [2, 7]}),  # LaViDa-O's closing token(s)
        "cfg": dict(prompt=PROMPT, seed=5, extra={"guidance_scale": 2.0, "suffix_ids": [2]}),
        "cfg_interval": dict(prompt=PROMPT, seed=6, extra={"guidance_scale": 2.0, "guidance_interval": [0.3, 0.8]}),
        "edit_3way": dict(prompt=edit_prompt, seed=7, extra={
            "guidance_scale": 1.0, "image_guidance_scale": 1.5, "source_span": [2, 18],
            "source_codes": source.flatten().tolist(), "suffix_ids": [2]}),
        "no_registers": dict(prompt=PROMPT, seed=8, extra={"num_registers": 0}),
        "dense": dict(prompt=PROMPT, seed=9, extra={"sparse": False, "guidance_scale": 1.0, "suffix_ids": [2]}),
        "dense_edit": dict(prompt=edit_prompt, seed=10, extra={
            "sparse": False, "guidance_scale": 1.0, "image_guidance_scale": 1.5, "source_span": [2, 18],
            "source_codes": source.flatten().tolist(), "suffix_ids": [2]}),
    }
    payload = [{"prompt": c["prompt"], "seed": c["seed"], "extra": {**base, **c["extra"]}} for c in cases.values()]
    text = {"prompt": PROMPT, "gen": GEN, "knobs": KNOBS}
    run = subprocess.run([sys.executable, "-c", IMAGE_SCRIPT, str(folder), json.dumps(payload), json.dumps(text)],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    got = dict(zip(cases, out["tokens"]))
    for name, case in cases.items():
        extra = {**base, **case["extra"]}
        span = tuple(extra["source_span"]) if "source_span" in extra else None
        if not extra.get("sparse", True):  # the dense engine path == the dense driver (no cache, no registers)
            expected = reference_image(model, case["prompt"], case["seed"], 4, extra.get("guidance_scale", 0.0),
                                       extra.get("image_guidance_scale", 0.0), suffix=tuple(extra["suffix_ids"]),
                                       source_span=span, source_codes=source if span else None, dense=True,
                                       shift=3.0, temperature=1.0)
            assert got[name] == expected, name
            assert out["metrics"][list(cases).index(name)]["mode"] == "dense"
            continue
        expected = reference_image(model, case["prompt"], case["seed"], 4, extra.get("guidance_scale", 0.0),
                                   extra.get("image_guidance_scale", 0.0), tuple(extra.get("guidance_interval",
                                                                                           (0.0, 1.0))),
                                   tuple(extra.get("suffix_ids", ())), span, source if span else None,
                                   num_registers=extra["num_registers"], shift=3.0, temperature=1.0)
        assert got[name] == expected, name
    assert out["tokens"][-1] == _reference(model, 4, sparse=True)  # the text request shared the batch
    assert out["batch"] >= 4 and out["free"]  # batched together; every block (companions too) back in the pool (I5)
    # the profile step ran through LaViDa-O's forward at its largest: 3 branches of max_model_len + 256 registers
    # (the register cap; the image registers count) per request, up to vLLM's step budget
    profile, per_request = out["profile"], 3 * (256 + 256)
    assert profile["rows"] == min(profile["max_num_seqs"] * per_request, max(profile["budget"], per_request)) > 0


def _source_image():
    from PIL import Image

    image = Image.new("RGB", SIZE, (20, 40, 200))
    image.paste((230, 200, 10), (4, 4, 20, 28))
    return image


@pytest.fixture(scope="module")
def layout(checkpoints):
    from transformers import AutoTokenizer

    from sparse_lavida_vllm.multimodal.lavida_o_layout import LaViDaOLayout

    folder = checkpoints["sparse"]
    return LaViDaOLayout.load(folder, AutoTokenizer.from_pretrained(str(folder)))


def test_edit_siglip_rows_are_in_the_prompt_and_change_the_logits(checkpoints, layout):
    """On a checkpoint with a vision tower the edit prompt is predict_t2i_edit's: `<image>` (the source's SigLIP rows)
    then the VQ placeholders; the driver's logits differ from the no-tower layout's, and from the same layout with
    the features left out (the rows are read); without an image the layout is the no-tower one."""
    from sparse_lavida_vllm.diffusion.planners import image_plan
    from sparse_lavida_vllm.drivers.lavida_o_image import generate_image_sparse
    from sparse_lavida_vllm.model_executor.lavida_o_vision import edit_understanding, num_image_rows

    model = load_lavida_o(checkpoints["sparse"])
    source = _source_image()
    patches = layout.encode(source, SIZE)
    edit, plain = layout.edit_prompt("make it red", patches, source), layout.edit_prompt("make it red", patches)
    assert plain.image is None and plain.num_prompt_tokens == len(plain.prompt_ids)
    rows = num_image_rows(model.config.understanding, SIZE)
    # this char tokenizer's template starts with no BOS, so tokenizer_image_token drops nothing and the space after
    # `<image>` stays (tests/multimodal/test_lavida_o_layout.py: LLaDA's tokenizer, where it is dropped)
    space = 1
    assert edit.image_rows == rows and edit.num_prompt_tokens == len(plain.prompt_ids) + rows + space
    assert edit.prompt_ids[edit.image_start:edit.image_start + len(edit.placeholder)] == list(layout.image_placeholder)
    start, end = edit.source_span
    assert end - start == patches.shape[0] and start == edit.image_start + rows + space
    ids, understanding = edit_understanding(model, torch.tensor(edit.reference_ids()), edit.image)
    assert (ids[start:end] == model.config.edit_image_token_id).all()

    def first_logits(prompt: list[int] | torch.Tensor, span: tuple[int, int], und=None) -> torch.Tensor:
        plan = image_plan(4, 4, 4, "shift", "stratified", 3.0, torch.Generator().manual_seed(0))
        result = generate_image_sparse(model, torch.as_tensor(prompt), plan, SamplingConfig(temperature=1.0, seed=0),
                                       3, suffix_ids=torch.tensor(layout.suffix, dtype=torch.long),
                                       source_rows=torch.arange(*span), source_codes=patches, understanding=und)
        return result.steps[0].logits

    with_rows = first_logits(ids, edit.source_span, understanding)
    assert not torch.allclose(with_rows, first_logits(plain.prompt_ids, plain.source_span), atol=1e-4)
    assert not torch.allclose(with_rows, first_logits(ids, edit.source_span), atol=1e-4)  # features, not wte(0)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_server_text_to_image_equals_the_pytorch_driver(checkpoints, client, layout, guidance):
    from PIL import Image

    folder = checkpoints["sparse"]
    caption = "a yellow square on blue"
    result = client.images.generate(model=str(folder), prompt=caption, size="32x32",
                                    extra_body={"seed": 11, "guidance_scale": guidance, "return_token_ids": True})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == SIZE and image.mode == "RGB"
    tokens = result.data[0].model_extra["token_ids"]
    prompt = layout.t2i_prompt(caption, SIZE)
    assert tokens == reference_image(load_lavida_o(folder), prompt, 11, 16, guidance, suffix=layout.suffix)
    assert image.tobytes() == layout.decode(torch.tensor(tokens), SIZE).tobytes()  # the codec decodes the canvas
    metrics = result.model_extra["sparse_lavida_metrics"][0]
    assert metrics["mode"] == "sparse" and metrics["num_registers"] == 3  # the checkpoint's image registers
    assert metrics["forward_tokens"] < metrics["dense_forward_tokens"]


def edit_reference(folder: Path, layout, source, seed: int, guidance: float, image_guidance: float,
                   dense: bool = False, temperature: float = 0.8) -> list[int]:
    """The PyTorch driver's edit for what the route lays out: on this checkpoint (a vision tower) the prompt holds
    the source's SigLIP rows (`<image>`, expanded by lavida_o_vision.edit_understanding) before its VQ rows."""
    from sparse_lavida_vllm.model_executor.lavida_o_vision import edit_understanding

    model = load_lavida_o(folder)
    patches = layout.encode(source, SIZE)
    edit = layout.edit_prompt("make it red", patches, source)
    assert edit.image is not None and edit.image_rows > 0  # the tiny tower's rows are in the prompt
    ids, understanding = edit_understanding(model, torch.tensor(edit.reference_ids()), edit.image)
    assert ids.numel() == edit.num_prompt_tokens
    assert understanding[0].tolist() == list(range(edit.image_start, edit.image_start + edit.image_rows))
    return reference_image(model, ids.tolist(), seed, 16, guidance, image_guidance, suffix=layout.suffix,
                           source_span=edit.source_span, source_codes=patches, dense=dense,
                           num_registers=0 if dense else 3, understanding=understanding, temperature=temperature,
                           per_code=dense)  # the route runs a dense request with the publishers' per-code sampler


@pytest.mark.slow
def test_server_edit_equals_the_pytorch_driver_and_inpainting_keeps_the_rest(checkpoints, server, layout):
    """An edit on a checkpoint with a vision tower: the route puts the source in as its VQ rows and its SigLIP copy
    (vLLM's multimodal processor expands `<image>`, the runner feeds the tower's features), sparse and dense, with
    three-way guidance (both companions mask the SigLIP rows); the image equals the PyTorch driver's."""
    import requests
    from PIL import Image

    folder = checkpoints["sparse"]
    source = _source_image()
    upload = io.BytesIO()
    source.save(upload, format="PNG")
    data = {"prompt": "make it red", "size": "32x32", "seed": "5", "guidance_scale": "1.0",
            "image_guidance_scale": "1.5", "return_token_ids": "true"}
    r = requests.post(server.base_url + "/v1/images/edits", data=data,
                      files={"image": ("a.png", upload.getvalue(), "image/png")}, timeout=300)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert image.size == SIZE
    assert r.json()["data"][0]["token_ids"] == edit_reference(folder, layout, source, 5, 1.0, 1.5)
    r = requests.post(server.base_url + "/v1/images/edits", data={**data, "seed": "6", "sparse": "false"},
                      files={"image": ("a.png", upload.getvalue(), "image/png")}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["token_ids"] == edit_reference(folder, layout, source, 6, 1.0, 1.5, dense=True)
    patches = layout.encode(source, SIZE)
    # inpainting: the transparent left half is repainted, every position of the right half keeps the source
    mask = Image.new("RGBA", SIZE, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    r = requests.post(server.base_url + "/v1/images/edits", data={**data, "image_guidance_scale": "0"},
                      files={"image": ("a.png", upload.getvalue(), "image/png"),
                             "mask": ("m.png", mask_png.getvalue(), "image/png")}, timeout=300)
    assert r.status_code == 200, r.text
    tokens, given = r.json()["data"][0]["token_ids"], layout.canvas_ids(patches)
    right = [i for i in range(16) if i % 4 >= 2]
    assert all(tokens[i] == given[i] for i in right)
    assert r.json()["sparse_lavida_metrics"][0]["steps"] == 8  # only the 8 repainted positions were planned


@pytest.mark.slow
def test_generate_image_edit_takes_the_siglip_copy_as_the_driver(checkpoints, layout, tmp_path):
    """`sparse-lavida generate-image --image` lays an edit out as the route does (the source's SigLIP rows through
    vLLM's multimodal processor on this checkpoint with a tower): its PNG is the driver's canvas, decoded."""
    from PIL import Image

    folder = checkpoints["sparse"]
    source_png, out = tmp_path / "source.png", tmp_path / "edit.png"
    _source_image().save(source_png)
    run = subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate-image", "make it red",
                          "--model", str(folder), "--image", str(source_png), "--size", "32x32", "--steps", "16",
                          "--guidance-scale", "1.0", "--image-guidance-scale", "1.5", "--seed", "5", "--dtype",
                          "float32", "--max-model-len", "512", "-o", str(out), "--quiet"],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    source = Image.open(source_png)
    expected = edit_reference(folder, layout, source, 5, 1.0, 1.5)
    assert Image.open(out).tobytes() == layout.decode(torch.tensor(expected), SIZE).tobytes()


@pytest.mark.slow
def test_server_image_requests_name_what_is_unsupported(checkpoints, client, server):
    import requests
    from openai import BadRequestError

    folder = checkpoints["sparse"]
    for size in ("30x30", "big", "4096x4096"):
        with pytest.raises(BadRequestError) as info:
            client.images.generate(model=str(folder), prompt="a square", size=size)
        assert info.value.body["param"] == "size" and "multiples of 8" in str(info.value), size
    with pytest.raises(BadRequestError) as info:  # 64x64 positions do not fit max_model_len 512
        client.images.generate(model=str(folder), prompt="a square", size="512x512")
    assert info.value.body["param"] == "size"
    with pytest.raises(BadRequestError) as info:
        client.images.generate(model=str(folder), prompt="a square", size="32x32",
                               extra_body={"image_guidance_scale": 1.0})
    assert info.value.body["param"] == "image_guidance_scale"
    for knobs in ({"per_code": True}, {"per_code": True, "sparse": False, "order": "random"}):  # sparse by default
        with pytest.raises(BadRequestError) as info:  # the per-code sampler: dense, stratified, shift only
            client.images.generate(model=str(folder), prompt="a square", size="32x32", extra_body=knobs)
        assert info.value.body["param"] == "per_code", knobs
    r = requests.post(server.base_url + "/v1/images/edits", data={"prompt": "x", "size": "32x32"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert server.metric("vllm:num_requests_running") == 0


def test_images_are_served_only_with_a_vq(checkpoints, tmp_path):
    from sparse_lavida_vllm.model_executor.lavida_o_text import serves_lavida_o_images

    assert serves_lavida_o_images(checkpoints["sparse"]) is None  # any tensor_parallel_size: the model shards
    assert "vqvae/config.json" in serves_lavida_o_images(tmp_path)


def test_chat_images_are_taken_only_by_the_whole_model_with_a_tower(checkpoints, tmp_path):
    """What the API server's chat hook answers before vLLM sees an image part (an HTTP 400 with this reason)."""
    from sparse_lavida_vllm.worker.lavida_o_processor import understanding_refusal

    assert understanding_refusal(str(checkpoints["sparse"])) is None
    no_tower = lavida_checkpoint(tmp_path / "no-tower", sparse_lavida_config(understanding=None))
    assert "declares no vision tower" in understanding_refusal(str(no_tower))
    assert "vqvae/config.json" in understanding_refusal(str(tmp_path))


@pytest.mark.slow
def test_generate_image_cli_draws_lavida_o_images_offline(checkpoints, layout, tmp_path):
    """`sparse-lavida generate-image` lays LaViDa-O requests out as the routes do: the PNG is the PyTorch driver's."""
    import numpy as np
    from PIL import Image

    folder, out = checkpoints["sparse"], tmp_path / "square.png"
    run = subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate-image", "a yellow square",
                          "--model", str(folder), "--size", "32x32", "--seed", "4", "--guidance-scale", "1.0",
                          "--max-model-len", "512", "-o", str(out), "--quiet"],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    image = Image.open(out)
    assert image.size == SIZE
    tokens = reference_image(load_lavida_o(folder), layout.t2i_prompt("a yellow square", SIZE), 4, 16, 1.0,
                             suffix=layout.suffix)
    expected = np.asarray(layout.decode(torch.tensor(tokens), SIZE), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1  # same codes (decoded in another process)
    bad = subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate-image", "x", "--model", str(folder),
                          "--size", "30x30", "--max-model-len", "256", "--quiet"],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--size" in bad.stderr and "multiples of 8" in bad.stderr


# ---- tensor parallelism: the whole model (both streams, the tower) over two ranks -------------------------------

EDIT_PROMPT = [40, 41] + [201] * 16 + [42, 43, 44]  # an edit's prompt: 16 source-image placeholders at rows 2..17
IMAGE_BASE = {"kind": "image", "height": 4, "width": 4, "steps": 4, "shift": 3.0, "num_registers": 3}


def _edit_source() -> torch.Tensor:
    """An edit's source image: 16 positions of 2x2 codes."""
    return torch.randint(0, 16, (16, 4), generator=torch.Generator().manual_seed(1))


TP_IMAGE_CASES = {
    "cfg": dict(prompt=PROMPT, seed=5, extra={"guidance_scale": 2.0, "suffix_ids": [2]}),
    "edit_3way": dict(prompt=EDIT_PROMPT, seed=7, extra={
        "guidance_scale": 1.0, "image_guidance_scale": 1.5, "source_span": [2, 18],
        "source_codes": _edit_source().flatten().tolist(), "suffix_ids": [2]}),
    "dense": dict(prompt=PROMPT, seed=9, extra={"sparse": False, "guidance_scale": 1.0, "suffix_ids": [2]}),
    "per_code": dict(prompt=PROMPT, seed=10, extra={"sparse": False, "per_code": True, "guidance_scale": 1.0,
                                                    "suffix_ids": [2]}),  # the publishers' per-code sampler
}
TP_CHAT = {"temperature": 0.8, "seed": 3}


def _lavida_worker_view(worker) -> dict:
    """What one TP worker holds of the whole model: its text view (tests.worker.test_tensor_parallel) plus the image
    stream's shards and the replicated generation head and tower."""
    from tests.worker.test_tensor_parallel import _worker_view

    model = worker.model_runner.model
    block = model.model.transformer["blocks"][0]
    tower = model.model.vision_tower.vision_tower.vision_model.encoder.layers[0].mlp.fc1.weight
    return {**_worker_view(worker), "cls": type(model).__name__,
            "q_proj_vision": list(block.q_proj_vision.weight.shape),
            "k_proj_vision": list(block.k_proj_vision.weight.shape),
            "ff_proj_vision": list(block.ff_proj_vision.weight.shape),
            "ff_out_vision": list(block.ff_out_vision.weight.shape),
            "attn_norm_vision": list(block.attn_norm_vision.weight.shape),
            "gen_predictor": list(model.model.gen_predictor.weight.shape), "tower_fc1": list(tower.shape)}


def tp2_main(folder: str, payload: str) -> None:
    """A TP=2 engine over `folder`: the image cases, the text cases of tests.worker.test_tensor_parallel (one batch)
    and a chat turn with an image; one RESULT line (tokens, the chat's prompt ids, every worker's view)."""
    from vllm import LLM, SamplingParams

    from tests.worker.test_tensor_parallel import CASES, STANDARD
    from tests.worker.test_tensor_parallel import PROMPT as TEXT_PROMPT

    data = json.loads(payload)
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, tensor_parallel_size=2,
              distributed_executor_backend="mp")
    prompts, params = [], []
    for case in TP_IMAGE_CASES.values():
        prompts.append({"prompt_token_ids": case["prompt"]})
        params.append(SamplingParams(max_tokens=16, temperature=1.0, seed=case["seed"], detokenize=False,
                                     extra_args={**IMAGE_BASE, **case["extra"]}))
    for knobs in CASES.values():
        knobs = dict(knobs)
        std = {k: knobs.pop(k) for k in STANDARD if k in knobs}
        prompts.append({"prompt_token_ids": TEXT_PROMPT})
        params.append(SamplingParams(max_tokens=knobs["gen_length"], ignore_eos=True, extra_args=knobs,
                                     temperature=std.get("temperature", 0), top_k=std.get("top_k", 0),
                                     seed=std.get("seed", 0)))
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    chat = llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data["image"]}},
                                                  {"type": "text", "text": QUESTION}]}],
                    SamplingParams(max_tokens=GEN, ignore_eos=True, extra_args={**KNOBS, "sparse": True}, **TP_CHAT),
                    use_tqdm=False)[0]
    # an edit laid out as the route does: the source's SigLIP rows through vLLM's processor, on both ranks
    from transformers import AutoTokenizer

    from sparse_lavida_vllm.multimodal.lavida_o_layout import LaViDaOLayout

    layout = LaViDaOLayout.load(folder, AutoTokenizer.from_pretrained(folder))
    source = _source_image()
    edit = layout.edit_prompt("make it red", layout.encode(source, SIZE), source)
    extra = layout.request_args(SIZE, steps=16, guidance_scale=1.0, image_guidance_scale=1.5,
                                source_span=edit.source_span, source_codes=edit.source_codes)
    siglip_edit = llm.generate([edit.engine_prompt()], [SamplingParams(max_tokens=16, temperature=1.0, seed=5,
                                                                      detokenize=False, extra_args=extra)],
                               use_tqdm=False)[0].outputs[0].token_ids
    n = len(TP_IMAGE_CASES)
    print("RESULT " + json.dumps({"siglip_edit": list(siglip_edit),
        "images": dict(zip(TP_IMAGE_CASES, map(list, outs[:n]))), "tokens": dict(zip(CASES, map(list, outs[n:]))),
        "chat": {"prompt": list(chat.prompt_token_ids), "tokens": list(chat.outputs[0].token_ids)},
        "workers": llm.collective_rpc(_lavida_worker_view)}), flush=True)


@pytest.mark.slow
@pytest.mark.usefixtures("leaves_nothing")
def test_tp2_serves_images_text_and_chat_images_as_the_pytorch_drivers(checkpoints, layout):
    """I4 under tensor parallelism for the whole LaViDa-O model: `LLM(tensor_parallel_size=2)` shards both streams
    (text q/k/v/MLP and their `*_vision` twins; attn_out row-parallel for every row) and replicates the generation
    head, the 2x2 convs and the SigLIP tower. Every rank samples from the same all-reduced logits, and the engine's
    T2I with CFG, three-way edit and dense T2I (one batch with text requests), a chat answer about an image, and an
    edit with the source's SigLIP rows (as the route lays it out), equal the single-rank PyTorch drivers
    (generate_image_sparse / _dense, the text sampler, generate_understanding) token for token: at this size the
    all-reduce's float rounding (two partial sums instead of one GEMM, <= 1e-5:
    tests/model_executor/test_lavida_o_parallel.py) flips no sample."""
    from tests.worker.test_tensor_parallel import check_tp2_result

    folder = checkpoints["sparse"]
    image = _picture(50, 23, 0)
    env = dict(os.environ, **VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND="0|1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    run = subprocess.run([sys.executable, "-m", "tests.entrypoints.test_lavida_o_serving", str(folder),
                          json.dumps({"image": _data_url(image)})], env=env, capture_output=True, text=True,
                         timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    model = load_lavida_o(folder)
    cfg = model.config
    for w in out["workers"]:  # each rank: half the heads and MLP columns of both streams; the rest whole
        assert w["cls"] == "LlavaLladaForVLLM"
        assert w["q_proj_vision"] == [cfg.d_model // 2, cfg.d_model_gen]
        assert w["k_proj_vision"] == [cfg.n_kv_heads // 2 * cfg.head_dim, cfg.d_model_gen]
        assert w["ff_proj_vision"] == [cfg.mlp_hidden_size_gen // 2, cfg.d_model_gen]
        assert w["ff_out_vision"] == [cfg.d_model_gen, cfg.mlp_hidden_size_gen // 2]
        assert w["attn_norm_vision"] == [cfg.d_model_gen]
        assert w["gen_predictor"] == [cfg.num_vq_embeddings, cfg.d_model_gen] and w["tower_fc1"] == [40, 24]
    check_tp2_result(out, model)  # the text shards and the text cases == the reference sampler
    source = _edit_source()
    for name, case in TP_IMAGE_CASES.items():
        extra = {**IMAGE_BASE, **case["extra"]}
        span = tuple(extra["source_span"]) if "source_span" in extra else None
        expected = reference_image(model, case["prompt"], case["seed"], 4, extra.get("guidance_scale", 0.0),
                                   extra.get("image_guidance_scale", 0.0), suffix=tuple(extra["suffix_ids"]),
                                   source_span=span, source_codes=source if span else None,
                                   dense=not extra.get("sparse", True), shift=3.0, temperature=1.0,
                                   per_code=extra.get("per_code", False))
        assert out["images"][name] == expected, name
    prompt, tokens = understanding_reference(folder, [image], sparse=True, system=False, **TP_CHAT)
    assert out["chat"] == {"prompt": prompt, "tokens": tokens}
    assert out["siglip_edit"] == edit_reference(folder, layout, _source_image(), 5, 1.0, 1.5,
                                                temperature=1.0)  # with its SigLIP rows


if __name__ == "__main__":  # the TP=2 engine's child process (vLLM spawns its workers under this guard)
    tp2_main(sys.argv[1], sys.argv[2])
