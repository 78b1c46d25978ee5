"""Would fusing the GEMMs that share an input (q/k/v; ff_proj/up_proj) pay on CPU? One engine step, fused vs not.

Issue 23 item 5. For the bundled demo model (d_model 128), a d_model 256 and a d_model 1024 model: one invariant
step (PagedSpanAttention, the served GEMM tiles with plain_rows_verified as the runner sets them) of 1 / 8 / 32
sparse requests mid-generation, timed with the blocks as they are (7 GEMMs per layer) and with q/k/v and
ff_proj/up_proj fused into one GEMM each (5 per layer), the two interleaved in one run on one torch thread; the
median of each (process CPU time and wall time) and their ratio. It also checks that the fused step is
batch-invariant (each request alone vs in the step, logits bit for bit) and how far its logits are from the
unfused ones (fusing changes the GEMM's shape).
Usage: python benchmarks/fused_gemm.py [--repeats 7] [--json benchmarks/results/fused_gemm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lavida_vllm.diffusion.masks import inference_step_spans
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDABlock, LLaDAMDM, apply_rope, plain_rows_verified, tiled
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model
from sparse_lavida_vllm.worker.paged_attention import PagedSpanAttention, Segment, request_slots

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "sparse_lavida_vllm" / "assets" / "demo" / "sparse"
MODELS = {
    "d256": MDMConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768,
                      mask_token_id=2046, register_token_id=2047, eos_token_id=2, max_sequence_length=1024,
                      num_registers=8),
    "d1024": MDMConfig(vocab_size=2048, d_model=1024, n_layers=2, n_heads=16, n_kv_heads=16, mlp_hidden_size=2816,
                       mask_token_id=2046, register_token_id=2047, eos_token_id=2, max_sequence_length=1024,
                       num_registers=8),
}
BLOCK = 16
CACHED, COMMIT, DECODE, REGISTERS = 64, 8, 32, 8  # each request's step: 48 rows over 64 cached keys


def fused_forward(self: LLaDABlock, x: Tensor, cos: Tensor, sin: Tensor, layer: int, attention, tile=None) -> Tensor:
    """LLaDABlock.forward with one q/k/v GEMM and one ff_proj/up_proj GEMM (the weights concatenated by fuse)."""
    rows, hd = x.shape[0], self.head_dim
    h = self.attn_norm(x)
    q, k, v = tiled(self.qkv, h, tile).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], -1)
    q = apply_rope(q.reshape(rows, self.n_heads, hd), cos, sin)
    k = apply_rope(k.reshape(rows, self.n_kv_heads, hd), cos, sin)
    v = v.reshape(rows, self.n_kv_heads, hd)
    x = x + self.tp.all_reduce(tiled(self.attn_out, attention.attend(layer, q, k, v).reshape(rows, -1), tile))
    gate, up = tiled(self.gate_up, self.ff_norm(x), tile).chunk(2, -1)
    return x + self.tp.all_reduce(tiled(self.ff_out, F.silu(gate) * up, tile))


def fuse(model: LLaDAMDM) -> LLaDAMDM:
    """A copy of `model` whose blocks run fused_forward (q/k/v and ff_proj/up_proj concatenated along outputs)."""
    fused = LLaDAMDM(model.config)
    fused.load_state_dict(model.state_dict())
    for block in fused.model.transformer["blocks"]:
        block.qkv = nn.Linear(block.q_proj.in_features, 1, bias=False)
        block.qkv.weight = nn.Parameter(torch.cat([block.q_proj.weight, block.k_proj.weight, block.v_proj.weight]))
        block.qkv.out_features = block.qkv.weight.shape[0]
        block.gate_up = nn.Linear(block.ff_proj.in_features, 1, bias=False)
        block.gate_up.weight = nn.Parameter(torch.cat([block.ff_proj.weight, block.up_proj.weight]))
        block.gate_up.out_features = block.gate_up.weight.shape[0]
        for name in ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj"):
            delattr(block, name)
        block.forward = types.MethodType(fused_forward, block)
    return fused.eval()


def step(config: MDMConfig, n: int, seed: int = 0):
    """n sparse requests mid-generation over a random paged pool: (ids, positions, pool, segments, logits rows)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-(CACHED + COMMIT) // BLOCK)
    pool = [torch.randn(2, n * blocks * BLOCK, config.n_kv_heads, config.head_dim, generator=gen)
            for _ in range(config.n_layers)]
    rows = COMMIT + DECODE + REGISTERS
    ids, positions, segments, wanted = [], [], [], []
    for r in range(n):
        table = list(range(r * blocks, (r + 1) * blocks))
        ids.append(torch.cat([torch.randint(5, config.vocab_size - 8, (COMMIT,), generator=gen),
                              torch.full((DECODE,), config.mask_token_id),
                              torch.full((REGISTERS,), config.register_token_id)]))
        positions.append(torch.cat([CACHED + torch.arange(COMMIT + DECODE), 400 + torch.arange(REGISTERS)]))
        segments.append(Segment(r * rows, (r + 1) * rows, request_slots(table, 0, CACHED, BLOCK),
                                request_slots(table, CACHED, CACHED + COMMIT, BLOCK),
                                inference_step_spans(CACHED, rows, COMMIT, COMMIT)))
        wanted.append(torch.arange(r * rows + COMMIT, r * rows + COMMIT + DECODE))
    return torch.cat(ids), torch.cat(positions), pool, segments, torch.cat(wanted)


