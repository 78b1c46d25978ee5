"""The step budget (max_num_batched_tokens) and the operator's caps hold in the offline engine too."""

import pytest

from tests.scheduler.test_scheduler import REQUESTS, alone, drain, params
from tests.serving_helpers import engine_scheduler, set_vllm_env, shared_llm

set_vllm_env()


@pytest.fixture
def recorded_steps():
    """The shared engine's scheduler, each step's output recorded; the budget and schedule() restored after."""
    llm, folder = shared_llm()
    sched = engine_scheduler(llm)
    budget, schedule, seen = sched.max_num_scheduled_tokens, sched.schedule, []

    def recording(*args, **kwargs):
        output = schedule(*args, **kwargs)
        seen.append((output, len(sched.running)))  # the step, and how many requests were running then
        return output

    sched.schedule = recording
    yield llm, folder, sched, seen
    sched.schedule, sched.max_num_scheduled_tokens = schedule, budget


def test_a_step_stays_within_the_budget_and_nobody_s_tokens_change(recorded_steps):
    from vllm.inputs import TokensPrompt

    llm, folder, sched, seen = recorded_steps
    sched.max_num_scheduled_tokens = 48  # a few requests' steps per engine step, not all eight
    for i, (prompt, knobs) in enumerate(REQUESTS):
        llm.llm_engine.add_request(f"b{i}", TokensPrompt(prompt_token_ids=prompt), params(knobs))
    finished = {}
    drain(llm.llm_engine, finished)
    steps = [(output, running) for output, running in seen if output.steps]
    left_out = 0
    for output, running in steps:
        rows = output.num_scheduled_tokens
        # within the budget, or a single request larger than the budget running alone
        assert output.total_num_scheduled_tokens <= 48 or len(rows) == 1, rows
        left_out += len(rows) < running
    assert left_out > 0  # the budget did leave running requests out of some steps (else this tests nothing)
    assert max(len(output.num_scheduled_tokens) for output, _ in steps) > 1  # and still batched
    for i, (prompt, knobs) in enumerate(REQUESTS):
        assert list(finished[f"b{i}"].outputs[0].token_ids) == alone(folder, prompt, knobs), i
    assert sched.num_free_blocks() == sched.num_blocks_total  # I5


def test_an_offline_request_over_an_operator_cap_is_refused_naming_the_knob(recorded_steps):
    """The LLM class's add_request refuses it (the plugin's check, as the API server's 400); a request that reaches
    the engine core past that check finishes as an error from the scheduler's own copy of the caps."""
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    from sparse_lavida_vllm.scheduler.params import Limits

    llm, _, sched, _ = recorded_steps
    additional = llm.llm_engine.vllm_config.additional_config
    knobs = dict(gen_length=8, block_length=8, steps=4, num_registers=4)
    additional["max_num_registers"] = 3
    try:
        with pytest.raises(VLLMValidationError, match="num_registers .* exceeds the server limit max_num_registers"):
            llm.llm_engine.add_request("over", TokensPrompt(prompt_token_ids=[5, 6]), params(knobs))
    finally:
        del additional["max_num_registers"]
    limits, sched.limits = sched.limits, Limits(max_num_registers=3)
    try:
        llm.llm_engine.add_request("over", TokensPrompt(prompt_token_ids=[5, 6]), params(knobs))
        finished = {}
        drain(llm.llm_engine, finished)
    finally:
        sched.limits = limits
    assert finished["over"].outputs[0].finish_reason == "error"
    assert list(finished["over"].outputs[0].token_ids) == []
    assert sched.num_free_blocks() == sched.num_blocks_total
