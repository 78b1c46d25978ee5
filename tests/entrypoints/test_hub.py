"""Hugging Face model ids: an `org/name` that is not a local folder is served, generated from and drawn with through
its snapshot in an HF cache laid out as the Hub lays it out. Nothing is downloaded: the cache is a temporary
HF_HUB_CACHE and the commands run with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_lavida_vllm.entrypoints.hub import is_hub_id, resolve_model, resolve_serve_argv
from tests.entrypoints.test_checkpoints import llada_checkpoint
from tests.serving_helpers import VLLM_ENV, Server

LLADA_ID = "tiny-org/tiny-llada"
LAVIDA_ID = "tiny-org/tiny-lavida-o"
MISSING_ID = "nobody/not-cached"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """`source`'s files in `cache` as a Hub download leaves them: content-named files in blobs/, snapshots/<commit>/
    of relative symlinks into blobs/ (subfolders such as vqvae/ included), refs/main holding the commit. Returns the
    snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # as huggingface_hub writes it: the hash, no newline
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="module")
def llada(cache, tmp_path_factory) -> tuple[Path, Path]:
    """(local folder, its snapshot under LLADA_ID) of a tiny checkpoint in LLaDA's published layout."""
    folder = llada_checkpoint(tmp_path_factory.mktemp("llada") / "llada")
    return folder, add_to_hub_cache(cache, LLADA_ID, folder)


@pytest.fixture(scope="module")
def lavida(cache, tmp_path_factory) -> Path:
    """The snapshot under LAVIDA_ID of a tiny Sparse-LaViDa checkpoint: sharded weights, SigLIP tower, vqvae/."""
    pytest.importorskip("diffusers")
    from tests.entrypoints.test_lavida_o_serving import lavida_checkpoint, sparse_lavida_config

    folder = lavida_checkpoint(tmp_path_factory.mktemp("lavida") / "lavida-o", sparse_lavida_config())
    return add_to_hub_cache(cache, LAVIDA_ID, folder)


def offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, **VLLM_ENV, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def cli(cache: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", *args], capture_output=True, text=True,
                          env=offline_env(cache), timeout=timeout)


def test_what_counts_as_an_id(tmp_path, monkeypatch):
    assert is_hub_id("org/name") and is_hub_id("GSAI-ML/LLaDA-8B-Instruct") and is_hub_id("a_b/c.d-1")
    for not_an_id in ("a cat", "name", "/abs/path", "./org/name", "../org/name", "org/name/sub", "org/../x", ""):
        assert not is_hub_id(not_an_id), not_an_id
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")  # a local folder of that name wins, as in vLLM


def test_an_id_resolves_to_its_snapshot_from_the_cache_alone(cache, llada, monkeypatch):
    from huggingface_hub import constants

    folder, snapshot = llada
    assert snapshot.is_dir() and (snapshot / "config.json").is_symlink()
    assert resolve_model(str(folder)) == str(folder)  # a local folder is itself
    found = resolve_model(LLADA_ID, cache_dir=str(cache), local_files_only=True)
    assert Path(found) == snapshot.resolve()
    assert Path(resolve_model(LLADA_ID, revision=COMMIT, cache_dir=str(cache), local_files_only=True)) == Path(found)
    with pytest.raises(SystemExit) as info:
        resolve_model(MISSING_ID, cache_dir=str(cache), local_files_only=True)
    assert str(info.value) == (f"--model: {MISSING_ID} is not a local folder and is not in the Hugging Face cache "
                               "(offline)")
    with pytest.raises(SystemExit) as info:
        resolve_model(LLADA_ID, field="MODEL", revision="v2", cache_dir=str(cache), local_files_only=True)
    assert str(info.value) == (f"MODEL: {LLADA_ID} is not a local folder and is not in the Hugging Face cache at "
                               "revision v2 (offline)")

    # serve: the snapshot is what vLLM loads, the id the name clients use; --revision named the snapshot
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = resolve_serve_argv([LLADA_ID, "--port", "9", "--revision", "main", "--download-dir", str(cache)])
    assert argv == [found, "--port", "9", "--download-dir", str(cache), "--served-model-name", LLADA_ID]
    argv = resolve_serve_argv([LLADA_ID, f"--revision={COMMIT}", "--download-dir", str(cache), "--served-model-name",
                               "mine", "--hf-token"])
    assert argv == [found, "--download-dir", str(cache), "--served-model-name", "mine", "--hf-token"]
    assert resolve_serve_argv([str(folder), "--revision", "main"]) == [str(folder), "--revision", "main"]


