"""LaViDa-O's image drivers: I1 and I2 on the sparse image path (registers, suffix, every CFG and edit branch)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sparse_lavida_vllm.diffusion.masks import inference_step_spans  # noqa: E402
from sparse_lavida_vllm.diffusion.planners import image_plan, text_plan  # noqa: E402
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig, guide_logits  # noqa: E402
from sparse_lavida_vllm.drivers.check import consistency_error  # noqa: E402
from sparse_lavida_vllm.drivers.lavida_o_image import (  # noqa: E402
    edit_branches,
    generate_image_sparse,
    image_context,
    image_step_causal_logits,
)
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_sparse  # noqa: E402
from sparse_lavida_vllm.model_executor.attention import SpanAttention  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_model import ModalKVCache  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import (  # noqa: E402
    random_lavida_o,
)
from tests.model_executor.test_lavida_o_model import (  # noqa: E402
    CODES,
    EDIT,
    GRID,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread


# ---- I2 on the sparse image path ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_registers, suffix", [(0, 0), (3, 0), (3, 2)])
def test_i2_sparse_image_logits_equal_one_algorithm1_forward(num_registers: int, suffix: int) -> None:
    model = random_lavida_o(tiny_config(), seed=5)
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(6))
    tail = torch.randint(2, 45, (suffix,), generator=torch.Generator().manual_seed(9))  # e.g. the closing eot
    plan = image_plan(GRID // 2, GRID // 2, 5, "cosine", "stratified", generator=torch.Generator().manual_seed(7))
    sampling = SamplingConfig(temperature=0.9, seed=8)
    result = generate_image_sparse(model, prompt, plan, sampling, num_registers, suffix_ids=tail)
    assert bool((result.patches < CODES).all())  # every code decoded, from the codebook
    clean: list[torch.Tensor] = []
    for step in result.steps:
        oracle = image_step_causal_logits(model, prompt, result.patches, clean, [step.decode], num_registers,
                                          suffix_ids=tail)[0]
        assert (step.logits - oracle).abs().max().item() <= 1e-5
        clean.append(step.decode)
    # several masked blocks in one Algorithm 1 forward == each alone (multi-path training sequences)
    blocks = [s.decode for s in result.steps]
    together = image_step_causal_logits(model, prompt, result.patches, blocks[:2], blocks[2:], num_registers, tail)
    for block, logits in zip(blocks[2:], together):
        alone = image_step_causal_logits(model, prompt, result.patches, blocks[:2], [block], num_registers, tail)[0]
        assert (alone - logits).abs().max().item() <= 1e-5
    if suffix:  # the suffix is really read: other text after the image changes the first step
        other = generate_image_sparse(model, prompt, plan, sampling, num_registers, suffix_ids=tail.flip(0) + 1)
        assert (other.steps[0].logits - result.steps[0].logits).abs().max().item() > 1e-4


def test_i2_holds_per_cfg_branch() -> None:
    """Guided step logits == the guidance formula over one Algorithm 1 forward per branch prompt."""
    model = random_lavida_o(tiny_config(), seed=15)
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(16))
    plan = image_plan(GRID // 2, GRID // 2, 6, "shift", "stratified", generator=torch.Generator().manual_seed(17))
    sampling = SamplingConfig(temperature=0.8, cfg_scale=4.0, cfg_interval=(0.2, 0.8), seed=18)
    result = generate_image_sparse(model, prompt, plan, sampling, num_registers=3)
    uncond = torch.full_like(prompt, model.config.mask_token_id)
    clean: list[torch.Tensor] = []
    guided = 0
    for k, step in enumerate(result.steps):
        branches = [prompt, uncond] if sampling.guided_at(k, plan.num_steps) else [prompt]
        guided += len(branches) == 2
        per_branch = [image_step_causal_logits(model, pr, result.patches, clean, [step.decode], 3)[0]
                      for pr in branches]
        expected = guide_logits(per_branch, sampling)
        assert (step.logits - expected).abs().max().item() <= 1e-5 * (1 + 2 * sampling.cfg_scale)
        clean.append(step.decode)
    assert 0 < guided < plan.num_steps  # the interval both applied and skipped guidance
    plain = generate_image_sparse(model, prompt, plan, SamplingConfig(temperature=0.8, seed=18), num_registers=3)
    assert plain.forward_rows < result.forward_rows


@pytest.mark.parametrize("enc_use_image_branch", [True, False])
def test_i2_holds_for_every_edit_guidance_branch(enc_use_image_branch: bool) -> None:
    """Edits: cond, uncond and image-only branches each equal one Algorithm 1 forward; guidance combines them."""
    model = random_lavida_o(tiny_config(enc_use_image_branch=enc_use_image_branch), seed=19)
    g = torch.Generator().manual_seed(20)
    n = GRID * GRID // 4
    prompt = torch.cat([torch.randint(2, 45, (2,), generator=g), torch.full((n,), EDIT),
                        torch.randint(2, 45, (3,), generator=g)])
    source_rows = torch.arange(2, 2 + n)
    source_codes = torch.randint(0, CODES, (n, 4), generator=g)
    tail = torch.tensor([7])
    plan = image_plan(GRID // 2, GRID // 2, 4, "shift", "stratified", generator=torch.Generator().manual_seed(21))
    sampling = SamplingConfig(temperature=0.8, cfg_scale=1.2, image_cfg_scale=1.4, seed=22)
    result = generate_image_sparse(model, prompt, plan, sampling, 3, suffix_ids=tail, source_rows=source_rows,
                                   source_codes=source_codes)
    cond = image_context(model.config, prompt, tail, source_rows, source_codes)
    uncond, image_only = edit_branches(model.config, cond)
    assert bool((image_only.suffix_ids == model.config.mask_token_id).all())  # LaViDa-O masks every text row
    clean: list[torch.Tensor] = []
    gain = (1 + sampling.cfg_scale) * (1 + 2 * sampling.image_cfg_scale) + sampling.cfg_scale
    for step in result.steps:
        per_branch = [image_step_causal_logits(model, ctx, result.patches, clean, [step.decode], 3)[0]
                      for ctx in (cond, uncond, image_only)]
        assert (step.logits - guide_logits(per_branch, sampling)).abs().max().item() <= 1e-5 * gain
        clean.append(step.decode)
    # the source image is really read
    other = generate_image_sparse(model, prompt, plan, sampling, 3, suffix_ids=tail, source_rows=source_rows,
                                  source_codes=(source_codes + 1) % CODES)
    assert (other.steps[0].logits - result.steps[0].logits).abs().max().item() > 1e-4


def test_edits_refuse_what_is_not_published() -> None:
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(1))
    rows, codes = torch.tensor([1, 2]), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="gen_enc_add_pos_emb"):
        image_context(tiny_config(gen_enc_add_pos_emb=True), prompt, None, rows, codes)
    model = random_lavida_o(tiny_config(), seed=2)
    plan = image_plan(2, 2, 2, "linear", "raster")
    with pytest.raises(ValueError, match="source image"):
        generate_image_sparse(model, prompt, plan, SamplingConfig(cfg_scale=1.0, image_cfg_scale=1.0), 0)


def test_i1_cached_image_kv_never_depends_on_masks_or_registers() -> None:
    model = random_lavida_o(tiny_config(), seed=10)
    cfg = model.config
    prompt = torch.randint(2, 45, (5,), generator=torch.Generator().manual_seed(11))
    committed = torch.randint(0, CODES, (3, 4), generator=torch.Generator().manual_seed(12))

    def cache_after_step(decode: torch.Tensor, decode_codes: torch.Tensor, registers: int) -> torch.Tensor:
        cache = ModalKVCache(cfg.n_layers, 40, cfg.n_kv_heads, cfg.head_dim)
        model(prompt, torch.arange(5), SpanAttention(None, cache, 5), logits_rows=torch.empty(0, dtype=torch.long))
        cache.advance(5)
        codes = torch.cat([committed, decode_codes, torch.full((registers, 4), cfg.register_code)])
        positions = torch.cat([5 + torch.tensor([0, 5, 9]), 5 + decode, torch.arange(21, 21 + registers)])
        rows = torch.arange(codes.shape[0])
        spans = inference_step_spans(cache.length, rows.numel(), num_commit=3)
        model.image_logits(torch.zeros_like(rows), positions, SpanAttention(spans, cache, 3), rows[3:4], rows, codes)
        cache.advance(3)
        return torch.stack([cache.k[:, :, :8], cache.v[:, :, :8]])

    mask = torch.full((4, 4), cfg.mask_code)
    base = cache_after_step(torch.tensor([1, 2, 3, 4]), mask, 3)
    for decode, codes, registers in [
        (torch.tensor([1, 2, 3, 4]), torch.randint(0, CODES, (4, 4)), 3),  # other contents in the decode rows
        (torch.tensor([7, 8]), mask[:2], 0),  # another decode set, no registers
        (torch.tensor([1, 2, 3, 4, 6, 10]), torch.full((6, 4), cfg.mask_code), 5),  # more rows, more registers
    ]:
        assert torch.allclose(cache_after_step(decode, codes, registers), base, atol=1e-6)


def test_text_requests_run_through_the_reference_samplers() -> None:
    """Text rows only: the engine's own sparse sampler and Algorithm 1 oracle apply unchanged (I2 for text)."""
    model = random_lavida_o(tiny_config(), seed=13)
    prompt = torch.randint(2, 45, (5,), generator=torch.Generator().manual_seed(14))
    sampling = SamplingConfig(temperature=0.7, seed=3)
    assert consistency_error(model, prompt, text_plan(8, 4, 4), sampling, num_registers=2) <= 1e-5
    result = generate_sparse(model, prompt, text_plan(8, 4, 4), sampling, SparseOptions(num_registers=2))
    assert bool((result.tokens != model.config.mask_token_id).all())


def test_sparse_image_path_feeds_fewer_rows_than_positions_times_steps() -> None:
    model = random_lavida_o(tiny_config(), seed=9)
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(1))
    plan = image_plan(GRID // 2, GRID // 2, 4, "linear", "raster")
    result = generate_image_sparse(model, prompt, plan, SamplingConfig(seed=2), num_registers=3)
    dense_rows = plan.num_steps * (prompt.numel() + plan.length)
    assert result.forward_rows < dense_rows
    with pytest.raises(ValueError, match="register_code"):
        generate_image_sparse(random_lavida_o(tiny_config(register_code=None)), prompt, plan, SamplingConfig(), 2)
