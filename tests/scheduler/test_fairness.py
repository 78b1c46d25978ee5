"""Fairness: a request with many rows per step sits some steps out while small ones run; nobody's tokens change."""

from tests.serving_helpers import engine_scheduler, reference_tokens, set_vllm_env, shared_llm

set_vllm_env()

BIG = ([5, 6, 7], dict(gen_length=128, block_length=128, steps=32, num_registers=200))  # ~300 rows per step
SMALL = ([8, 9, 10], dict(gen_length=16, block_length=8, steps=8, num_registers=2))  # ~20 rows per step


def params(knobs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=knobs["gen_length"], temperature=0, ignore_eos=True, extra_args=dict(knobs))


def test_a_large_request_runs_every_other_step_next_to_a_small_one_and_keeps_its_tokens():
    from vllm.inputs import TokensPrompt

    llm, folder = shared_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    assert sched.fair_step_rows == 256  # the default
    sched.batch_sizes.clear()
    engine.add_request("big", TokensPrompt(prompt_token_ids=BIG[0]), params(BIG[1]))
    for _ in range(3):  # alone, the large request runs every step
        engine.step()
    assert sched.batch_sizes == [1, 1, 1]
    engine.add_request("small", TokensPrompt(prompt_token_ids=SMALL[0]), params(SMALL[1]))
    finished, steps_with_small = {}, 0
    while engine.has_unfinished_requests():
        steps_with_small += "small" not in finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    # the small one ran every step (8 steps) and the large one in about half of them
    assert steps_with_small == SMALL[1]["steps"]
    sizes = sched.batch_sizes[3:3 + steps_with_small]
    assert sizes.count(1) >= SMALL[1]["steps"] // 2 - 1 and 2 in sizes
    assert sum(sched.batch_sizes) == BIG[1]["steps"] + SMALL[1]["steps"]  # every request ran all its steps
    for name, (prompt, knobs) in (("big", BIG), ("small", SMALL)):
        expected = reference_tokens(folder, prompt, knobs["gen_length"], knobs["block_length"], knobs["steps"],
                                    knobs["num_registers"])
        assert list(finished[name].outputs[0].token_ids) == expected, name
    assert sched.num_free_blocks() == sched.num_blocks_total  # I5
