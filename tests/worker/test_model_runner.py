"""I4 offline: vllm.LLM(model=checkpoint).generate gives the reference sampler's tokens, sparse and dense."""

import pytest

from tests.serving_helpers import reference_tokens, set_vllm_env, shared_llm

set_vllm_env()

PROMPT = [40, 72, 69, 76, 76, 79, 12]

CASES = {
    "sparse_registers": dict(gen_length=16, block_length=8, steps=8, num_registers=4),
    "sparse_no_registers": dict(gen_length=16, block_length=4, steps=8, num_registers=0),
    "sparse_one_block_one_token_per_step": dict(gen_length=8, block_length=8, steps=8, num_registers=2),
    "dense": dict(gen_length=16, block_length=8, steps=8, num_registers=0, sparse=False),
    "sampled_top_k": dict(gen_length=16, block_length=8, steps=4, num_registers=3, temperature=0.9, top_k=20, seed=11),
    "threshold_policy": dict(gen_length=16, block_length=8, steps=4, num_registers=2, remasking="threshold",
                             confidence_threshold=0.05),
    "random_policy_top_p": dict(gen_length=12, block_length=4, steps=6, num_registers=1, remasking="random",
                                temperature=0.7, top_p=0.9, seed=3),
}


def run(llm, prompt, knobs):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    knobs = dict(knobs)
    standard = {k: knobs.pop(k) for k in ("temperature", "top_k", "top_p", "seed") if k in knobs}
    params = SamplingParams(max_tokens=knobs["gen_length"], ignore_eos=True, temperature=standard.get("temperature", 0),
                            top_k=standard.get("top_k", 0), top_p=standard.get("top_p", 1.0),
                            seed=standard.get("seed", 0), extra_args=knobs)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), out.finish_reason


def expected(folder, prompt, knobs):
    knobs = dict(knobs)
    return reference_tokens(folder, prompt, knobs.pop("gen_length"), knobs.pop("block_length"), knobs.pop("steps"),
                            knobs.pop("num_registers"), **knobs)


@pytest.mark.parametrize("name", list(CASES))
def test_llm_generate_matches_reference(name):
    llm, folder = shared_llm()
    tokens, reason = run(llm, PROMPT, CASES[name])
    assert tokens == expected(folder, PROMPT, CASES[name])
    assert reason == "length"


def test_stop_token_ends_the_text_and_drops_later_blocks():
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, folder = shared_llm()
    knobs = dict(gen_length=24, block_length=8, steps=12, num_registers=2)
    ref = expected(folder, PROMPT, knobs)
    stop = ref[9]  # a token of the second block
    first = ref.index(stop)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop], extra_args=knobs)
    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == ref[:first + 1]
    assert out.finish_reason == "stop"


def test_text_prompt_and_progress_bar_path():
    from vllm import SamplingParams

    llm, folder = shared_llm()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, extra_args=dict(steps=4, num_registers=2))
    out = llm.generate(["Hello"], params, use_tqdm=True)[0]
    ref = reference_tokens(folder, list(out.prompt_token_ids), 8, 8, 4, 2)
    assert list(out.outputs[0].token_ids) == ref and isinstance(out.outputs[0].text, str)


def test_bad_knob_raises_naming_the_field():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm, _ = shared_llm()
    with pytest.raises(VLLMValidationError, match="block_length") as info:
        llm.generate(["Hello"], SamplingParams(max_tokens=8, extra_args=dict(block_length=3)), use_tqdm=False)
    assert info.value.parameter == "block_length"
    ok = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 4


# The unconstrained runner (batch_invariant: false) in its own process (vLLM keeps process-wide state): requests of
# different prompt lengths, knobs and kinds, one joining while the others are mid-generation.
FLAT_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, seed=0, block_size=16,
          additional_config=json.loads(sys.argv[3]))
engine, out = llm.llm_engine, {}
for i, (prompt, knobs) in enumerate(json.loads(sys.argv[2])):
    knobs = dict(knobs)
    std = {"temperature": 0.0, "seed": 0, **{k: knobs.pop(k) for k in ("temperature", "top_k", "top_p", "seed")
                                             if k in knobs}}
    engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt),
                       SamplingParams(max_tokens=knobs["gen_length"], ignore_eos=True, **std, extra_args=knobs))
    for _ in range(3 if i == 2 else 0):  # the last one joins (its prompt rides along) three steps in
        for o in engine.step():
            out[o.request_id] = list(o.outputs[0].token_ids)
while engine.has_unfinished_requests():
    for o in engine.step():
        out[o.request_id] = list(o.outputs[0].token_ids)
batch = engine.engine_core.engine_core.scheduler.batch_sizes  # requests per engine step
print(json.dumps({"tokens": [out[str(i)] for i in range(len(out))], "max_batch": max(batch)}))
"""
FLAT_REQUESTS = [
    (PROMPT, dict(gen_length=16, block_length=8, steps=8, num_registers=4)),
    ([3, 9, 27, 81, 50, 12, 7, 7, 1, 44, 60], dict(gen_length=12, block_length=4, steps=6, num_registers=1,
                                                    remasking="random", temperature=0.7, top_p=0.9, seed=3)),
    (PROMPT[:4], dict(gen_length=16, block_length=8, steps=8, num_registers=0, sparse=False)),
    ([11, 22, 33], dict(gen_length=16, block_length=8, steps=4, num_registers=3, temperature=0.9, top_k=20, seed=11)),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_unconstrained_mode_gives_the_reference_tokens_on_the_tiny_model(tmp_path, backend):
    """Plain GEMMs (and the fused FlexAttention backend) may differ from the reference only by rounding; on the
    tiny model their tokens are the same."""
    import json
    import os
    import subprocess
    import sys

    from tests.serving_helpers import VLLM_ENV, make_checkpoint

    folder = make_checkpoint(tmp_path)
    config = {"batch_invariant": False, "attention_backend": backend}
    run = subprocess.run([sys.executable, "-c", FLAT_SCRIPT, str(folder), json.dumps(FLAT_REQUESTS),
                          json.dumps(config)],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["max_batch"] == len(FLAT_REQUESTS)  # they really shared engine steps
    assert result["tokens"] == [expected(folder, prompt, knobs) for prompt, knobs in FLAT_REQUESTS]
