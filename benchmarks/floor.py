"""The floor: FLOPs and bytes per step from the model shapes, the machine's measured rates, the achieved fraction."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import (
    Run,
    add_common_args,
    bench_model,
    image_workload,
    model_record,
    now,
    prompt_ids,
    setup,
    text_workload,
    time_interleaved,
)

import sparse_lavida_vllm.model_executor.attention as attention_module
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM


def matmul_rate(rows: int, d: int, out: int, repeats: int = 20, clock: Callable[[], float] = now) -> float:
    """Measured fp32 GFLOP/s of F.linear at (rows x d) @ (d x out), on the benchmarks' clock (see common.CLOCK)
    unless `clock` is given."""
    a, w = torch.randn(rows, d), torch.randn(out, d)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    t0 = clock()
    for _ in range(repeats):
        torch.nn.functional.linear(a, w)
    return 2 * rows * d * out * repeats / (clock() - t0) / 1e9


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Measured GB/s of a large tensor copy (read + write counted)."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = now()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * src.numel() * 4 * repeats / (now() - t0) / 1e9


class Counter:
    """Counts the work of a generate call from the shapes each layer sees (instrumentation, not a model)."""

    def __init__(self, config: MDMConfig) -> None:
        self.config = config
        self.flops = self.bytes = 0.0
        self.passes = self.rows = self.logit_rows = 0

    def layer_weights(self) -> int:
        c = self.config
        return 2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.n_kv_heads * c.head_dim \
            + 3 * c.d_model * c.mlp_hidden_size

    def on_pass(self, rows: int, logit_rows: int) -> None:
        c = self.config
        self.passes += 1
        self.rows += rows
        self.logit_rows += logit_rows
        self.flops += 2 * rows * self.layer_weights() * c.n_layers + 2 * logit_rows * c.d_model * c.vocab_size
        # weights are read once per pass (the LM head only when some logits are wanted)
        self.bytes += 4 * (self.layer_weights() * c.n_layers + (c.d_model * c.vocab_size if logit_rows else 0))

    def on_attention(self, q: torch.Tensor, k: torch.Tensor) -> None:
        heads, rows, dim = q.shape
        keys = k.shape[1]
        self.flops += 4 * heads * rows * keys * dim  # QK^T and PV
        self.bytes += 2 * k.numel() * k.element_size()  # K and V read


def count_work(model: LLaDAMDM, fn) -> Counter:
    counter = Counter(model.config)
    original_sdpa = attention_module.sdpa_with_mask
    original_forward = model.forward

    def sdpa(q, k, v, mask):
        counter.on_attention(q, k)
        return original_sdpa(q, k, v, mask)

    def forward(input_ids, positions, attention=None, logits_rows=None):
        counter.on_pass(input_ids.numel(), input_ids.numel() if logits_rows is None else logits_rows.numel())
        return original_forward(input_ids, positions, attention, logits_rows)

    attention_module.sdpa_with_mask = sdpa
    model.forward = forward
    try:
        fn()
    finally:
        attention_module.sdpa_with_mask = original_sdpa
        del model.forward
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    args = parser.parse_args()
    setup(args)
    run = Run("floor", args.quick)
    model = bench_model(args.quick)
    c = model.config
    run.data["model"] = model_record(c)

    def measure() -> dict:
        r = {f"mm_gflops_{n}x{c.d_model}x{c.mlp_hidden_size}":
             round(matmul_rate(n, c.d_model, c.mlp_hidden_size, 50 if n < 1000 else 20), 1) for n in (32, 128, 1088)}
        r["mm_gflops_2048x2048x2048"] = round(matmul_rate(2048, 2048, 2048, 5 if not args.quick else 1), 1)
        r["copy_gbps"] = round(copy_bandwidth(64 if args.quick else 256), 1)
        return r

    # Measured before and after the configurations; the best of the two is the machine's rate (other jobs share
    # these cores, so a single measurement can catch a busy moment and flatter the achieved fraction).
    before = measure()
    ws = [text_workload(64, 16), image_workload(8, 8)] if args.quick else [text_workload(256), image_workload(32, 64)]
    options = SparseOptions(8 if args.quick else 64)
    configs = {}
    with torch.inference_mode():
        for w in ws:
            prompt = prompt_ids(c, w.prompt_len)
            pair = {"dense": lambda w=w, p=prompt: generate_dense(model, p, w.plan, w.sampling),
                    "sparse": lambda w=w, p=prompt: generate_sparse(model, p, w.plan, w.sampling, options)}
            works = {name: count_work(model, fn) for name, fn in pair.items()}  # also the warm-up
            timed = time_interleaved(list(pair.values()), args.repeats)
            for name, (secs, _, _) in zip(pair, timed, strict=True):
                configs[f"{w.name}_{name}"] = (secs, w.plan.num_steps, works[name])
    after = measure()
    rates = {k: max(before[k], after[k]) for k in before}
    peak = max(v for k, v in rates.items() if k.startswith("mm_"))
    rates["peak_mm_gflops"] = peak
    run.data["machine_rates"] = rates
    run.data["machine_rates_before_after"] = {"before": before, "after": after}
    for key, (secs, steps, work) in configs.items():
        compute_s, memory_s = work.flops / (peak * 1e9), work.bytes / (rates["copy_gbps"] * 1e9)
        floor_s = max(compute_s, memory_s)
        configs[key] = {
            "seconds": round(secs, 4), "steps": steps, "passes": work.passes,
            "gflop_per_step": round(work.flops / steps / 1e9, 3),
            "mbytes_per_step": round(work.bytes / steps / 1e6, 2),
            "arithmetic_intensity_flop_per_byte": round(work.flops / work.bytes, 1),
            "achieved_gflops": round(work.flops / secs / 1e9, 1),
            "fraction_of_peak_mm": round(work.flops / secs / 1e9 / peak, 3),
            "floor_s": round(floor_s, 4), "bound_by": "compute" if compute_s >= memory_s else "memory",
            "fraction_of_floor": round(floor_s / secs, 3)}
        print(key, configs[key], flush=True)
    run.data["configs"] = configs
    run.data["notes"] = ("FLOPs: projections, MLP, LM head on the rows whose logits are taken, attention (QK^T + PV "
                         "over the keys each SDPA call actually sees). Bytes: weights once per pass + K/V read per "
                         "layer (activations ignored, so the memory floor is optimistic). peak_mm_gflops is the best "
                         "measured fp32 F.linear rate at the torch thread count recorded in machine, on the same "
                         "clock as the seconds (CPU seconds by default).")
    run.finish(args.json)


if __name__ == "__main__":
    main()