def run_step(model: LLaDAMDM, batch) -> Tensor:
    ids, positions, pool, segments, wanted = batch
    return model(ids, positions, PagedSpanAttention([p.clone() for p in pool], segments), wanted)


def alone_vs_batched(model: LLaDAMDM, config: MDMConfig, n: int = 4) -> bool:
    """Each request's logits alone == in a step of n (the same request data in both)."""
    ids, positions, pool, segments, wanted = step(config, n, seed=3)
    together = run_step(model, (ids, positions, pool, segments, wanted)).split(DECODE)
    rows = COMMIT + DECODE + REGISTERS
    for r, seg in enumerate(segments):
        alone = Segment(0, rows, seg.cached_slots, seg.commit_slots, seg.spans)
        logits = run_step(model, (ids[r * rows:(r + 1) * rows], positions[r * rows:(r + 1) * rows], pool, [alone],
                                  torch.arange(COMMIT, COMMIT + DECODE)))
        if not torch.equal(logits, together[r]):
            return False
    return True


def measure(name: str, model: LLaDAMDM, repeats: int, counts: tuple[int, ...]) -> dict:
    config = model.config
    variants = {"unfused": model, "fused": fuse(model)}
    for m in variants.values():  # the runner's load-time check, per variant (fusing changes the GEMM shapes)
        m.plain_rows = plain_rows_verified(m)
    out: dict = {"d_model": config.d_model, "n_layers": config.n_layers, "mlp_hidden_size": config.mlp_hidden_size,
                 "plain_rows": {k: m.plain_rows for k, m in variants.items()}}
    with torch.inference_mode():
        out["fused_invariant"] = alone_vs_batched(variants["fused"], config)
        out["unfused_invariant"] = alone_vs_batched(variants["unfused"], config)
        for n in counts:
            batch = step(config, n)
            ref = run_step(variants["unfused"], batch)
            out.setdefault("fused_max_abs_logit_diff", {})[str(n)] = float(
                (run_step(variants["fused"], batch) - ref).abs().max())
            wall: dict[str, list[float]] = {k: [] for k in variants}
            cpu: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(repeats):  # interleaved, so load changes hit both alike
                for k, m in variants.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    run_step(m, batch)
                    cpu[k].append(time.process_time() - start_cpu)
                    wall[k].append(time.perf_counter() - start)
            for label, samples in (("step_cpu_ms", cpu), ("step_wall_ms", wall)):
                med = {k: statistics.median(v) for k, v in samples.items()}
                out.setdefault(label, {})[str(n)] = {k: round(v * 1000, 3) for k, v in med.items()}
                out.setdefault(label.replace("step", "unfused_over_fused").replace("_ms", ""), {})[str(n)] = round(
                    med["unfused"] / med["fused"], 3)
            print(name, n, out["step_cpu_ms"][str(n)], "ratio (cpu, wall)", out["unfused_over_fused_cpu"][str(n)],
                  out["unfused_over_fused_wall"][str(n)], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="benchmarks/results/fused_gemm.json")
    parser.add_argument("--models", default="demo_d128,d256,d1024", help="comma-separated: demo_d128, d256, d1024")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = (1, 8, 32)
    start = time.time()
    result: dict = {"machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                "load_average_start": os.getloadavg()},
                    "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                    "step": {"cached": CACHED, "commit": COMMIT, "decode": DECODE, "registers": REGISTERS},
                    "ratio": "unfused step time / fused step time (> 1: fusing is faster); cpu: this process's "
                             "CPU time (less disturbed by other processes on a loaded machine), wall: elapsed",
                    "models": {}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        model = load_pretrained(DEMO) if name == "demo_d128" else random_model(MODELS[name], seed=0, std=0.02)
        result["models"][name] = measure(name, model.eval(), args.repeats, counts)
        result["machine"]["load_average_end"] = os.getloadavg()
        result["wall_s"] = round(time.time() - start, 1)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")  # after each model: a cut run keeps its part
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
