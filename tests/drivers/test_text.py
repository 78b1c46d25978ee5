"""The invariants of the reference samplers: I1 (cache purity), I2 (Algorithm 1 consistency), I3 (dense equivalence)."""

import json

import pytest
import torch

from sparse_lavida_vllm.cli import main
from sparse_lavida_vllm.diffusion.masks import inference_step_spans
from sparse_lavida_vllm.diffusion.planners import image_plan, text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.check import consistency_error
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse, step_causal_logits
from sparse_lavida_vllm.model_executor.attention import KVCache, SpanAttention
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import random_model

CONFIG = MDMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128,
                   mask_token_id=62, register_token_id=63, eos_token_id=1)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    return random_model(CONFIG, seed=seed, std=0.1).to(dtype)


def prompt(seed: int = 0, n: int = 5) -> torch.Tensor:
    return torch.randint(2, 60, (n,), generator=torch.Generator().manual_seed(seed))


def plans():
    g = torch.Generator().manual_seed(0)
    return {
        "text": text_plan(16, 4, 8),
        "text_threshold": text_plan(16, 8, 4),
        "image_stratified": image_plan(4, 4, 5, "cosine", "stratified", generator=g),
        "image_random": image_plan(4, 4, 6, "shift", "random", generator=g),
    }


@pytest.mark.parametrize("plan_name", list(plans()))
@pytest.mark.parametrize("num_registers", [0, 1, 4])
def test_i2_sparse_logits_equal_one_algorithm1_forward(plan_name, num_registers):
    model, p = tiny_model(1), prompt(1)
    remasking = "threshold" if plan_name == "text_threshold" else "low_confidence"
    sampling = SamplingConfig(temperature=0.8, seed=5, remasking=remasking, confidence_threshold=0.05)
    assert consistency_error(model, p, plans()[plan_name], sampling, num_registers) <= 1e-5


