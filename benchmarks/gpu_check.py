"""The prepared GPU check (pure PyTorch, no vLLM): kernel equality, sparse vs dense seconds, batched-runner throughput.

Runs on the lent device machine through benchmarks/gpu_check.sh; `--device cpu --quick` runs the same code on a
tiny model here, so the script is known to work before device time is spent on it.
1. FlexPagedAttention (the fused kernel) vs per-request SDPA over a paged pool: max |diff| of every row's logits,
   fp32 and bf16, on a flat batch of mixed requests (cache + commit rows, a new prompt, a dense request).
2. Sparse vs dense seconds on a LLaDA-8B-shaped random bf16 model: text (gen 1024, block 32) and an image plan
   (1024 positions, 64 steps, CFG 4), next to the paper's A100 figures.
3. The batched runner core: one forward for B concurrent requests' steps (the invariant one-call attention,
   batch-invariant tiles; and the flex kernel with plain GEMMs), rows per second at B = 1 / 8 / 32.
4. Batch invariance on the device: each request of a mixed step alone vs in the step (PagedSpanAttention's one
   SDPA call per layer), attention output and logits bit for bit, fp32 and bf16; and whether key padding within
   a key block is exact there (attention._tail_padding_exact; else whole 512-key blocks are used), and whether query
   entries of any length from 4 rows give a row its 32-row entry's bits (attention._short_blocks_exact; else
   entries are multiples of 32 rows).
5. `--vllm-mode` (a process of its own, run by gpu_check.sh after the others): vLLM's batch-invariant mode, as the
   worker turns it on for the invariant runner on CUDA (worker.enable_vllm_invariance), or where vLLM is absent its
   pure-torch settings (cuBLASLt without split-K, no reduced-precision reductions, no TF32); then part 4 with plain
   GEMMs (no row tiles: one GEMM over all the step's rows) on two LLaDA-8B-shaped layers, and the row count the
   runner's load-time check (plain_rows_verified) accepts there.
Usage: python benchmarks/gpu_check.py [--device cuda] [--quick] [--vllm-mode] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

from sparse_lavida_vllm.diffusion.masks import inference_step_spans
from sparse_lavida_vllm.diffusion.planners import image_plan, text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import ROW_TILE, LLaDAMDM, plain_rows_verified
from sparse_lavida_vllm.worker.flex_attention import FlexPagedAttention
from sparse_lavida_vllm.worker.paged_attention import PagedSpanAttention, Segment, StepLayout, request_slots

LLADA_8B = MDMConfig(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                     rope_theta=500000.0, max_sequence_length=8192, mask_token_id=126336, register_token_id=126463,
                     eos_token_id=126081)
TINY = MDMConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=256,
                 mask_token_id=510, register_token_id=511)
PAPER_A100 = {"t2i_dense_s": 21.27, "t2i_sparse_s": 10.86, "t2i_speedup": 1.95, "note": "10.4B LaViDa-O, 1024 px"}
BLOCK = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def random_model_on(config: MDMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LLaDAMDM:
    """Random weights drawn on the device (an 8B model drawn on the host would take minutes)."""
    with torch.device(device):
        model = LLaDAMDM(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def step_batch(config: MDMConfig, n_requests: int, device: torch.device, cached: int = 96, commit: int = 8,
               decode: int = 32, registers: int = 16, seed: int = 0):
    """A flat batch of n sparse requests mid-generation, their K/V already in a paged pool."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per = -(-(cached + commit) // BLOCK)
    pool = [torch.randn(2, n_requests * blocks_per * BLOCK, config.n_kv_heads, config.head_dim, generator=gen)
            .to(device) for _ in range(config.n_layers)]
    ids, positions, segments, start, tables = [], [], [], 0, []
    n = commit + decode + registers
    for r in range(n_requests):
        table = list(range(r * blocks_per, (r + 1) * blocks_per))
        tables.append(table)
        ids.append(torch.cat([torch.randint(5, 500, (commit,), generator=gen),
                              torch.full((decode,), config.mask_token_id), torch.full((registers,),
                                                                                       config.register_token_id)]))
        positions.append(torch.cat([torch.randperm(cached + commit + decode, generator=gen)[:commit + decode],
                                    torch.arange(2000, 2000 + registers)]))
        segments.append(Segment(start, start + n, request_slots(table, 0, cached, BLOCK).to(device),
                                request_slots(table, cached, cached + commit, BLOCK).to(device),
                                inference_step_spans(cached, n, commit, commit)))
        start += n
    layout = StepLayout(torch.full((n_requests,), n), torch.full((n_requests,), cached),
                        torch.full((n_requests,), commit), torch.tensor(tables), BLOCK)
    rows = torch.cat([torch.arange(r * n + commit, r * n + commit + decode) for r in range(n_requests)])
    return torch.cat(ids).to(device), torch.cat(positions).to(device), pool, segments, layout, rows.to(device)


