"""`sparse-lavida serve` argv handling and `sparse-lavida generate` end to end (a real vLLM engine in a subprocess)."""

import json
import os
import subprocess
import sys

import pytest

from sparse_lavida_vllm.entrypoints import cli
from tests.serving_helpers import VLLM_ENV, make_checkpoint, reference_tokens


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A folder that passes serve's file checks (config.json and a tokenizer file); vLLM never reads it here."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def test_serve_passes_vllm_flags_through_and_defaults_to_float32(checkpoint_dir):
    tmp_path = checkpoint_dir
    argv = cli.vllm_serve_argv([str(tmp_path), "--port", "8123", "-tp", "1"])
    assert argv == ["vllm", "serve", str(tmp_path), "--port", "8123", "-tp", "1", "--dtype", "float32",
                    "--shutdown-timeout", str(cli.DEFAULT_SHUTDOWN_TIMEOUT)]
    assert "--dtype=bfloat16" in cli.vllm_serve_argv([str(tmp_path), "--dtype=bfloat16"])


def test_serve_drains_on_sigterm_by_default_and_the_user_flag_wins(checkpoint_dir):
    tmp_path = checkpoint_dir
    argv = cli.vllm_serve_argv([str(tmp_path)])
    assert argv[argv.index("--shutdown-timeout") + 1] == str(cli.DEFAULT_SHUTDOWN_TIMEOUT)
    assert cli.DEFAULT_SHUTDOWN_TIMEOUT > 0  # 0 is vLLM's abort mode
    for flag in (["--shutdown-timeout", "5"], ["--shutdown-timeout=0"]):
        argv = cli.vllm_serve_argv([str(tmp_path), *flag])
        assert sum(a.startswith("--shutdown-timeout") for a in argv) == 1 and flag[-1] in argv


def test_serve_defaults_to_the_bundled_demo_model(monkeypatch, checkpoint_dir):
    tmp_path = checkpoint_dir
    monkeypatch.setattr(cli, "DEMO_MODEL", tmp_path)
    assert cli.vllm_serve_argv(["--port", "1"])[:3] == ["vllm", "serve", str(tmp_path)]
    monkeypatch.setattr(cli, "DEMO_MODEL", tmp_path / "missing")
    with pytest.raises(SystemExit, match="demo model is missing"):
        cli.vllm_serve_argv(["--port", "1"])


def test_serve_subcommand_keeps_every_flag():
    from sparse_lavida_vllm.cli import build_parser

    ns = build_parser().parse_args(["serve", "--port", "9", "model", "--max-model-len", "64"])
    assert ns.func is cli.serve and ns.vllm_args == ["--port", "9", "model", "--max-model-len", "64"]


def test_cpu_env_defaults_do_not_override_the_user(monkeypatch):
    monkeypatch.setenv("VLLM_HOST_IP", "10.0.0.1")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cli.set_cpu_env()
    assert os.environ["VLLM_HOST_IP"] == "10.0.0.1" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"


def _generate(folder, *flags):
    env = {**os.environ, **VLLM_ENV}
    out = subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate", "Hi", "A longer prompt",
                          "--model", str(folder), "--gen-length", "16", "--block-length", "8", "--steps", "8",
                          "--num-registers", "2", "--ignore-eos", "--json", *flags],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_generate_command_matches_reference_and_flat_batch_mode_agrees(tmp_path):
    folder = make_checkpoint(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    exact = _generate(folder)
    assert len(exact) == 2
    refs = [reference_tokens(folder, tok(r["prompt"])["input_ids"], 16, 8, 8, 2) for r in exact]
    assert [r["token_ids"] for r in exact] == refs
    flat = _generate(folder, "--flat-batch")  # both prompts in one forward pass per step
    agree = sum(a == b for r, f in zip(refs, flat) for a, b in zip(r, f["token_ids"]))
    assert [len(f["token_ids"]) for f in flat] == [16, 16] and agree >= 0.9 * 32
