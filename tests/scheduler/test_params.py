"""Diffusion knobs: defaults, and each bad value rejected with the field named."""

from types import SimpleNamespace

import pytest

from sparse_lavida_vllm.scheduler.params import DiffusionParamError, parse_params


def sp(max_tokens=32, temperature=0.0, top_p=1.0, top_k=0, seed=None, ignore_eos=False, stop_token_ids=None,
       **extra):
    return SimpleNamespace(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                           ignore_eos=ignore_eos, stop_token_ids=stop_token_ids, extra_args=extra)


def test_defaults_follow_max_tokens_and_checkpoint():
    p = parse_params(sp(max_tokens=64), prompt_len=10, max_model_len=256, default_num_registers=7)
    assert (p.gen_length, p.block_length, p.steps, p.num_registers, p.sparse) == (64, 32, 32, 7, True)
    assert p.plan().num_steps == 32 and p.stop_at_eos
    p = parse_params(sp(max_tokens=12, top_k=-1, seed=5, ignore_eos=True, stop_token_ids=[9]), 3, 256, 4)
    assert (p.block_length, p.steps, p.sampling.top_k, p.sampling.seed, p.stop_at_eos) == (12, 6, 0, 5, False)
    assert p.stop_token_ids == {9}


def test_explicit_knobs():
    p = parse_params(sp(gen_length=24, block_length=8, steps=12, num_registers=0, sparse=False,
                        remasking="threshold", confidence_threshold=0.5), 4, 256, 4)
    assert (p.gen_length, p.block_length, p.steps, p.num_registers, p.sparse) == (24, 8, 12, 0, False)
    assert p.sampling.remasking == "threshold" and p.sampling.confidence_threshold == 0.5


@pytest.mark.parametrize("extra, field", [
    (dict(steps=0), "steps"),
    (dict(steps=64), "steps"),  # > gen_length
    (dict(block_length=5), "block_length"),  # does not divide 32
    (dict(block_length=8, steps=6), "steps"),  # not a multiple of the 4 blocks
    (dict(num_registers=-1), "num_registers"),
    (dict(num_registers=100_000), "num_registers"),
    (dict(remasking="greedy"), "remasking"),
    (dict(confidence_threshold=1.5), "confidence_threshold"),
    (dict(gen_length=250), "gen_length"),  # 10 + 250 > 256
    (dict(sparse="maybe"), "sparse"),
    (dict(steps="many"), "steps"),
    (dict(step=4), "step"),  # unknown knob (a typo) is not silently ignored
])
def test_bad_knobs_name_the_field(extra, field):
    with pytest.raises(DiffusionParamError) as info:
        parse_params(sp(**extra), prompt_len=10, max_model_len=256, default_num_registers=4)
    assert info.value.field == field
    assert field in str(info.value)


def test_bad_standard_fields_name_the_field():
    with pytest.raises(DiffusionParamError) as info:
        parse_params(sp(top_p=0.0), 1, 256, 4)
    assert info.value.field == "top_p"
    for name in ("logprobs", "prompt_logprobs"):  # once a 500 from the runner; now refused up front
        params = sp()
        setattr(params, name, 2)
        with pytest.raises(DiffusionParamError) as info:
            parse_params(params, 1, 256, 4)
        assert info.value.field == name and "not supported" in str(info.value)


def test_min_tokens_bounded_by_gen_length_and_unseeded_requests_get_their_own_seed():
    params = sp(gen_length=16)
    params.min_tokens = 17
    with pytest.raises(DiffusionParamError) as info:
        parse_params(params, 1, 256, 4)
    assert info.value.field == "min_tokens"
    params.min_tokens = 16
    assert parse_params(params, 1, 256, 4).min_tokens == 16
    seeds = {parse_params(sp(), 1, 256, 4).sampling.seed for _ in range(4)}
    assert len(seeds) == 4  # seed=None: a fresh seed per request (n > 1 choices must differ)
    assert parse_params(sp(seed=3), 1, 256, 4).sampling.seed == 3


@pytest.mark.parametrize("name, value", [
    ("presence_penalty", 0.5), ("frequency_penalty", -0.3), ("repetition_penalty", 1.2), ("bad_words", ["no"]),
    ("logprob_token_ids", [3]), ("logprobs", 0),
])
def test_autoregressive_only_fields_are_refused_naming_the_field(name, value):
    params = sp()
    setattr(params, name, value)
    with pytest.raises(DiffusionParamError) as info:
        parse_params(params, 1, 256, 4)
    assert info.value.field == name and "not supported" in str(info.value)
    neutral = sp()
    neutral.presence_penalty, neutral.repetition_penalty, neutral.bad_words = 0.0, 1.0, []
    parse_params(neutral, 1, 256, 4)  # neutral values pass


def test_token_constraints_are_carried():
    params = sp()
    params.allowed_token_ids, params.logit_bias, params.min_p = [5, 6], {7: -2.5}, 0.1
    p = parse_params(params, 1, 256, 4)
    assert (p.allowed_token_ids, p.logit_bias, p.min_p) == ((5, 6), ((7, -2.5),), 0.1)
    params.min_p = 1.5
    with pytest.raises(DiffusionParamError) as info:
        parse_params(params, 1, 256, 4)
    assert info.value.field == "min_p"
