"""Continuous batching, admission under a small KV pool, and I5 (every block back in the pool) in a real engine."""

from tests.serving_helpers import engine_scheduler, reference_tokens, set_vllm_env, shared_llm

set_vllm_env()

# (prompt, knobs): different prompt lengths, lengths, step counts, register counts and modes
REQUESTS = [
    ([11, 12, 13], dict(gen_length=16, block_length=8, steps=8, num_registers=4)),
    ([21, 22, 23, 24, 25, 26, 27, 28, 29], dict(gen_length=8, block_length=4, steps=4, num_registers=0)),
    ([31, 32], dict(gen_length=24, block_length=8, steps=12, num_registers=2)),
    ([41, 42, 43, 44], dict(gen_length=16, block_length=16, steps=4, num_registers=1)),
    ([51, 52, 53, 54, 55], dict(gen_length=12, block_length=4, steps=6, num_registers=3, sparse=False)),
    ([61] * 6, dict(gen_length=32, block_length=8, steps=16, num_registers=4)),
    ([71, 72, 73], dict(gen_length=8, block_length=8, steps=8, num_registers=0)),
    ([81, 82, 83, 84, 85, 86, 87], dict(gen_length=20, block_length=4, steps=10, num_registers=2)),
]


def params(knobs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=knobs["gen_length"], temperature=0, ignore_eos=True, extra_args=dict(knobs))


def alone(folder, prompt, knobs):
    knobs = dict(knobs)
    sparse = knobs.pop("sparse", True)
    return reference_tokens(folder, prompt, knobs["gen_length"], knobs["block_length"], knobs["steps"],
                            knobs["num_registers"], sparse=sparse)


def drain(engine, finished):
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out


def test_requests_join_mid_generation_and_match_running_alone():
    from vllm.inputs import TokensPrompt

    llm, folder = shared_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    sched.batch_sizes.clear()
    finished = {}
    for i, (prompt, knobs) in enumerate(REQUESTS[:3]):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=prompt), params(knobs))
    for _ in range(2):  # the first three are mid-generation when the others arrive
        for out in engine.step():
            assert not out.finished
    for i, (prompt, knobs) in enumerate(REQUESTS[3:], start=3):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=prompt), params(knobs))
    drain(engine, finished)

    assert sorted(finished) == sorted(f"r{i}" for i in range(len(REQUESTS)))
    for i, (prompt, knobs) in enumerate(REQUESTS):
        assert list(finished[f"r{i}"].outputs[0].token_ids) == alone(folder, prompt, knobs), f"r{i}"
    sizes = sched.batch_sizes
    assert sizes[:2] == [3, 3]  # two steps of the first three
    assert max(sizes) >= 6  # new requests joined a running batch (the 24-block pool limits how many at once)
    assert sum(sizes) == sum(k["steps"] for _, k in REQUESTS)  # one step per running request per engine step
    assert sched.num_free_blocks() == sched.num_blocks_total  # I5


def test_requests_queue_when_blocks_run_out():
    from vllm.inputs import TokensPrompt

    llm, folder = shared_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    sched.batch_sizes.clear()
    # each needs ceil((10 + 96) / 16) = 7 blocks of the 23: three fit, the fourth waits
    knobs = dict(gen_length=96, block_length=32, steps=6, num_registers=2)
    prompts = [[90 + i] * 10 for i in range(4)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", TokensPrompt(prompt_token_ids=prompt), params(knobs))
    finished = {}
    engine.step()
    assert sched.batch_sizes[-1] == 3 and len(sched.waiting) == 1
    drain(engine, finished)
    assert sched.batch_sizes.count(3) == 6 and sched.batch_sizes[-1] == 1
    for i, prompt in enumerate(prompts):
        assert list(finished[f"q{i}"].outputs[0].token_ids) == alone(folder, prompt, knobs)
    assert sched.num_free_blocks() == sched.num_blocks_total


def test_aborts_return_every_block():
    from vllm.inputs import TokensPrompt

    llm, _ = shared_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    knobs = dict(gen_length=32, block_length=8, steps=16, num_registers=2)
    for i in range(5):
        engine.add_request(f"a{i}", TokensPrompt(prompt_token_ids=[100 + i] * (3 + i)), params(knobs))
    for _ in range(3):
        engine.step()
    assert sched.num_free_blocks() < sched.num_blocks_total  # prompts and commits hold blocks now
    engine.abort_request(["a0", "a3"])  # mid-generation
    engine.step()
    engine.abort_request(["a4"])
    finished = {}
    drain(engine, finished)
    assert sorted(finished) == ["a1", "a2"]
    assert not sched.states and not sched.running
    assert sched.num_free_blocks() == sched.num_blocks_total  # I5
