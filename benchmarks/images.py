"""Images: sparse vs dense seconds per image with CFG (bound and fraction reached), and images/s through the engine.

Part 1 (the pure-PyTorch samplers, one thread, CPU seconds): a LaViDa-O-shaped random model scaled to fit
(1024 positions = a 32x32 canvas, 64 steps, guidance 4, shift 5, stratified, 64 registers) and the bundled demo
model (its own 16x16 canvas and defaults). Part 2 (vLLM's engine in this process, the bundled demo model, its
default knobs): images per second at 1 / 4 / 8 concurrent requests, unguided and guided, sparse and dense. The
guided / unguided cost per image says whether CFG companions batch (2.0 = a second model run per image).
Usage: python benchmarks/images.py [--quick] [--json [PATH]] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from common import (
    NUM_REGISTERS,
    WALL,
    Run,
    add_common_args,
    bench_model,
    image_workload,
    model_record,
    prompt_ids,
    setup,
    time_interleaved,
)

from sparse_lavida_vllm.diffusion.planners import image_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.weights import load_pretrained
from sparse_lavida_vllm.training.data import DEMO_ROOT

DEMO = DEMO_ROOT / "sparse"
CONCURRENCY = (1, 4, 8)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_HOST_IP": "127.0.0.1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_CI_ENV": "1"}


def pair(model, prompt, plan, sampling, options, repeats) -> dict:
    fns = [lambda: generate_dense(model, prompt, plan, sampling),
           lambda: generate_sparse(model, prompt, plan, sampling, options)]
    (dense_s, _, dense), (sparse_s, _, sparse) = time_interleaved(fns, repeats)
    bound = dense.forward_tokens / sparse.forward_tokens
    return {"positions": plan.length, "steps": plan.num_steps, "prompt_len": prompt.numel(),
            "guidance_scale": sampling.cfg_scale, "num_registers": options.num_registers,
            "dense_s": round(dense_s, 4), "sparse_s": round(sparse_s, 4), "speedup": round(dense_s / sparse_s, 3),
            "speedup_wall": round(WALL[id(fns[0])] / WALL[id(fns[1])], 3),
            "forward_tokens": {"dense": dense.forward_tokens, "sparse": sparse.forward_tokens},
            "token_bound": round(bound, 3), "fraction_of_bound": round(dense_s / sparse_s / bound, 3)}


def samplers(args) -> dict:
    out = {}
    model = bench_model(args.quick)
    side, steps = (8, 8) if args.quick else (32, 64)
    w = image_workload(side, steps, cfg_scale=4.0)
    options = SparseOptions(8 if args.quick else NUM_REGISTERS)
    with torch.inference_mode():
        out["lavida_o_shaped"] = {"model": model_record(model.config),
                                  **pair(model, prompt_ids(model.config, w.prompt_len), w.plan, w.sampling, options,
                                         args.repeats)}
        demo = load_pretrained(DEMO)
        layout = json.loads((DEMO / "config.json").read_text())["image_generation"]
        d, codec = layout["defaults"], layout["codec"]
        g = max(float(d.get("guidance_scale", 0.0)), 1.0)  # guided, so the CFG companion is part of the cost
        plan = image_plan(codec["height"], codec["width"], int(d["steps"]), d["schedule"], d["order"], 5.0,
                          torch.Generator().manual_seed(0))
        lo = int(codec["token_offset"])
        sampling = SamplingConfig(temperature=float(d["temperature"]), cfg_scale=g, seed=0,
                                  token_range=(lo, lo + int(codec["levels"])))
        prompt = torch.tensor([5] + list(range(24, 40)))  # a caption-length prompt of ordinary ids
        out["demo_model"] = {"model": model_record(demo.config),
                             **pair(demo, prompt, plan, sampling, SparseOptions(demo.config.num_registers),
                                    args.repeats)}
    return out


def engine_child(quick: bool, repeats: int, flat: bool) -> dict:
    """In its own process (vLLM keeps process-wide state): images/s at each concurrency, per configuration."""
    os.environ.update(VLLM_ENV)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(DEMO), dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=64, seed=0,
              additional_config={"batch_invariant": not flat})
    layout = json.loads((DEMO / "config.json").read_text())["image_generation"]
    codec, d = layout["codec"], layout["defaults"]
    tokenizer = llm.get_tokenizer()
    prompt = [tokenizer.get_vocab()["<t2i>"]] + tokenizer.encode("a thick handwritten digit seven",
                                                                 add_special_tokens=False)
    engine = llm.llm_engine
    steps = 4 if quick else int(d["steps"])

    def extra(guidance: float, sparse: bool) -> dict:
        lo = int(codec["token_offset"])
        return {"kind": "image", "height": codec["height"], "width": codec["width"], "steps": steps,
                "schedule": d["schedule"], "order": d["order"], "guidance_scale": guidance, "sparse": sparse,
                "token_range": [lo, lo + int(codec["levels"])]}

    step_s: dict[tuple[str, int], list[float]] = {}

    def batch(name: str, n: int, guidance: float, sparse: bool, seed0: int) -> None:
        """n images submitted together; every engine step timed (they all advance one step per engine step)."""
        for i in range(n):
            engine.add_request(f"b{name}{seed0}-{n}-{i}", {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=codec["height"] * codec["width"], temperature=0.8,
                                              seed=seed0 + i, extra_args=extra(guidance, sparse), detokenize=False))
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            step_s.setdefault((name, n), []).append(time.perf_counter() - start)

    configs = {"sparse": (0.0, True), "sparse_cfg": (1.0, True), "dense": (0.0, False), "dense_cfg": (1.0, False)}
    batch("warm", 1, 1.0, True, 0)
    for r in range(repeats):  # interleaved: a change in the load of the shared cores hits every configuration
        for n in CONCURRENCY[:2] if quick else CONCURRENCY:
            for name, (guidance, sparse) in configs.items():
                batch(name, n, guidance, sparse, 1000 * r + n)

    def low(samples: list[float]) -> float:  # 20th percentile of many short samples: robust to load spikes
        return sorted(samples)[len(samples) // 5]

    result: dict = {name: {} for name in configs}
    for (name, n), samples in step_s.items():
        if name in result:
            result[name][str(n)] = n / (low(samples) * steps)  # images per second: n images take `steps` steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--engine-child", choices=("invariant", "unconstrained"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_child:
        print(json.dumps(engine_child(args.quick, args.repeats, args.engine_child == "unconstrained")))
        return
    setup(args)
    run = Run("images", args.quick)
    run.data["model"] = "see each section"
    run.data["samplers"] = samplers(args)
    for name, r in run.data["samplers"].items():
        print(name, {k: r[k] for k in ("dense_s", "sparse_s", "speedup", "token_bound", "fraction_of_bound")},
              flush=True)
    engine: dict = {"note": "vLLM engine in process (LLMEngine.step), bundled demo model, its default knobs; "
                            "images/s = n / (20th-percentile engine-step seconds x steps), each engine step timed. "
                            "Both runners run one forward per engine step for every request and CFG companion: "
                            "invariant (the default: tiled GEMMs, per-request attention, batch-invariant), "
                            "unconstrained (batch_invariant: false: plain GEMMs, one batched attention call)"}
    for runner in ("invariant", "unconstrained"):
        cmd = [sys.executable, __file__, "--engine-child", runner, "--repeats", str(args.repeats)]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **VLLM_ENV}, timeout=3600)
        if proc.returncode:
            raise SystemExit(f"engine run ({runner}) failed:\n{proc.stderr[-3000:]}")
        rates = json.loads(proc.stdout.strip().splitlines()[-1])
        engine[runner] = {
            "images_per_s": {k: {n: round(v, 3) for n, v in r.items()} for k, r in rates.items()},
            # guided seconds per image / unguided seconds per image (2.0: the companion costs a full model run)
            "guided_cost_per_image": {mode: {n: round(rates[mode][n] / rates[f"{mode}_cfg"][n], 3)
                                             for n in rates[mode]} for mode in ("sparse", "dense")},
            "sparse_vs_dense_guided": {n: round(rates["sparse_cfg"][n] / rates["dense_cfg"][n], 3)
                                       for n in rates["sparse"]}}
        print(runner, json.dumps(engine[runner]), flush=True)
    run.data["engine"] = engine
    run.finish(args.json)


if __name__ == "__main__":
    main()