# Each command's MODEL argument, with an id that is not cached: the same one line, a non-zero exit.
NOT_CACHED = {
    "generate": (["generate", "--model", MISSING_ID, "hi"], "--model"),
    "generate-image": (["generate-image", "a cat", "--model", MISSING_ID], "--model"),
    "serve": (["serve", MISSING_ID, "--port", "9"], "MODEL"),
    "eval": (["eval", MISSING_ID, "--seeds", "1"], "MODEL"),
}
ALL_COMMANDS = """
import json, sys
from sparse_lavida_vllm.cli import main
found = {}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        found[name] = [main(argv), None]
    except SystemExit as e:
        found[name] = [e.code if isinstance(e.code, int) else 1, str(e)]
print(json.dumps(found))
"""


def test_an_id_not_in_the_cache_is_one_line_naming_it(cache):
    line = f"{MISSING_ID} is not a local folder and is not in the Hugging Face cache (offline)"
    run = cli(cache, "generate", "--model", MISSING_ID, "hi")  # the console command as a user runs it
    assert run.returncode != 0 and run.stderr == f"--model: {line}\n", run.stderr
    run = subprocess.run([sys.executable, "-c", ALL_COMMANDS, json.dumps({k: v[0] for k, v in NOT_CACHED.items()})],
                         capture_output=True, text=True, env=offline_env(cache), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (_, field) in NOT_CACHED.items():
        assert found[name] == [1, f"{field}: {line}"], name


def test_eval_of_an_id_is_the_eval_of_its_folder(cache, capsys, monkeypatch, one_thread):
    from huggingface_hub import constants

    from sparse_lavida_vllm.cli import main
    from sparse_lavida_vllm.training.data import DEMO_ROOT

    add_to_hub_cache(cache, "tiny-org/demo", DEMO_ROOT / "sparse")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    small = ["--seeds", "1", "--num-images", "2", "--num-edits", "1", "--num-text", "2", "--num-text-per-length", "1",
             "--image-steps", "2", "--json", "--threads", "1"]  # one_thread puts torch's thread count back afterwards
    outputs = []
    for model in (str(DEMO_ROOT / "sparse"), "tiny-org/demo"):
        assert main(["eval", model, "--download-dir", str(cache), *small]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["metrics"]
    with pytest.raises(SystemExit, match="--card writes the model card into the checkpoint folder"):
        main(["eval", "tiny-org/demo", "--download-dir", str(cache), "--card", *small])


@pytest.mark.slow
def test_generate_with_an_id_gives_the_local_folders_tokens(cache, llada):
    folder, _ = llada
    knobs = ["Q: 1+2=? A:", "--gen-length", "8", "--steps", "4", "--max-model-len", "128", "--json", "--ignore-eos"]
    local = cli(cache, "generate", "--model", str(folder), *knobs)
    hub = cli(cache, "generate", "--model", LLADA_ID, "--revision", COMMIT, *knobs)
    assert local.returncode == 0, local.stderr[-3000:]
    assert hub.returncode == 0, hub.stderr[-3000:]
    tokens = [json.loads(r.stdout.strip().splitlines()[-1])["token_ids"] for r in (local, hub)]
    assert len(tokens[0]) == 8 and tokens[0] == tokens[1]


@pytest.mark.slow
def test_generate_image_with_a_lavida_o_id_writes_a_png(cache, lavida, tmp_path):
    from PIL import Image

    out = tmp_path / "square.png"
    run = cli(cache, "generate-image", "a red square", "--model", LAVIDA_ID, "--size", "32x32", "--steps", "4",
              "--max-model-len", "512", "-o", str(out), "--quiet", timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)


@pytest.mark.slow
def test_serve_an_id_answers_under_the_id(cache, llada, tmp_path, monkeypatch):
    from openai import OpenAI

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = Server(LLADA_ID, log_dir=tmp_path)
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == [LLADA_ID]
        reply = client.completions.create(model=LLADA_ID, prompt="Q: 1+2=? A:", max_tokens=8,
                                          extra_body={"vllm_xargs": {"steps": 4}})
        assert reply.model == LLADA_ID and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()
