"""The profile step: the largest step the scheduler can build, run before vLLM sizes the KV pool."""

import json
import os
import subprocess
import sys

import psutil
import pytest

from sparse_lavida_vllm.worker.model_runner import MAX_BRANCHES, largest_step_rows


def test_largest_step_is_every_request_at_its_largest_until_the_step_budget():
    # budget not reached: 2 requests x 3 branches x (64 + 64 registers)
    assert largest_step_rows(2, 1024, 64, 64) == [128] * 2 * MAX_BRANCHES
    # the budget binds: 1024 rows, in branches of at most 128
    assert largest_step_rows(256, 1024, 64, 64) == [128] * 8
    assert largest_step_rows(256, 1000, 64, 0) == [64] * 15 + [40]
    # a budget below one request's largest step still runs that request
    assert largest_step_rows(8, 100, 64, 0) == [64] * MAX_BRANCHES


# One engine whose KV pool vLLM sizes from the memory left after warm-up (no VLLM_CPU_KVCACHE_SPACE): the profile
# step runs at startup. Then: the profile step again, over the live pool; the largest step the scheduler builds for
# the same config (max_num_seqs edit requests with both guidance scales, a canvas filling max_model_len and
# max_model_len registers, all decoded in one step); and a text request, whose tokens must be the reference's.
SCRIPT = """
import json, sys
import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=64, max_num_seqs=2,
          max_num_batched_tokens=1024, block_size=16, seed=0, gpu_memory_utilization=float(sys.argv[2]))
engine = llm.llm_engine
core = engine.engine_core.engine_core
runner = core.model_executor.driver_worker.worker.model_runner
out = {"startup_rows": runner.profile_rows, "pool_slots": runner.paged_kv[0].shape[1]}
before = [t.clone() for t in runner.paged_kv]
runner.profile_run()
out["rows"] = runner.profile_rows
out["pool_untouched"] = all(torch.equal(a, b) for a, b in zip(before, runner.paged_kv))
scheduled = []
schedule = core.scheduler.schedule
def recording(*args, **kwargs):
    output = schedule(*args, **kwargs)
    scheduled.append(output.total_num_scheduled_tokens)
    return output
core.scheduler.schedule = recording
prompt = [40, 72, 69, 76, 76, 79, 12, 5]
edit = dict(kind="image", height=7, width=8, steps=1, order="random", sparse=True, num_registers=64,
            guidance_scale=2.0, image_guidance_scale=1.5, source_span=[1, 5])
for i in range(2):
    engine.add_request(f"edit{i}", TokensPrompt(prompt_token_ids=prompt),
                       SamplingParams(max_tokens=56, temperature=1.0, seed=i, extra_args=edit))
done = set()
while engine.has_unfinished_requests():
    done |= {o.request_id for o in engine.step() if o.finished}
out["largest_scheduled"], out["edits_done"] = max(scheduled), sorted(done)
text = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, seed=0,
                      extra_args=dict(gen_length=16, block_length=8, steps=8, num_registers=4))
answer = llm.generate([TokensPrompt(prompt_token_ids=prompt)], text, use_tqdm=False)[0]
out["tokens"] = list(answer.outputs[0].token_ids)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_profile_step_is_the_largest_step_the_scheduler_builds_and_serving_is_unchanged(tmp_path):
    from tests.serving_helpers import VLLM_ENV, make_checkpoint, reference_tokens

    folder = make_checkpoint(tmp_path)
    env = {**os.environ, **VLLM_ENV}
    # vLLM sizes the pool from the memory left after its warm-up (our profile step); VLLM_CPU_CI_ENV skips warm-up
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_CI_ENV"):
        env.pop(name)
    # the worker may use about 2.5 GiB; the pool gets what the process has not taken after the profile step
    fraction = 2.5 * 2**30 / psutil.virtual_memory().total
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), f"{fraction:.4f}"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # 2 requests x 3 branches x (64 rows + 64 registers), under the 1024-row budget
    assert out["startup_rows"] == out["rows"] == 2 * MAX_BRANCHES * 128
    assert out["largest_scheduled"] == out["rows"]
    assert out["edits_done"] == ["edit0", "edit1"]
    assert out["pool_untouched"] and out["pool_slots"] > 0
    assert out["tokens"] == reference_tokens(folder, [40, 72, 69, 76, 76, 79, 12, 5], 16, 8, 8, 4)
