"""Sparse vs dense sampling on one LLaDA-shaped model: seconds, forward tokens, the token bound, Table 6 ablation."""

from __future__ import annotations

import argparse
import itertools

import torch
from common import (
    NUM_REGISTERS,
    PROMPT_LEN,
    WALL,
    Run,
    Workload,
    add_common_args,
    bench_model,
    image_workload,
    model_record,
    prompt_ids,
    setup,
    text_workload,
    time_interleaved,
)

from sparse_lavida_vllm.drivers.text import GenerateResult, SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.model import LLaDAMDM


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [text_workload(64, 16), image_workload(8, 8), image_workload(8, 8, cfg_scale=4.0)]
    return [text_workload(256), text_workload(1024), image_workload(32, 64), image_workload(32, 64, cfg_scale=4.0)]


def run_pair(model: LLaDAMDM, w: Workload, repeats: int, options: SparseOptions) -> dict:
    prompt = prompt_ids(model.config, w.prompt_len)
    fns = [lambda: generate_dense(model, prompt, w.plan, w.sampling),
           lambda: generate_sparse(model, prompt, w.plan, w.sampling, options)]
    (dense_s, dense_all, dense), (sparse_s, sparse_all, sparse) = time_interleaved(fns, repeats)
    dense_wall, sparse_wall = WALL[id(fns[0])], WALL[id(fns[1])]
    assert isinstance(dense, GenerateResult) and isinstance(sparse, GenerateResult)
    speedup = dense_s / sparse_s
    bound = dense.forward_tokens / sparse.forward_tokens
    return {**w.describe(), "num_registers": options.num_registers,
            "dense_s": round(dense_s, 4), "sparse_s": round(sparse_s, 4),
            "dense_runs_s": [round(t, 4) for t in dense_all], "sparse_runs_s": [round(t, 4) for t in sparse_all],
            "speedup": round(speedup, 3),
            "dense_wall_s": round(dense_wall, 4), "sparse_wall_s": round(sparse_wall, 4),
            "speedup_wall": round(dense_wall / sparse_wall, 3),
            "forward_tokens": {"dense": dense.forward_tokens, "sparse": sparse.forward_tokens},
            "token_bound": round(bound, 3), "fraction_of_bound": round(speedup / bound, 3),
            # random weights: dense and sparse are different models of the same shape, so this is information only
            "token_match_dense_vs_sparse": round(float((dense.tokens == sparse.tokens).float().mean()), 4)}


def ablation(model: LLaDAMDM, w: Workload, repeats: int, dense_s: float | None, num_registers: int) -> dict:
    """Table 6: cache prompt / cache response / truncate, all 8 combinations (registers kept), vs all-off."""
    prompt = prompt_ids(model.config, w.prompt_len)
    keys = list(itertools.product([False, True], repeat=3))
    fns = [lambda o=SparseOptions(num_registers, *key): generate_sparse(model, prompt, w.plan, w.sampling, o)
           for key in keys]
    rows = []
    for (cache_prompt, cache_response, truncate), (secs, _, res) in zip(keys, time_interleaved(fns, repeats),
                                                                         strict=True):
        rows.append({"cache_prompt": cache_prompt, "cache_response": cache_response, "truncate": truncate,
                     "seconds": round(secs, 4), "forward_tokens": res.forward_tokens})
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_all_off"] = round(base / r["seconds"], 3)
        if dense_s:
            r["speedup_vs_dense"] = round(dense_s / r["seconds"], 3)
    return {**w.describe(), "combinations": rows}


def bf16_option(model: LLaDAMDM, w: Workload, repeats: int, options: SparseOptions) -> dict:
    """bf16 weights and activations (AMX on this CPU) vs fp32: speed of both samplers, and the drift."""
    prompt = prompt_ids(model.config, w.prompt_len)
    half = bench_model(model.config.d_model < 256, torch.bfloat16)
    runs = time_interleaved([lambda: generate_dense(half, prompt, w.plan, w.sampling),
                             lambda: generate_sparse(half, prompt, w.plan, w.sampling, options),
                             lambda: generate_dense(model, prompt, w.plan, w.sampling),
                             lambda: generate_sparse(model, prompt, w.plan, w.sampling, options)], repeats)
    (d16, _, dense16), (s16, _, sparse16), (d32, _, dense32), (s32, _, sparse32) = runs
    first16 = generate_sparse(half, prompt, w.plan, w.sampling, options, record_logits=True).steps[0].logits
    first32 = generate_sparse(model, prompt, w.plan, w.sampling, options, record_logits=True).steps[0].logits
    return {**w.describe(), "dense_fp32_s": round(d32, 4), "dense_bf16_s": round(d16, 4),
            "sparse_fp32_s": round(s32, 4), "sparse_bf16_s": round(s16, 4),
            "dense_bf16_speedup": round(d32 / d16, 3), "sparse_bf16_speedup": round(s32 / s16, 3),
            "sparse_speedup_bf16": round(d16 / s16, 3),
            "first_step_max_abs_logit_diff": round(float((first16.float() - first32).abs().max()), 5),
            "first_step_logit_scale": round(float(first32.abs().max()), 5),
            "token_match_bf16_vs_fp32_dense": round(float((dense16.tokens == dense32.tokens).float().mean()), 4),
            "token_match_bf16_vs_fp32_sparse": round(float((sparse16.tokens == sparse32.tokens).float().mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--only", default="", help="comma-separated workload names to run (default: all)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the Table 6 ablation")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 measurement")
    args = parser.parse_args()
    setup(args)
    run = Run("sparse_vs_dense", args.quick)
    model = bench_model(args.quick)
    run.data["model"] = model_record(model.config)
    options = SparseOptions(NUM_REGISTERS if not args.quick else 8)
    run.data["notes"] = ("text: steps = gen_length / 4 (8 steps per 32-token block), greedy, low-confidence "
                         "remasking; images: 64 steps, shift schedule 5, stratified order, temperature 0.8; "
                         f"prompt {PROMPT_LEN} tokens; sparse = {options.num_registers} registers, cache prompt, "
                         "cache response, truncate. token_bound = dense forward tokens / sparse forward tokens.")
    warm = text_workload(64, 16) if not args.quick else text_workload(32, 16)
    prompt = prompt_ids(model.config, warm.prompt_len)
    with torch.inference_mode():
        generate_dense(model, prompt, warm.plan, warm.sampling)
        generate_sparse(model, prompt, warm.plan, warm.sampling, options)
        only = {s for s in args.only.split(",") if s}
        chosen = [w for w in workloads(args.quick) if not only or w.name in only]
        if only and not chosen:
            raise SystemExit(f"--only matched no workload: {sorted(only)}")
        for w in chosen:
            run.data[w.name] = run_pair(model, w, args.repeats, options)
            print(w.name, {k: run.data[w.name][k] for k in ("dense_s", "sparse_s", "speedup", "token_bound",
                                                              "fraction_of_bound")}, flush=True)
        if not args.no_ablation:
            w = image_workload(8, 8) if args.quick else image_workload(32, 64)
            dense_s = run.data.get(w.name, {}).get("dense_s")
            run.data["table6_ablation"] = ablation(model, w, args.repeats, dense_s, options.num_registers)
            for r in run.data["table6_ablation"]["combinations"]:
                print(r, flush=True)
        if not args.no_bf16:
            w = image_workload(8, 8) if args.quick else image_workload(32, 64)
            run.data["bf16"] = bf16_option(model, w, args.repeats, options)
            print("bf16", run.data["bf16"], flush=True)
    run.finish(args.json)


if __name__ == "__main__":
    main()