def kernel_equality(config: MDMConfig, device: torch.device) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model_on(config, device, dtype, seed=1)
        ids, pos, pool, segments, layout, rows = step_batch(config, 3, device, seed=2)
        pool = [p.to(dtype) for p in pool]
        flex_pool = [p.clone() for p in pool]
        with torch.inference_mode():
            ref = model(ids, pos, PagedSpanAttention(pool, segments), rows).float()
            flex = model(ids, pos, FlexPagedAttention(flex_pool, layout), rows).float()
        out[str(dtype).split(".")[-1]] = {"max_abs_diff": float((flex - ref).abs().max()),
                                          "logit_scale": float(ref.abs().max()),
                                          "cache_max_abs_diff": max(float((a - b).abs().max())
                                                                    for a, b in zip(pool, flex_pool))}
    return out


def mixed_requests(config: MDMConfig, device: torch.device) -> tuple[list, list[Tensor]]:
    """Requests of mixed shapes (a cache past one 512-key block, short ones, a dense one, one without commit rows):
    per request (cache slots, commit slots, spans, rows) and its pool."""
    gen = torch.Generator().manual_seed(5)
    empty = torch.empty(0, dtype=torch.long, device=device)
    shapes = [(600, 4, 40, 16), (30, 2, 8, 4), None, (100, 0, 33, 8), (7, 3, 5, 0)]  # (cached, commit, decode, regs)
    pool = [torch.randn(2, 64 * BLOCK * len(shapes), config.n_kv_heads, config.head_dim, generator=gen).to(device)
            for _ in range(config.n_layers)]
    requests = []
    for r, shape in enumerate(shapes):
        table = list(range(64 * r, 64 * (r + 1)))
        if shape is None:  # dense: full attention over its 50 rows, nothing cached
            requests.append((empty, empty, None, 50))
            continue
        cached, commit, decode, regs = shape
        n = commit + decode + regs
        requests.append((request_slots(table, 0, cached, BLOCK).to(device),
                         request_slots(table, cached, cached + commit, BLOCK).to(device),
                         inference_step_spans(cached, n, commit, commit), n))
    return requests, pool


def invariant_step(model: LLaDAMDM, requests: list, pool: list[Tensor], inputs: list[tuple], members: list[int]):
    """Layer 0's attention output and the logits of `members` in one step (PagedSpanAttention over a pool copy)."""
    start, segments = 0, []
    for r in members:
        cached_slots, commit_slots, spans, n = requests[r]
        segments.append(Segment(start, start + n, cached_slots, commit_slots, spans))
        start += n
    q, k, v, ids, positions = (torch.cat([inputs[r][i] for r in members]) for i in range(5))
    attention = PagedSpanAttention([p.clone() for p in pool], segments).attend(0, q, k, v)
    logits = model(ids, positions, PagedSpanAttention([p.clone() for p in pool], segments))
    sizes = [requests[r][3] for r in members]
    return torch.split(attention, sizes), torch.split(logits, sizes)


def alone_and_together(model: LLaDAMDM, config: MDMConfig, device: torch.device, dtype: torch.dtype,
                       requests: list, pool32: list[torch.Tensor], gen: torch.Generator) -> tuple:
    """One mixed step (mixed_requests) with random inputs: every request in it together, then each alone."""
    pool = [p.to(dtype) for p in pool32]
    inputs = [tuple(torch.randn(n, heads, config.head_dim, generator=gen).to(device, dtype)
                    for heads in (config.n_heads, config.n_kv_heads, config.n_kv_heads))
              + (torch.randint(5, 500, (n,), generator=gen).to(device), torch.arange(n, device=device))
              for *_, n in requests]
    everyone = list(range(len(requests)))
    with torch.inference_mode():
        together = invariant_step(model, requests, pool, inputs, everyone)
        alone = [invariant_step(model, requests, pool, inputs, [r]) for r in everyone]
    return together, alone, everyone


