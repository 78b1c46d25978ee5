"""The demo eval's arithmetic by length runs what the server runs for a bare text request at each max_tokens."""

from __future__ import annotations

import pytest

from sparse_lavida_vllm.training.evaluate import ARITHMETIC_LENGTHS, EvalConfig, server_text_params


def test_by_length_plans_are_the_servers_defaults() -> None:
    # max_tokens -> (block_length, steps): block 32 when it divides max_tokens, else max_tokens; half the tokens
    expected = {4: (4, 2), 8: (8, 4), 16: (16, 8), 32: (32, 16), 64: (32, 32)}
    assert tuple(expected) == ARITHMETIC_LENGTHS
    for max_tokens, (block, steps) in expected.items():
        params = server_text_params(max_tokens)
        assert (params.gen_length, params.block_length, params.steps) == (max_tokens, block, steps)
        assert params.sampling.temperature == 0 and params.sampling.remasking == "low_confidence"
        assert params.plan().length == max_tokens and params.plan().num_steps == steps


def test_eval_config_names_a_bad_count() -> None:
    with pytest.raises(ValueError, match="num_text_per_length"):
        EvalConfig(num_text_per_length=-1)
