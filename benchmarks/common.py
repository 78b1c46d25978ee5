"""Shared benchmark helpers: the benchmark model shape, workloads, timing, machine/version records, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from sparse_lavida_vllm.diffusion.planners import UnmaskPlan, image_plan, text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.weights import random_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# LLaDA-shaped (SwiGLU, RMSNorm, RoPE, no GQA, head_dim 64, untied head), scaled so a suite runs in minutes
# on two CPU cores; `--quick` shrinks it further for the smoke tests.
FULL_MODEL = MDMConfig(vocab_size=4096, d_model=384, n_layers=4, n_heads=6, n_kv_heads=6, mlp_hidden_size=1152,
                       rope_theta=500000.0, mask_token_id=4094, register_token_id=4095, eos_token_id=2)
QUICK_MODEL = MDMConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=256,
                        rope_theta=500000.0, mask_token_id=510, register_token_id=511, eos_token_id=2)
PROMPT_LEN = 64
NUM_REGISTERS = 64


@dataclass(frozen=True)
class Workload:
    """One generation job: a plan, sampling knobs and a prompt length."""

    name: str
    kind: str  # text | image
    plan: UnmaskPlan
    sampling: SamplingConfig
    prompt_len: int = PROMPT_LEN

    def describe(self) -> dict:
        return {"kind": self.kind, "gen_length": self.plan.length, "steps": self.plan.num_steps,
                "prompt_len": self.prompt_len, "sampling": asdict(self.sampling)}


def text_workload(gen_length: int, block_length: int = 32, steps_divisor: int = 4, seed: int = 0) -> Workload:
    """LLaDA-style semi-AR text: steps = gen_length / steps_divisor, greedy, low-confidence remasking."""
    plan = text_plan(gen_length, block_length, gen_length // steps_divisor)
    return Workload(f"text_{gen_length}", "text", plan, SamplingConfig(temperature=0.0, seed=seed))


def image_workload(side: int = 32, steps: int = 64, cfg_scale: float = 0.0, seed: int = 0) -> Workload:
    """LaViDa-O-style image: stratified order, shift schedule, temperature 0.8, CFG optional."""
    plan = image_plan(side, side, steps, "shift", "stratified", 5.0, torch.Generator().manual_seed(seed))
    name = f"image_{side * side}" + ("_cfg" if cfg_scale else "")
    return Workload(name, "image", plan, SamplingConfig(temperature=0.8, cfg_scale=cfg_scale, seed=seed))


def bench_model(quick: bool, dtype: torch.dtype = torch.float32) -> LLaDAMDM:
    return random_model(QUICK_MODEL if quick else FULL_MODEL, seed=0).to(dtype)


def prompt_ids(config: MDMConfig, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    """Random ordinary token ids (never the mask or register id)."""
    return torch.randint(3, config.mask_token_id - 1, (length,), generator=torch.Generator().manual_seed(seed))


def model_record(config: MDMConfig) -> dict:
    params = sum(p.numel() for p in LLaDAMDM(config).parameters()) if config.d_model <= 1024 else None
    return {"d_model": config.d_model, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "mlp_hidden_size": config.mlp_hidden_size,
            "vocab_size": config.vocab_size, "parameters": params, "weights": "random (seed 0, std 0.02)"}


# The clock of every "seconds" figure: CPU seconds of this (single-threaded) process by default. The two cores are
# shared with other jobs (load averages of 4-8 were seen), and wall time then mostly measures how long we waited
# for a core; on an idle core the two clocks agree. `--clock wall` switches; wall medians are recorded either way.
CLOCK = {"name": "cpu"}
WALL: dict[int, float] = {}  # id(fn) -> median wall seconds of the last time_interleaved call


def now() -> float:
    return time.process_time() if CLOCK["name"] == "cpu" else time.perf_counter()


def time_median(fn: Callable[[], object], repeats: int) -> tuple[float, list[float], object]:
    """Median seconds of `repeats` calls (the caller warms up first); returns the last result too."""
    (med, times, out), = time_interleaved([fn], repeats)
    return med, times, out


def time_interleaved(fns: list[Callable[[], object]], repeats: int) -> list[tuple[float, list[float], object]]:
    """Like time_median for several functions, run in turn (a, b, a, b, ...) so that a change in the load of
    this shared machine hits every contender alike; returns (median s, all s, last result) per function and
    leaves each function's median wall seconds in WALL[id(fn)]."""
    times: list[list[float]] = [[] for _ in fns]
    walls: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0, w0 = now(), time.perf_counter()
            outs[i] = fn()
            times[i].append(now() - t0)
            walls[i].append(time.perf_counter() - w0)
    for fn, w in zip(fns, walls, strict=True):
        WALL[id(fn)] = statistics.median(w)
    return [(statistics.median(t), t, o) for t, o in zip(times, outs, strict=True)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_record() -> dict:
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "amx_bf16": "amx_bf16" in flags, "avx512f": "avx512f" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def versions_record() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        from importlib.metadata import version
        pkg = version("sparse-lavida-vllm")
    except Exception:  # not installed: the benchmark still runs from the tree
        pkg = None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "sparse_lavida_vllm": pkg,
            "git_commit": commit}


class Run:
    """Collects one benchmark's JSON: machine (load average at start and end), versions, date, command."""

    def __init__(self, name: str, quick: bool) -> None:
        self.name, self.quick = name, quick
        self.start = time.perf_counter()
        self.data: dict = {"benchmark": name, "quick": quick,
                           "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                           "command": "python " + " ".join([f"benchmarks/{name}.py", *sys.argv[1:]]),
                           "clock": CLOCK["name"],
                           "machine": {**machine_record(), "load_avg_start": list(os.getloadavg())},
                           "versions": versions_record()}

    def finish(self, out: str | None) -> dict:
        self.data["machine"]["load_avg_end"] = list(os.getloadavg())
        self.data["wall_s"] = round(time.perf_counter() - self.start, 2)
        text = json.dumps(self.data, indent=2) + "\n"
        if out is not None:
            path = Path(out) if out else RESULTS / f"{self.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return self.data


def add_common_args(parser) -> None:
    parser.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                        help="write the JSON result (default benchmarks/results/<name>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny model and workloads (smoke test, seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    # One thread by default: the two cores are shared with other jobs, and a 2-thread OpenMP team whose second
    # thread is descheduled runs ~3x slower than one thread (measured), which would swamp the ratios.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU seconds (robust on shared cores, needs --threads 1); wall: elapsed")


def setup(args) -> None:
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("--clock cpu needs --threads 1 (CPU seconds of several threads are not elapsed seconds)")
    CLOCK["name"] = args.clock
    torch.manual_seed(0)