def invariance(config: MDMConfig, device: torch.device) -> dict:
    """Each request of a mixed step alone vs in the step: attention and logits bit for bit, fp32 and bf16."""
    from sparse_lavida_vllm.model_executor.attention import _short_blocks_exact, _tail_padding_exact

    threads = torch.get_num_threads()
    out: dict = {"tail_padding_exact": _tail_padding_exact(device.type, threads),
                 "short_blocks_exact": _short_blocks_exact(device.type, threads)}
    requests, pool32 = mixed_requests(config, device)
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model_on(config, device, dtype, seed=6)
        together, alone, everyone = alone_and_together(model, config, device, dtype, requests, pool32, gen)
        out[str(dtype).split(".")[-1]] = {
            "attention_bitwise": all(torch.equal(together[0][r], alone[r][0][0]) for r in everyone),
            "logits_bitwise": all(torch.equal(together[1][r], alone[r][1][0]) for r in everyone),
            "logits_max_abs_diff": max(float((together[1][r].float() - alone[r][1][0].float()).abs().max())
                                       for r in everyone)}
    return out


def enable_vllm_mode(device: torch.device) -> str:
    """vLLM's batch-invariant mode for this process, before any CUDA work; where vLLM cannot be imported (the device
    machine), the settings its mode makes on Hopper and later GPUs (batch_invariant.enable_batch_invariant_mode and
    init_batch_invariance), which are plain torch; says which ran."""
    os.environ["VLLM_BATCH_INVARIANT"] = "1"
    if device.type == "cuda":
        try:
            from vllm.model_executor.determinism.batch_invariant import init_batch_invariance
        except ImportError:
            pass
        else:
            init_batch_invariance()
            return "vllm"
    # without vLLM: cuBLASLt with no split-K workspace (the only batch variance vLLM names on SM90+); vLLM's Triton
    # mean / softmax kernels and its Ampere Triton matmul are not installed, torch's own run instead
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    os.environ["CUBLASLT_WORKSPACE_SIZE"] = "1"
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cuda":
        torch.backends.cuda.preferred_blas_library(backend="cublaslt")
    return "pure-torch equivalent"


def vllm_mode_invariance(config: MDMConfig, device: torch.device, mode: str) -> dict:
    """Part 5: under vLLM's mode (enable_vllm_mode, already on), plain GEMMs over the whole step: part 4's check with
    the row tiles off, and the row count the runner's load-time check (plain_rows_verified) accepts, fp32 and bf16."""
    out: dict = {"mode": mode, "capability": list(torch.cuda.get_device_capability(device))
                 if device.type == "cuda" else None}
    requests, pool32 = mixed_requests(config, device)
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model_on(config, device, dtype, seed=6)
        model.row_tile = None  # plain GEMMs: each layer one GEMM over all the step's rows
        together, alone, everyone = alone_and_together(model, config, device, dtype, requests, pool32, gen)
        model.row_tile = ROW_TILE
        start = time.perf_counter()
        verified = plain_rows_verified(model)
        out[str(dtype).split(".")[-1]] = {
            "plain_gemm_logits_bitwise": all(torch.equal(together[1][r], alone[r][1][0]) for r in everyone),
            "plain_gemm_logits_max_abs_diff": max(float((together[1][r].float() - alone[r][1][0].float()).abs().max())
                                                  for r in everyone),
            "plain_rows_verified": verified, "check_s": round(time.perf_counter() - start, 2)}
        del model
    return out


