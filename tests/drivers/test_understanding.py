"""LaViDa-O image understanding through the text samplers: answers reproducible from the seed, dense and sparse; I2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")

from sparse_lavida_vllm.diffusion.planners import text_plan  # noqa: E402
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig  # noqa: E402
from sparse_lavida_vllm.drivers.check import consistency_error  # noqa: E402
from sparse_lavida_vllm.drivers.text import SparseOptions  # noqa: E402
from sparse_lavida_vllm.drivers.understanding import ImagePromptModel, generate_understanding  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_vision import IMAGE_TOKEN_INDEX, understanding_prompt  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import load_lavida_o, write_tiny_checkpoint  # noqa: E402
from tests.model_executor.test_lavida_o_vision import config, picture  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread


def test_an_image_question_is_answered_deterministically(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, config(), seed=9)
    model = load_lavida_o(tmp_path)
    mask = model.config.mask_token_id
    prompt = understanding_prompt(model, torch.tensor([3, IMAGE_TOKEN_INDEX, 4, 5]), [picture(50, 23, 3)])
    plan, sampling = text_plan(8, 4, 4), SamplingConfig(temperature=1.0, seed=11)
    first = generate_understanding(model, prompt, plan, sampling).tokens
    assert first.shape == (8,) and bool((first != mask).all())
    assert torch.equal(generate_understanding(model, prompt, plan, sampling).tokens, first)
    others = [generate_understanding(model, prompt, plan, SamplingConfig(temperature=1.0, seed=s)).tokens
              for s in (12, 13)]
    assert any(not torch.equal(o, first) for o in others)  # the seed is what fixes it
    # the publishers' prefix_lm generate (prompt prefilled, attends to itself): the sparse sampler with caches
    prefix_lm = SparseOptions(num_registers=0, cache_prompt=True, cache_response=False, truncate=False)
    sparse = generate_understanding(model, prompt, plan, sampling, prefix_lm).tokens
    assert bool((sparse != mask).all())
    assert torch.equal(generate_understanding(model, prompt, plan, sampling, prefix_lm).tokens, sparse)
    # image rows are prompt rows: Sparse-LaViDa's cached, truncated, registered path keeps I2
    wrapped = ImagePromptModel(model, prompt)
    assert consistency_error(wrapped, prompt.ids, plan, SamplingConfig(temperature=0.7, seed=3), num_registers=2) \
        <= 1e-5
