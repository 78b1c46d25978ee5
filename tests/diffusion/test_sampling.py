"""Sampling knobs: greedy, top-k/top-p, Gumbel temperature, CFG, seeded steps."""

import pytest
import torch

from sparse_lavida_vllm.diffusion.sampling import (
    SamplingConfig,
    cfg_combine,
    constrain_logits,
    filter_logits,
    sample_tokens,
    step_generator,
)


def test_greedy_is_argmax_and_confidence_is_probability():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, conf = sample_tokens(logits, SamplingConfig(), None)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(conf, torch.softmax(logits, -1).max(-1).values)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert not torch.isinf(filter_logits(logits, top_k=2)[0, :2]).any()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    cfg = SamplingConfig(temperature=5.0, top_k=1, seed=0)
    for step in range(20):
        assert sample_tokens(logits, cfg, step_generator(0, step))[0].item() == 0


def test_temperature_sampling_is_seeded_per_step():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0)
    a = sample_tokens(logits, cfg, step_generator(7, 3))[0]
    b = sample_tokens(logits, cfg, step_generator(7, 3))[0]
    draws = {tuple(sample_tokens(logits, cfg, step_generator(7, s))[0].tolist()) for s in range(10)}
    assert torch.equal(a, b) and len(draws) > 1


def test_cfg_combination():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.allclose(cfg_combine(cond, uncond, 4.0), 5 * cond - 4 * uncond)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), cond)


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"cfg_scale": -1}, "cfg_scale"), ({"remasking": "x"}, "remasking"),
    ({"confidence_threshold": 2}, "confidence_threshold"),
])
def test_bad_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_constrain_logits_allowed_ids_bias_and_min_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    only = constrain_logits(logits, allowed_token_ids=[0, 2])
    assert torch.isinf(only[0, [1, 3]]).all() and only[0, 0] == 0 and only[0, 2] == 2
    biased = constrain_logits(logits, logit_bias={0: 10.0})
    assert biased[0].argmax() == 0 and torch.equal(biased[0, 1:], logits[0, 1:])
    # min_p at T = 1: keep p >= min_p * p_max  <=>  logit >= 3 + log(min_p); log(0.3) = -1.2 keeps ids 2 and 3
    kept = ~torch.isinf(constrain_logits(logits, min_p=0.3, temperature=1.0))
    assert kept.tolist() == [[False, False, True, True]]
    probs = torch.softmax(logits, -1)
    assert kept.tolist() == (probs >= 0.3 * probs.max()).tolist()
    assert torch.equal(constrain_logits(logits, min_p=0.3, temperature=0.0), logits)  # greedy: no effect
