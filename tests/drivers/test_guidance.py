"""Image requests in the reference samplers: CFG branches (I2 per branch), guidance interval, inpainting, schedules."""

import pytest
import torch

from sparse_lavida_vllm.diffusion.planners import image_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig, cfg_combine, guide_logits
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse, step_causal_logits
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import random_model

CONFIG = MDMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128,
                   mask_token_id=62, register_token_id=63, eos_token_id=1)
MASK = CONFIG.mask_token_id


def model_and_prompt(seed: int = 0):
    model = random_model(CONFIG, seed=seed, std=0.1)
    prompt = torch.randint(2, 40, (6,), generator=torch.Generator().manual_seed(seed))
    return model, prompt


def edit_branches(prompt: torch.Tensor, span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """LaViDa-O's uncond (prompt all masks) and image-only (text masked, source image kept) prompts."""
    image_only = torch.full_like(prompt, MASK)
    image_only[span[0]:span[1]] = prompt[span[0]:span[1]]
    return torch.full_like(prompt, MASK), image_only


def test_cfg_combine_is_lavida_o_formula():
    cond, uncond, image = torch.randn(3, 5, 7).unbind(0)
    assert torch.allclose(cfg_combine(cond, uncond, 2.0), 3 * cond - 2 * uncond)
    # edits: cond pushed from the image-only branch first, then guided against uncond
    expected = 3 * (2.5 * cond - 1.5 * image) - 2 * uncond
    assert torch.allclose(cfg_combine(cond, uncond, 2.0, image, 1.5), expected)
    sampling = SamplingConfig(cfg_scale=2.0, image_cfg_scale=1.5)
    assert torch.allclose(guide_logits([cond, uncond, image], sampling), expected)
    assert torch.equal(guide_logits([cond], sampling), cond)  # outside the guidance interval: cond alone


@pytest.mark.parametrize("image_scale", [0.0, 1.5])
@pytest.mark.parametrize("num_registers", [0, 4])
def test_i2_every_cfg_branch_equals_one_algorithm1_forward(image_scale, num_registers):
    """Each step's guided logits == the guidance formula over one Algorithm 1 forward per branch prompt."""
    model, prompt = model_and_prompt(1)
    span = (1, 4)
    uncond, image_only = edit_branches(prompt, span)
    sampling = SamplingConfig(temperature=0.9, cfg_scale=2.0, image_cfg_scale=image_scale, seed=3,
                              cfg_interval=(0.2, 0.8))
    plan = image_plan(4, 4, 6, "cosine", "stratified", generator=torch.Generator().manual_seed(3))
    result = generate_sparse(model, prompt, plan, sampling, SparseOptions(num_registers), record_logits=True,
                             image_only_prompt_ids=image_only if image_scale else None)
    branches = [prompt, uncond] + ([image_only] if image_scale else [])
    clean: list[torch.Tensor] = []
    guided_steps = 0
    for k, trace in enumerate(result.steps):
        guided = sampling.guided_at(k, plan.num_steps)
        guided_steps += guided
        per_branch = [step_causal_logits(model, pr, result.tokens, clean, [trace.decode], num_registers)[0]
                      for pr in (branches if guided else branches[:1])]
        expected = guide_logits(per_branch, sampling)
        # I2 holds per branch (<= 1e-5); guidance sums branches with weights up to (1+g)(1+2 g_img) + g
        gain = (1 + sampling.cfg_scale) * (1 + 2 * image_scale) + sampling.cfg_scale if guided else 1.0
        assert (trace.logits - expected).abs().max().item() <= 1e-5 * gain
        clean.append(trace.chosen)
    assert 0 < guided_steps < plan.num_steps  # the interval both applied and skipped guidance


def test_guidance_interval_skips_companion_decode_rows():
    model, prompt = model_and_prompt(2)
    plan = image_plan(4, 4, 4, "linear", "raster")
    always = generate_sparse(model, prompt, plan, SamplingConfig(cfg_scale=1.0), SparseOptions(2))
    half = generate_sparse(model, prompt, plan, SamplingConfig(cfg_scale=1.0, cfg_interval=(0.5, 1.0)),
                           SparseOptions(2))
    none = generate_sparse(model, prompt, plan, SamplingConfig(), SparseOptions(2))
    assert none.forward_tokens < half.forward_tokens < always.forward_tokens
    dense = generate_dense(model, prompt, plan, SamplingConfig(cfg_scale=1.0, cfg_interval=(0.5, 1.0)))
    assert [s.forward_tokens for s in dense.steps] == [22, 44, 44, 44]  # int(0.5 * 4) = 2 <= step + 1


@pytest.mark.parametrize("dense", [False, True])
def test_inpainting_never_changes_a_given_token(dense):
    model, prompt = model_and_prompt(3)
    given = torch.randint(10, 20, (16,), generator=torch.Generator().manual_seed(0))
    repaint = torch.zeros(16, dtype=torch.bool)
    repaint[[1, 2, 5, 6, 9, 10]] = True
    init = torch.where(repaint, torch.full_like(given, MASK), given)
    plan = image_plan(4, 4, 3, "shift", "stratified", generator=torch.Generator().manual_seed(1), masked=repaint)
    assert sorted(torch.cat([s.positions for s in plan.stages]).tolist()) == [1, 2, 5, 6, 9, 10]
    sampling = SamplingConfig(temperature=1.0, cfg_scale=1.0, seed=4, token_range=(20, 40))
    sample = generate_dense if dense else generate_sparse
    result = sample(model, prompt, plan, sampling, response_init=init)
    assert torch.equal(result.tokens[~repaint], given[~repaint])
    assert bool(((result.tokens[repaint] >= 20) & (result.tokens[repaint] < 40)).all())  # the codebook only


def test_sparse_and_dense_agree_with_guidance_when_nothing_is_truncated():
    """I3 with CFG: caches and truncation off, no registers == the dense sampler, token for token (fp64)."""
    model, prompt = model_and_prompt(4)
    model = model.double()
    plan = image_plan(4, 4, 5, "cosine", "random", generator=torch.Generator().manual_seed(2))
    sampling = SamplingConfig(temperature=1.0, cfg_scale=1.5, seed=9, cfg_interval=(0.0, 0.6))
    off = SparseOptions(num_registers=0, cache_prompt=False, cache_response=False, truncate=False)
    assert torch.equal(generate_sparse(model, prompt, plan, sampling, off).tokens,
                       generate_dense(model, prompt, plan, sampling).tokens)


def test_temperature_schedules_decay_to_the_minimum():
    s = SamplingConfig(temperature=0.8, min_temperature=0.5, temperature_schedule="cosine")
    temps = [s.at_step(k, 5).temperature for k in range(5)]
    assert temps[0] == pytest.approx(0.8) and temps[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(temps, temps[1:]))
    linear = SamplingConfig(temperature=1.0, min_temperature=0.0, temperature_schedule="linear")
    assert [linear.at_step(k, 3).temperature for k in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    assert SamplingConfig(temperature=0.7).at_step(3, 9).temperature == 0.7


@pytest.mark.parametrize("kwargs, field", [
    ({"cfg_interval": (0.6, 0.2)}, "cfg_interval"), ({"image_cfg_scale": -1.0}, "image_cfg_scale"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature_schedule": "zigzag"}, "temperature_schedule"),
    ({"temperature": 0.5, "min_temperature": 0.9}, "min_temperature"), ({"token_range": (5, 5)}, "token_range"),
])
def test_sampling_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_three_way_guidance_needs_the_image_only_prompt():
    model, prompt = model_and_prompt(5)
    plan = image_plan(2, 2, 2, "linear", "raster")
    with pytest.raises(ValueError, match="image_only_prompt_ids"):
        generate_sparse(model, prompt, plan, SamplingConfig(cfg_scale=1.0, image_cfg_scale=1.0))
