"""Knob validation at the edges (non-finite, boolean, 64-bit overflow) and the operator's caps (Limits)."""

import math
from types import SimpleNamespace

import pytest
from vllm import SamplingParams

from sparse_lavida_vllm.scheduler.params import DiffusionParamError, Limits, parse_params


def sp(max_tokens: int = 16, **extra) -> SimpleNamespace:
    """What the engine hands the scheduler (SamplingParams itself refuses extra_args past 64 bits)."""
    return SimpleNamespace(max_tokens=max_tokens, extra_args=extra or None)


@pytest.mark.parametrize("knob", ["steps", "block_length", "gen_length", "num_registers"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, True, False, 2**63, -(2**63) - 1, "1e400", 2.5,
                                   [4], {"a": 1}])
def test_integer_knobs_refuse_non_finite_boolean_and_huge_values_naming_the_knob(knob, value):
    with pytest.raises(DiffusionParamError) as info:
        parse_params(sp(**{knob: value}), prompt_len=4, max_model_len=256, default_num_registers=2)
    assert info.value.field == knob and knob in str(info.value)
    assert len(str(info.value)) < 200  # a 300-digit number is not echoed back


@pytest.mark.parametrize("knob, value", [("sparse", 2), ("sparse", math.nan), ("sparse", "yes"),
                                         ("confidence_threshold", math.nan), ("confidence_threshold", math.inf),
                                         ("confidence_threshold", True), ("remasking", "true")])
def test_other_knobs_refuse_bad_values_naming_the_knob(knob, value):
    with pytest.raises(DiffusionParamError) as info:
        parse_params(sp(**{knob: value}), 4, 256, 2)
    assert info.value.field == knob


@pytest.mark.parametrize("field, value", [("top_k", 2**64 - 1), ("seed", 2**64 - 1), ("stop_token_ids", [2**64 - 1])])
def test_standard_integers_past_64_bits_are_refused(field, value):
    with pytest.raises(DiffusionParamError) as info:  # once an empty HTTP 500 from the engine's transport
        parse_params(SamplingParams(max_tokens=16, **{field: value}), 4, 256, 2)
    assert info.value.field == field


def test_integral_floats_and_numeric_strings_still_work():
    p = parse_params(sp(steps=8.0, block_length="8", sparse="false"), 4, 256, 2)
    assert (p.steps, p.block_length, p.sparse) == (8, 8, False)


CAPS = Limits(max_steps=32, max_num_registers=8, max_step_rows=64, max_request_rows=1000)


@pytest.mark.parametrize("knobs, cap, field", [
    (dict(gen_length=64, block_length=64, steps=64), "max_steps", "steps"),
    (dict(num_registers=9), "max_num_registers", "num_registers"),
    (dict(gen_length=64, block_length=64, steps=16, num_registers=1), "max_step_rows", "block_length"),
    (dict(gen_length=60, steps=30, sparse=False), "max_step_rows", "gen_length"),
    (dict(gen_length=32, block_length=32, steps=32, num_registers=8), "max_request_rows", "steps"),
])
def test_a_request_over_a_cap_is_refused_naming_the_knob_and_the_cap(knobs, cap, field):
    with pytest.raises(DiffusionParamError) as info:
        parse_params(sp(max_tokens=knobs.get("gen_length", 16), **knobs), 8, 256, 2, limits=CAPS)
    assert info.value.field == field and cap in str(info.value) and "--additional-config" in str(info.value)


def test_requests_at_the_caps_pass_and_registers_do_not_count_when_dense():
    parse_params(sp(max_tokens=32, gen_length=32, block_length=8, steps=32, num_registers=8), 8, 256, 2,
                 limits=Limits(max_steps=32, max_num_registers=8, max_step_rows=16, max_request_rows=32 * 16 + 40))
    parse_params(sp(max_tokens=16, sparse=False, num_registers=200), 8, 256, 2, limits=CAPS)


def test_default_caps_refuse_the_monopolising_request_and_admit_paper_settings():
    limits = Limits()
    with pytest.raises(DiffusionParamError):  # the example: minutes of engine time for one request
        parse_params(sp(max_tokens=1000, gen_length=1000, block_length=1000, steps=1000, num_registers=1024),
                     16, 4096, 32, limits=limits)
    # LLaDA's usual text settings and a dense baseline of the same length fit
    parse_params(sp(max_tokens=256, block_length=32, steps=128, num_registers=64), 200, 4096, 32, limits=limits)
    parse_params(sp(max_tokens=256, steps=256, sparse=False), 200, 4096, 32, limits=limits)


@pytest.mark.parametrize("config", [{"max_steps": 0}, {"max_steps": True}, {"max_request_rows": "big"},
                                    {"max_num_registers": 1.5}])
def test_bad_operator_caps_are_a_startup_error_naming_the_key(config):
    with pytest.raises(ValueError, match=next(iter(config))):
        Limits.from_config(config)


def test_caps_come_from_additional_config_and_other_keys_are_ignored():
    assert Limits.from_config({"max_steps": 7, "flat_batch": True}) == Limits(max_steps=7)
    assert Limits.from_config(None) == Limits()
