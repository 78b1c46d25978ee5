"""`sparse-lavida generate-image` on a tiny checkpoint with its own image layout: PNGs out, clear errors."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

from sparse_lavida_vllm.diffusion.planners import image_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_sparse
from sparse_lavida_vllm.model_executor.weights import load_pretrained
from sparse_lavida_vllm.multimodal.codec import PixelCodec
from tests.serving_helpers import TINY, VLLM_ENV, make_checkpoint

pytestmark = pytest.mark.slow
LAYOUT = {"codec": {"type": "pixel", "height": 4, "width": 4, "levels": 16, "token_offset": 100},
          "t2i_prefix": ["<bos>"], "edit_prefix": ["<bos>", "<eos>"],
          "defaults": {"steps": 4, "temperature": 1.0, "guidance_scale": 1.5}}


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, **VLLM_ENV}
    return subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate-image", *args, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("img-ck"), replace(TINY, image_generation=LAYOUT))


def test_generate_image_writes_the_reference_sampler_s_pngs(checkpoint, tmp_path):
    out = tmp_path / "digit.png"
    done = run("hi", "--model", str(checkpoint), "-o", str(out), "-n", "2", "--seed", "3", "--scale", "1",
               "--max-model-len", "128")
    assert done.returncode == 0, done.stderr[-2000:]
    codec = PixelCodec(4, 4, 16, token_offset=100)
    model = load_pretrained(checkpoint)
    prompt = torch.tensor([1, ord("h") - 28, ord("i") - 28])  # <bos> + the char tokenizer's ids (32 -> 4)
    for i in range(2):
        path = tmp_path / f"digit-{i}.png"
        image = Image.open(path)
        assert image.size == (4, 4)
        sampling = SamplingConfig(temperature=1.0, seed=3 + i, cfg_scale=1.5, token_range=(100, 116))
        plan = image_plan(4, 4, 4, "shift", "stratified", generator=torch.Generator().manual_seed(3 + i))
        expected = generate_sparse(model, prompt, plan, sampling, SparseOptions(TINY.num_registers)).tokens
        assert torch.equal(codec.encode(image), expected)
    metrics = json.loads(done.stdout.strip().splitlines()[-1].split(" ", 3)[3])
    assert metrics["steps"] == 4 and metrics["mode"] == "sparse"


def test_generate_image_errors_are_one_clear_line(checkpoint, tmp_path):
    missing = run("hi", "--model", str(checkpoint), "--image", str(tmp_path / "nope.png"))
    assert missing.returncode != 0 and "--image: no such file" in missing.stderr
    text_only = make_checkpoint(tmp_path / "text-only")
    refused = run("hi", "--model", str(text_only), "--max-model-len", "128")
    assert refused.returncode != 0 and "serves text only" in refused.stderr
    bad_steps = run("hi", "--model", str(checkpoint), "--steps", "99", "--max-model-len", "128")
    assert bad_steps.returncode != 0 and "steps" in bad_steps.stderr.strip().splitlines()[-1]