def sparse_vs_dense(config: MDMConfig, device: torch.device, quick: bool) -> dict:
    model = random_model_on(config, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    gen_length, steps, side, img_steps = (64, 16, 8, 8) if quick else (1024, 256, 32, 64)
    prompt = torch.randint(5, 500, (64,), generator=torch.Generator().manual_seed(3)).to(device)
    options = SparseOptions(num_registers=8 if quick else 64)
    jobs = {"text": (text_plan(gen_length, 32, steps), SamplingConfig(temperature=0.0, seed=0)),
            "image_cfg": (image_plan(side, side, img_steps, "shift", "stratified", 5.0,
                                     torch.Generator().manual_seed(0)),
                          SamplingConfig(temperature=0.8, cfg_scale=4.0, seed=0))}
    out = {}
    with torch.inference_mode():
        for name, (plan, sampling) in jobs.items():
            generate_sparse(model, prompt, plan, sampling, options)  # warm-up (kernels, allocator)
            dense_s, dense = timed(lambda p=plan, s=sampling: generate_dense(model, prompt, p, s), device)
            sparse_s, sparse = timed(lambda p=plan, s=sampling: generate_sparse(model, prompt, p, s, options), device)
            bound = dense.forward_tokens / sparse.forward_tokens
            out[name] = {"positions": plan.length, "steps": plan.num_steps, "dense_s": round(dense_s, 3),
                         "sparse_s": round(sparse_s, 3), "speedup": round(dense_s / sparse_s, 3),
                         "token_bound": round(bound, 3), "fraction_of_bound": round(dense_s / sparse_s / bound, 3)}
            print(name, out[name], flush=True)
    out["paper_a100"] = PAPER_A100
    return out


def runner_core(config: MDMConfig, device: torch.device, quick: bool) -> dict:
    model = random_model_on(config, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    out: dict = {}
    for b in (1, 8) if quick else (1, 8, 32):
        ids, pos, pool, segments, layout, rows = step_batch(config, b, device, seed=b)
        pool = [p.to(next(model.parameters()).dtype) for p in pool]
        batch = (ids, pos, pool, segments, layout, rows)

        def invariant(batch=batch):
            ids, pos, pool, segments, _, rows = batch
            return model(ids, pos, PagedSpanAttention(pool, segments), rows)

        def unconstrained(batch=batch):  # plain GEMMs and the fused kernel over the packed batch
            ids, pos, pool, _, layout, rows = batch
            model.row_tile = None
            try:
                return model(ids, pos, FlexPagedAttention(pool, layout), rows)
            finally:
                model.row_tile = ROW_TILE

        runs = {"invariant_one_call": invariant, "unconstrained_flex": unconstrained}
        with torch.inference_mode():
            for name, fn in runs.items():
                fn()
                best = min(timed(fn, device)[0] for _ in range(3))
                out.setdefault(name, {})[str(b)] = {"step_ms": round(best * 1000, 3),
                                                    "rows_per_s": round(ids.numel() / best, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model (checks that the script runs)")
    parser.add_argument("--json", default="benchmarks/results/gpu.json")
    parser.add_argument("--vllm-mode", action="store_true",
                        help="part 5 alone, under vLLM's batch-invariant mode (its own process: the mode is global)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: kernel, invariance, sparse, runner")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = TINY if args.quick else LLADA_8B
    if args.vllm_mode:
        mode = enable_vllm_mode(device)  # before any CUDA work: cuBLAS reads its workspace settings once
        layers = TINY if args.quick else MDMConfig(**{**LLADA_8B.__dict__, "n_layers": 2})
        start = time.perf_counter()
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  "torch": torch.__version__, "vllm_mode_invariance": vllm_mode_invariance(layers, device, mode),
                  "model": {"d_model": layers.d_model, "n_layers": layers.n_layers},
                  "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                  "wall_s": round(time.perf_counter() - start, 1)}
        print("vllm mode", result["vllm_mode_invariance"], flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
        return
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "quick": args.quick, "model": {"d_model": config.d_model,
                                                                               "n_layers": config.n_layers,
                                                                               "vocab_size": config.vocab_size},
                    "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    start = time.perf_counter()
    if "kernel" not in skip:
        result["kernel_equality"] = kernel_equality(TINY if args.quick else TINY.__class__(
            **{**TINY.__dict__, "d_model": 1024, "n_heads": 8, "n_kv_heads": 8, "mlp_hidden_size": 2048}), device)
        print("kernel", result["kernel_equality"], flush=True)
    if "invariance" not in skip:
        result["invariance"] = invariance(TINY, device)
        print("invariance", result["invariance"], flush=True)
    if "sparse" not in skip:
        result["sparse_vs_dense"] = sparse_vs_dense(config, device, args.quick)
    if "runner" not in skip:
        result["runner_core"] = runner_core(config, device, args.quick)
        print("runner", result["runner_core"], flush=True)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
