"""I4 under tensor parallelism: vllm.LLM(tensor_parallel_size=2) on CPU shards the model and gives the reference tokens.

The engine runs in a child process (`python -m tests.worker.test_tensor_parallel FOLDER`): its two
workers set up vLLM's process-wide parallel state, which must not meet the single-rank engine the
other offline tests share.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving_helpers import VLLM_ENV, make_checkpoint, reference_tokens

PROMPT = [40, 72, 69, 76, 76, 79, 12]
CASES = {
    "sparse_registers": dict(gen_length=16, block_length=8, steps=8, num_registers=4),
    "dense": dict(gen_length=16, block_length=8, steps=8, num_registers=0, sparse=False),
    "sampled_top_k": dict(gen_length=16, block_length=8, steps=4, num_registers=3, temperature=0.9, top_k=20, seed=11),
}
STANDARD = ("temperature", "top_k", "top_p", "seed")


def _worker_view(worker) -> dict:
    """What one TP worker holds: its rank, its shard's shapes and its KV pool's head count."""
    model = worker.model_runner.model
    block = model.model.transformer["blocks"][0]
    return {"rank": model.tp.rank, "world_size": model.tp.world_size, "local_kv_heads": model.local_kv_heads,
            "q_proj": list(block.q_proj.weight.shape), "ff_out": list(block.ff_out.weight.shape),
            "lm_head": list(model.model.transformer["ff_out"].weight.shape),
            "pool_kv_heads": worker.model_runner.paged_kv[0].shape[2]}


def main(folder: str) -> None:
    """Build a TP=2 engine over `folder`, run every case, print one JSON line (tokens and worker views)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0, block_size=16,
              num_gpu_blocks_override=24, tensor_parallel_size=2, distributed_executor_backend="mp")
    tokens = {}
    for name, knobs in CASES.items():
        knobs = dict(knobs)
        std = {k: knobs.pop(k) for k in STANDARD if k in knobs}
        params = SamplingParams(max_tokens=knobs["gen_length"], ignore_eos=True, temperature=std.get("temperature", 0),
                                top_k=std.get("top_k", 0), seed=std.get("seed", 0), extra_args=knobs)
        out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)[0].outputs[0]
        tokens[name] = list(out.token_ids)
    print("RESULT " + json.dumps({"tokens": tokens, "workers": llm.collective_rpc(_worker_view)}), flush=True)


def run_tp2(folder: Path, timeout: int = 300) -> dict:
    """This module's engine on `folder` with TP=2 in a child process: its RESULT (tokens per case, worker views)."""
    env = dict(os.environ, **VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND="0|1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "tests.worker.test_tensor_parallel", str(folder)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def check_tp2_result(result: dict, reference_model) -> None:
    """Each rank holds one of TINY's 2 heads, half the MLP and the whole LM head; every case's tokens equal the
    reference sampler's on `reference_model` (a checkpoint folder or a model)."""
    hd = 32  # TINY: d_model 64, 2 heads, 2 K/V heads, MLP 128, vocab 256
    assert sorted(w["rank"] for w in result["workers"]) == [0, 1]
    for w in result["workers"]:
        assert w["world_size"] == 2 and w["local_kv_heads"] == 1 and w["pool_kv_heads"] == 1
        assert w["q_proj"] == [1 * hd, 64] and w["ff_out"] == [64, 64] and w["lm_head"] == [256, 64]
    for name, knobs in CASES.items():
        knobs = dict(knobs)
        want = reference_tokens(reference_model, PROMPT, knobs.pop("gen_length"), knobs.pop("block_length"),
                                knobs.pop("steps"), knobs.pop("num_registers"), **knobs)
        assert result["tokens"][name] == want, name


@pytest.mark.slow
def test_tp2_llm_shards_the_model_and_matches_the_reference(tmp_path, leaves_nothing):
    folder = make_checkpoint(tmp_path / "ck")
    check_tp2_result(run_tp2(folder), folder)


if __name__ == "__main__":  # vLLM spawns its workers: the engine must start under this guard
    main(sys.argv[1])
