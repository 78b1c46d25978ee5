"""Checkpoints in LLaDA's published format: no invented register token, dense by default, clear refusals, CLI paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import random_model, save_pretrained
from tests.serving_helpers import LLADA_KEYS, TINY, VLLM_ENV, save_char_tokenizer


def llada_checkpoint(folder: Path, tokenizer: bool = True, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained(random_model(TINY, seed=0, std=0.3), folder)  # weights of the same shapes
    (folder / "config.json").write_text(json.dumps({**LLADA_KEYS, **overrides}))
    if tokenizer:
        save_char_tokenizer(folder, TINY)
    return folder


def test_a_published_llada_config_gets_no_register_token_and_dense_by_default():
    config = MDMConfig.from_dict(LLADA_KEYS)
    assert config.register_token_id is None and config.num_registers == 0 and config.block_causal is False
    ours = MDMConfig.from_dict({**LLADA_KEYS, "register_token_id": 255, "num_registers": 8, "block_causal": True})
    assert ours.register_token_id == 255 and ours.num_registers == 8 and ours.block_causal
    with pytest.raises(ValueError, match="register_token_id"):
        MDMConfig.from_dict({**LLADA_KEYS, "num_registers": 8})  # registers but no token for them


def test_moe_and_llada2_architectures_are_refused_by_name():
    from sparse_lavida_vllm.worker.vllm_model import LLaDAHFConfig

    with pytest.raises(ValueError, match="LLaDA-MoE"):
        LLaDAHFConfig(**{**LLADA_KEYS, "architectures": ["LLaDAMoEModelLM"]})
    with pytest.raises(ValueError, match="LLaDA 2.x"):
        LLaDAHFConfig(**{**LLADA_KEYS, "architectures": ["LLaDA2MoeModelLM"]})
    hf = LLaDAHFConfig(**LLADA_KEYS)
    assert hf.register_token_id is None and hf.num_registers == 0


SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128)
plain, sparse = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2, [
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, extra_args={"steps": 4}),
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, extra_args={"steps": 4, "sparse": True})])
try:  # refused when the request is added (the API server answers 400 before a stream starts)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], [SamplingParams(max_tokens=8, extra_args={
        "steps": 4, "sparse": True, "num_registers": 4})])
    bad = "ran"
except Exception as e:
    bad = f"{type(e).__name__}: {e}"
print(json.dumps({"plain": plain.kv_transfer_params["sparse_lavida_metrics"],
                  "sparse": sparse.kv_transfer_params["sparse_lavida_metrics"], "bad": bad}))
"""


@pytest.mark.slow
def test_engine_serves_a_published_llada_checkpoint_dense_and_warns_on_sparse(tmp_path):
    import os

    folder = llada_checkpoint(tmp_path / "llada")
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], env={**os.environ, **VLLM_ENV},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["plain"]["mode"] == "dense" and "warning" not in out["plain"]
    assert out["sparse"]["mode"] == "sparse" and "Table 8" in out["sparse"]["warning"]
    # registers without a register token: refused naming the knob, not run with an invented id
    assert out["bad"].startswith("VLLMValidationError") and "num_registers" in out["bad"], out["bad"]
    assert "Table 8" in run.stdout + run.stderr  # the warning is in the engine log too


def _generate(*args: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate", *args, "--gen-length", "8",
                           "--steps", "4", "--max-model-len", "128", "--json"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **VLLM_ENV})


@pytest.mark.slow
def test_generate_takes_a_checkpoint_folder_as_the_model_never_as_the_prompt(tmp_path):
    folder = llada_checkpoint(tmp_path / "llada")
    done = _generate(str(folder), "hi")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["prompt"] == "hi"
    alone = _generate(str(folder))
    assert alone.returncode != 0 and "no prompt" in alone.stderr
    not_a_model = _generate(str(tmp_path), "hi")
    assert not_a_model.returncode != 0 and "is a path, not a prompt" in not_a_model.stderr
    bare = llada_checkpoint(tmp_path / "no-tokenizer", tokenizer=False)
    refused = _generate("--model", str(bare), "hi")
    assert refused.returncode != 0 and "has no tokenizer" in refused.stderr and "--tokenizer" in refused.stderr
    borrowed = _generate("--model", str(bare), "--tokenizer", str(folder), "hi")
    assert borrowed.returncode == 0, borrowed.stderr[-2000:]


def test_serve_argv_for_tokenizer_free_and_non_checkpoint_folders(tmp_path, capsys):
    from sparse_lavida_vllm.entrypoints.cli import vllm_serve_argv

    bare = llada_checkpoint(tmp_path / "bare", tokenizer=False)
    argv = vllm_serve_argv([str(bare), "--port", "9"])
    assert "--skip-tokenizer-init" in argv and "has no tokenizer" in capsys.readouterr().err
    assert "--skip-tokenizer-init" not in vllm_serve_argv([str(bare), "--tokenizer", str(tmp_path)])
    assert "--skip-tokenizer-init" not in vllm_serve_argv([str(llada_checkpoint(tmp_path / "full"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        vllm_serve_argv([str(tmp_path / "empty")])


@pytest.mark.slow
def test_a_tokenizer_free_checkpoint_serves_token_ids(tmp_path):
    import requests

    from tests.serving_helpers import Server

    srv = Server(llada_checkpoint(tmp_path / "bare", tokenizer=False), log_dir=tmp_path)
    try:
        ok = requests.post(srv.base_url + "/v1/completions", json={
            "model": str(tmp_path / "bare"), "prompt": [5, 6, 7], "max_tokens": 8,
            "vllm_xargs": {"steps": 4}}, timeout=120)
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["choices"][0].get("token_ids") or ok.json()["choices"][0]["text"] or "x") > 0
        text = requests.post(srv.base_url + "/v1/completions", json={
            "model": str(tmp_path / "bare"), "prompt": "hello", "max_tokens": 8}, timeout=120)
        assert 400 <= text.status_code < 500, text.text
    finally:
        srv.stop()