def test_check_consistency_command_reports_json(capsys):
    assert main(["check", "consistency", "--cases", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 4 and 0 <= report["max_abs_diff"] <= 1e-5  # 0 since attention is canonical


def test_i2_multi_path_one_forward_equals_each_block_alone():
    model, p = tiny_model(2), prompt(2, 6)
    response = torch.randint(2, 60, (24,), generator=torch.Generator().manual_seed(3))
    order = torch.randperm(24, generator=torch.Generator().manual_seed(4))
    clean = [order[:5], order[5:9], order[9:12]]
    masked = [order[12:16], order[16:17], order[17:24]]
    together = step_causal_logits(model, p, response, clean, masked, num_registers=3)
    for block, logits in zip(masked, together):
        alone = step_causal_logits(model, p, response, clean, [block], num_registers=3)[0]
        assert (alone - logits).abs().max().item() <= 1e-5


def test_i1_cached_kv_never_depends_on_masks_or_registers():
    model, p = tiny_model(3), prompt(3)
    cfg = CONFIG
    commit_ids, commit_pos = torch.tensor([7, 8, 9]), torch.tensor([5, 7, 9])

    def cache_after_step(decode_ids, decode_pos, registers):
        cache = KVCache(cfg.n_layers, 32, cfg.n_kv_heads, cfg.head_dim)
        model(p, torch.arange(5), SpanAttention(None, cache, 5))
        cache.advance(5)
        reg_pos = torch.arange(21, 21 + registers)
        ids = torch.cat([commit_ids, decode_ids, torch.full((registers,), cfg.register_token_id)])
        pos = torch.cat([commit_pos, decode_pos, reg_pos])
        spans = inference_step_spans(cache.length, ids.numel(), num_commit=3)
        model(ids, pos, SpanAttention(spans, cache, 3), torch.arange(3, 3 + decode_ids.numel()))
        cache.advance(3)
        return cache.k[:, :, :8].clone(), cache.v[:, :, :8].clone()

    base_k, base_v = cache_after_step(torch.full((4,), cfg.mask_token_id), torch.tensor([6, 8, 10, 11]), 4)
    for ids, pos, regs in [
        (torch.randint(0, 60, (4,)), torch.tensor([6, 8, 10, 11]), 4),  # perturbed mask tokens
        (torch.full((2,), cfg.mask_token_id), torch.tensor([12, 15]), 0),  # other decode set, no registers
        (torch.full((6,), cfg.mask_token_id), torch.tensor([6, 8, 10, 11, 12, 13]), 9),  # more registers
    ]:
        k, v = cache_after_step(ids, pos, regs)
        assert torch.allclose(k, base_k, atol=1e-6) and torch.allclose(v, base_v, atol=1e-6)


@pytest.mark.parametrize("plan_name", list(plans()))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_i3_everything_off_is_the_dense_mdm_token_for_token(plan_name, temperature):
    model, p = tiny_model(4, torch.float64), prompt(4)
    remasking = "threshold" if plan_name == "text_threshold" else "low_confidence"
    sampling = SamplingConfig(temperature=temperature, seed=11, remasking=remasking, confidence_threshold=0.05)
    dense = generate_dense(model, p, plans()[plan_name], sampling)
    off = generate_sparse(model, p, plans()[plan_name], sampling, SparseOptions(0, False, False, False))
    assert torch.equal(dense.tokens, off.tokens)
    assert [s.chosen.tolist() for s in dense.steps] == [s.chosen.tolist() for s in off.steps]
    assert dense.forward_tokens == off.forward_tokens


def test_sparse_feeds_fewer_tokens_and_cache_axes_keep_tokens():
    model, p = tiny_model(5), prompt(5)
    plan = image_plan(4, 4, 8, "linear", generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(seed=1)
    dense = generate_dense(model, p, plan, sampling)
    full = generate_sparse(model, p, plan, sampling, SparseOptions(num_registers=2))
    assert full.forward_tokens < dense.forward_tokens
    # caching only changes where K/V come from when nothing else changes: with truncation off and
    # both caches on vs prompt cache only, every variant still decodes every position
    variants = [SparseOptions(2, True, True, False), SparseOptions(2, False, True, True),
                SparseOptions(2, True, False, True)]
    for opts in variants:
        result = generate_sparse(model, p, plan, sampling, opts)
        assert (result.tokens != CONFIG.mask_token_id).all()
    no_prompt_cache = generate_sparse(model, p, plan, sampling, SparseOptions(2, cache_prompt=False))
    assert no_prompt_cache.forward_tokens > full.forward_tokens


def test_cfg_and_infilling():
    model, p = tiny_model(6), prompt(6)
    plan = image_plan(4, 4, 4, generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(cfg_scale=3.0, seed=2)
    guided = generate_sparse(model, p, plan, sampling, SparseOptions(2), record_logits=True)
    assert guided.steps[0].forward_tokens == 2 * (len(guided.steps[0].decode) + 2)
    plain = generate_sparse(model, p, plan, SamplingConfig(seed=2), SparseOptions(2), record_logits=True)
    assert not torch.allclose(guided.steps[0].logits, plain.steps[0].logits)
    # infilling: given tokens stay, only masked positions are decoded, blocks in any order
    response = torch.randint(2, 60, (16,), generator=torch.Generator().manual_seed(7))
    masked = torch.zeros(16, dtype=torch.bool)
    masked[[1, 2, 9, 14, 15]] = True
    init = response.masked_fill(masked, CONFIG.mask_token_id)
    plan = text_plan(16, 4, 8, block_order=[3, 0, 2, 1], masked=masked)
    for gen in (generate_dense, generate_sparse):
        out = gen(model, p, plan, SamplingConfig(seed=3), response_init=init)
        assert torch.equal(out.tokens[~masked], response[~masked])
        assert (out.tokens[masked] != CONFIG.mask_token_id).all()
    with pytest.raises(ValueError, match="plan"):
        generate_sparse(model, p, text_plan(16, 4, 8), SamplingConfig(), response_init=init)
