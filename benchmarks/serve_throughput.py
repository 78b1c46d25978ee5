"""Engine overhead (batch-1 step latency: vLLM engine vs reference sparse sampler) and throughput at 1-32 requests.

Runs vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, in a child process) on a random LLaDA-shaped checkpoint
written to a temp folder. One engine times every runner mode (invariant: the default batch-invariant forward;
invariant_tiles: the same with the 64-row GEMM tiles always on; unconstrained: `batch_invariant: false`, plain
GEMMs + one batched attention call per layer), switching between request groups, so their ratios come from one
process under one load.
`--model demo` times the bundled demo model (d_model 128): the cheap-step regime, where per-request host work shows.
`--server` times it through a real `sparse-lavida serve` instead: 8 seeded requests one after another, then the same 8
at once, per runner mode (default, and `batch_invariant: false`), and checks the tokens are the same both ways.
`--baseline REV` runs every measurement also on the code of git revision REV (a worktree on PYTHONPATH), interleaved
with the working tree's, so before and after come from one run under one load.
Usage: python benchmarks/serve_throughput.py [--model full|quick|wide|demo] [--server] [--baseline REV]
       [--modes M,...] [--threads N] [--rounds N] [--json] [--out benchmarks/results/serve_throughput.json]
`--model wide` (d_model 1024) asks where the step's time goes once the GEMMs dominate the per-row work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from floor import Counter, matmul_rate

from sparse_lavida_vllm.diffusion.planners import text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_sparse
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model, save_pretrained

MODELS = {
    "full": MDMConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768,
                      mask_token_id=2046, register_token_id=2047, eos_token_id=2, max_sequence_length=1024,
                      num_registers=32),
    "quick": MDMConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=256,
                       mask_token_id=510, register_token_id=511, eos_token_id=2, max_sequence_length=512,
                       num_registers=8),
    # LLaDA-8B's width ratio (mlp 2.75 d_model) at 1/4 of its width, two layers: GEMMs dominate each row's work
    "wide": MDMConfig(vocab_size=2048, d_model=1024, n_layers=2, n_heads=16, n_kv_heads=16, mlp_hidden_size=2816,
                      mask_token_id=2046, register_token_id=2047, eos_token_id=2, max_sequence_length=1024,
                      num_registers=32),
    "demo": None,  # the bundled demo checkpoint itself (d_model 128, 4 layers)
}
ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "sparse_lavida_vllm" / "assets" / "demo" / "sparse"
# the server mode's requests: the measurement (64 tokens, 32 steps, temperature 0.8, seeded)
SERVER_REQUESTS, SERVER_KNOBS, SERVER_TEMPERATURE = 8, {"gen_length": 64, "steps": 32}, 0.8


def SERVER_PROMPT(i: int) -> str:  # noqa: N802 - a constant of the workload, like the ones above
    """Request i's prompt: eight lengths, so no two requests share a shape (as real traffic)."""
    return f"request {i}: " + "count to ten, " * (1 + i)
PROMPT_LEN, GEN_LENGTH, BLOCK_LENGTH, STEPS = 64, 64, 32, 32
CONCURRENCY = (1, 4, 8, 16, 32)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_CI_ENV": "1"}


def prompt(i: int, vocab: int) -> list[int]:
    return [(7 * i + 13 * j) % (vocab - 8) + 3 for j in range(PROMPT_LEN)]


def knobs(num_registers: int) -> dict:
    return {"gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, "steps": STEPS, "num_registers": num_registers}


def reference_run(folder: Path, config: MDMConfig):
    """A callable that runs the pure-PyTorch sparse sampler on one request (prefill included, as in the engine)."""
    model = load_pretrained(folder)
    plan = text_plan(GEN_LENGTH, BLOCK_LENGTH, STEPS)
    ids = torch.tensor(prompt(0, config.vocab_size))
    options = SparseOptions(num_registers=config.num_registers)

    def run(seed: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        generate_sparse(model, ids, plan, SamplingConfig(seed=seed), options)
        return time.perf_counter() - start, time.process_time() - cpu

    return run


# runner modes: the default (batch-invariant; plain GEMMs where they are checked to give the tiles' bits), the same
# with the row tiles always on, and the unconstrained runner. Each is the runner state its --additional-config sets
# at load (model_runner.load_model), so one engine switches between them between request groups and every mode is
# timed in the same process, interleaved: a shared machine's load then weighs on all alike.
MODES = ("invariant", "invariant_tiles", "unconstrained")


class RunnerState(NamedTuple):
    """The runner attributes `--additional-config` sets at load: runner.batch_invariant, model.row_tile/plain_rows."""

    batch_invariant: bool
    row_tile: int | None
    plain_rows: int


def mode_state(mode: str, row_tile: int, plain_rows: int) -> RunnerState:
    """The state `mode` loads with, from the tile and checked plain rows the default mode loaded with."""
    if mode == "unconstrained":
        return RunnerState(False, None, 0)
    return RunnerState(True, row_tile, plain_rows if mode == "invariant" else 0)


def set_mode(runner, state: RunnerState) -> None:
    """Puts the runner in a mode_state between request groups."""
    runner.batch_invariant, runner.model.row_tile, runner.model.plain_rows = state


def child(folder: Path, modes: list[str], repeats: int) -> dict:
    """Runs inside its own process: one vLLM engine; per mode, batch-1 latency then throughput per concurrency."""
    os.environ.update(VLLM_ENV)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import sparse_lavida_vllm.model_executor.model as model_module

    config = MDMConfig.load(folder)
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_num_seqs=32,
              max_model_len=PROMPT_LEN + GEN_LENGTH, additional_config={"batch_invariant": True}, seed=0)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    # the default mode as loaded (its tile, and the plain rows the load-time check found) gives every mode's state
    states = {m: mode_state(m, runner.model.row_tile, runner.model.plain_rows) for m in modes}

    def run(n: int, seed0: int) -> tuple[float, float]:
        prompts = [TokensPrompt(prompt_token_ids=prompt(i, config.vocab_size)) for i in range(n)]
        params = [SamplingParams(max_tokens=GEN_LENGTH, temperature=0, seed=seed0 + i, ignore_eos=True,
                                 detokenize=False, extra_args=knobs(config.num_registers)) for i in range(n)]
        start, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert all(len(o.outputs[0].token_ids) == GEN_LENGTH for o in outs)
        return wall, cpu

    # Batch-1 latency against the reference sampler, interleaved; the best of each (the least disturbed run).
    reference = reference_run(folder, config)
    reference(0)
    engine_s: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    reference_s = []
    for mode in modes:
        set_mode(runner, states[mode])
        run(1, 0)  # warm-up
    for r in range(repeats):
        for mode in modes:
            set_mode(runner, states[mode])
            engine_s[mode].append(run(1, r))
        reference_s.append(reference(r))

    def best(samples, i):  # wall (i=0) or process CPU seconds (i=1)
        return min(t[i] for t in samples)

    # Throughput: step the engine by hand and time every engine step while all n requests run; a low
    # percentile of those many short samples is robust to the load spikes of a shared machine.
    engine = llm.llm_engine

    def best_matmul_rate() -> float:  # F.linear's GFLOP/s at an 8-request pass's shape, best of 3
        return max(matmul_rate(8 * (config.num_registers + 20), config.d_model, config.mlp_hidden_size,
                               clock=time.perf_counter) for _ in range(3))

    peak = best_matmul_rate()  # the rate to compare with: measured before and after the timed steps, the best kept
    step_s = {m: {n: [] for n in CONCURRENCY} for m in modes}
    step_flops = {m: {n: [] for n in CONCURRENCY} for m in modes}
    gemm_s = {m: {n: 0.0 for n in CONCURRENCY} for m in modes}
    passes: list[tuple[int, int]] = []  # (rows, logit rows) of each forward of the engine step being timed
    hook = runner.model.register_forward_pre_hook(lambda _, args: passes.append((args[0].numel(), args[3].numel())))
    # the model's forward time inside each step; the rest of the step is host work (scheduler, row building, slot
    # mapping, sampling, output processing)
    model_clock, forward_start = [0.0], [0.0]
    start_hook = runner.model.register_forward_pre_hook(lambda *_: forward_start.__setitem__(0, time.perf_counter()))
    end_hook = runner.model.register_forward_hook(
        lambda *_: model_clock.__setitem__(0, model_clock[0] + time.perf_counter() - forward_start[0]))
    model_s = {m: {n: [] for n in CONCURRENCY} for m in modes}
    # seconds inside the model's GEMMs (model.tiled, looked up at each call): their share of a step's time does not
    # depend on how busy the shared machine is, unlike a rate against a separately measured matmul rate
    gemm_clock, untimed = [0.0], model_module.tiled

    def timed_tiled(*args):
        start = time.perf_counter()
        out = untimed(*args)
        gemm_clock[0] += time.perf_counter() - start
        return out

    model_module.tiled = timed_tiled
    for r in range(max(2, repeats // 3)):
        for n in CONCURRENCY:
            for mode in modes:
                set_mode(runner, states[mode])
                for i in range(n):
                    engine.add_request(f"t{r}-{n}-{mode}-{i}",
                                       TokensPrompt(prompt_token_ids=prompt(i, config.vocab_size)),
                                       SamplingParams(max_tokens=GEN_LENGTH, temperature=0, seed=i, ignore_eos=True,
                                                      detokenize=False, extra_args=knobs(config.num_registers)))
                while engine.has_unfinished_requests():
                    passes.clear()
                    start, in_gemms, in_model = time.perf_counter(), gemm_clock[0], model_clock[0]
                    engine.step()
                    step_s[mode][n].append(time.perf_counter() - start)
                    model_s[mode][n].append(model_clock[0] - in_model)
                    gemm_s[mode][n] += gemm_clock[0] - in_gemms
                    work = Counter(config)  # floor.py's count: projections and MLP on every row, LM head on sampled
                    for rows, logits in passes:
                        work.on_pass(rows, logits)
                    step_flops[mode][n].append(work.flops)
    for h in (hook, start_hook, end_hook):
        h.remove()
    model_module.tiled = untimed
    peak = max(peak, best_matmul_rate())

    def low(samples: list[float]) -> float:
        return sorted(samples)[len(samples) // 5]  # 20th percentile

    def median(samples: list[float]) -> float:
        return sorted(samples)[len(samples) // 2]

    def step_rate(mode: str, n: int) -> float:  # GFLOP/s of the n-request steps, 80th percentile (least disturbed)
        rates = sorted(f / s for f, s in zip(step_flops[mode][n], step_s[mode][n]))
        return rates[len(rates) * 4 // 5] / 1e9

    tokens_per_step = GEN_LENGTH / STEPS  # per request
    ref_ms = best(reference_s, 0) / STEPS * 1000, best(reference_s, 1) / STEPS * 1000
    return {mode: {
        "step_ms": best(engine_s[mode], 0) / STEPS * 1000, "reference_step_ms": ref_ms[0],
        "step_cpu_ms": best(engine_s[mode], 1) / STEPS * 1000, "reference_step_cpu_ms": ref_ms[1],
        "engine_torch_threads": torch.get_num_threads(),  # the engine runs in this process
        "plain_gemm_rows": states[mode].plain_rows if states[mode].row_tile else None,  # None: no tiles at all
        "engine_step_ms": {n: low(t) * 1000 for n, t in step_s[mode].items()},
        # the step split into the model's forward and the host work around it, medians over the timed steps
        "model_step_ms": {n: median(t) * 1000 for n, t in model_s[mode].items()},
        "host_step_ms": {n: median([s - f for s, f in zip(step_s[mode][n], t, strict=True)]) * 1000
                         for n, t in model_s[mode].items()},
        "tokens_per_s": {n: n * tokens_per_step / low(t) for n, t in step_s[mode].items()},
        # the GEMMs' FLOPs (projections, MLP, LM head on the sampled rows; attention not counted) per engine step
        # second, against F.linear's rate at an 8-request pass's shape in this process; both the least disturbed
        # of many measurements, as tokens_per_s uses the fast steps
        "matmul_gflops": peak,
        "gemm_fraction_of_matmul_rate": {n: step_rate(mode, n) / peak for n in CONCURRENCY},
        "gemm_time_share": {n: gemm_s[mode][n] / sum(step_s[mode][n]) for n in CONCURRENCY}} for mode in modes}


def best_of(runs: list[dict]) -> dict:
    """Each figure's best over one mode's runs (the least time, the most tokens/s): its least disturbed run."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key == "gemm_time_share":  # a ratio of two times the load stretches alike: the runs' mean
            out[key] = {n: sum(r[key][n] for r in runs) / len(runs) for n in value}
        elif isinstance(value, dict):
            pick = max if key in ("tokens_per_s", "gemm_fraction_of_matmul_rate") else min
            out[key] = {n: pick(r[key][n] for r in runs) for n in value}
        elif key.endswith("_ms"):
            out[key] = min(r[key] for r in runs)
    return out


def cost_ratio(modes: dict[str, dict], invariant_mode: str) -> dict[str, float] | None:
    """Unconstrained tokens/s over `invariant_mode`'s at each concurrency, or None if either was not run."""
    if "unconstrained" not in modes or invariant_mode not in modes:
        return None
    fast, slow = modes["unconstrained"]["tokens_per_s"], modes[invariant_mode]["tokens_per_s"]
    return {n: fast[n] / slow[n] for n in slow}


@contextmanager
def code_at(rev: str | None):
    """The environment that runs the package from git revision `rev` (its tree exported to a temporary folder, first
    on PYTHONPATH; children start outside the repository so no other copy shadows it), or from the working tree."""
    if rev is None:
        yield {}, str(ROOT)
        return
    with tempfile.TemporaryDirectory(prefix="serve-bench-rev-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "sparse_lavida_vllm"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield {"PYTHONPATH": tmp}, tmp


def engine_rounds(folder: Path, model: str, modes_run: list[str], env: dict, cwd: str) -> dict:
    """One child engine process (see child()) on the code `env` selects; its per-mode results."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), "--modes", ",".join(modes_run)]
    cmd += ["--quick"] if model == "quick" else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=cwd)
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_mode(mode: str, rounds: int, env: dict, cwd: str, log_dir: Path) -> dict:
    """A real `sparse-lavida serve` of the bundled model in runner `mode`: SERVER_REQUESTS seeded requests one after
    another, then all at once, `rounds` times; wall seconds of each, and whether every request's tokens were the
    same in every run (its seed fixes them whatever shares its engine steps)."""
    import httpx

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.serving_helpers import Server

    extra = [] if mode == "invariant" else ["--additional-config", json.dumps({"batch_invariant": False})]
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env)
    os.chdir(cwd)  # the server imports the package from PYTHONPATH, not from the current folder
    try:
        server = Server(None, ["--max-num-seqs", "32", *extra], timeout=600, log_dir=log_dir)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    try:
        client = httpx.Client(base_url=server.base_url, timeout=600)
        name = client.get("/v1/models").json()["data"][0]["id"]

        def ask(i: int) -> list[int]:
            body = {"model": name, "prompt": SERVER_PROMPT(i), "max_tokens": SERVER_KNOBS["gen_length"],
                    "temperature": SERVER_TEMPERATURE, "seed": 100 + i, "ignore_eos": True, "return_token_ids": True,
                    "vllm_xargs": SERVER_KNOBS}
            response = client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["token_ids"]

        ask(0)  # warm-up
        tokens: dict[int, list[list[int]]] = {i: [] for i in range(SERVER_REQUESTS)}
        sequential_s, concurrent_s = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(SERVER_REQUESTS):
                tokens[i].append(ask(i))
            sequential_s.append(time.perf_counter() - start)
            answers: dict[int, list[int]] = {}

            def answer(i: int, into: dict[int, list[int]] = answers) -> None:
                into[i] = ask(i)

            workers = [threading.Thread(target=answer, args=(i,)) for i in range(SERVER_REQUESTS)]
            start = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            concurrent_s.append(time.perf_counter() - start)
            for i, answer in answers.items():
                tokens[i].append(answer)
        client.close()
    finally:
        server.stop()
    speedups = sorted(s / c for s, c in zip(sequential_s, concurrent_s, strict=True))
    return {"sequential_s": sequential_s, "concurrent_s": concurrent_s,
            "concurrent_speedup": speedups, "median_concurrent_speedup": speedups[len(speedups) // 2],
            "concurrent_tokens_per_s": SERVER_REQUESTS * SERVER_KNOBS["gen_length"] / min(concurrent_s),
            "identical_tokens": sum(all(t == runs[0] for t in runs) for runs in tokens.values()),
            "requests": SERVER_REQUESTS}


def server_main(args, versions: dict[str, str | None]) -> dict:
    """--server: every code version x runner mode, interleaved round by round (a fresh server each time)."""
    modes = ["invariant", "unconstrained"]
    runs: dict[str, dict[str, list[dict]]] = {v: {m: [] for m in modes} for v in versions}
    with tempfile.TemporaryDirectory(prefix="serve-bench-logs-") as logs:
        for _ in range(args.rounds):
            for version, rev in versions.items():
                with code_at(rev) as (env, cwd):
                    for mode in modes:
                        runs[version][mode].append(server_mode(mode, 3, env, cwd, Path(logs)))
    out = {}
    for version, by_mode in runs.items():
        merged = {}
        for mode, results in by_mode.items():
            speedups = sorted(x for r in results for x in r["concurrent_speedup"])
            merged[mode] = {"sequential_s": [x for r in results for x in r["sequential_s"]],
                            "concurrent_s": [x for r in results for x in r["concurrent_s"]],
                            "concurrent_speedup": speedups,
                            "median_concurrent_speedup": speedups[len(speedups) // 2],
                            "concurrent_tokens_per_s": max(r["concurrent_tokens_per_s"] for r in results),
                            "identical_tokens": min(r["identical_tokens"] for r in results),
                            "requests": SERVER_REQUESTS}
        cost = merged["unconstrained"]["concurrent_tokens_per_s"] / merged["invariant"]["concurrent_tokens_per_s"]
        out[version] = {"rev": versions[version] or "working tree", "modes": merged,
                        "invariance_cost_at_8_concurrent": cost}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="full", choices=list(MODELS),
                        help="full: d_model 256 x 4 layers; quick: tiny, fewer repeats (smoke run); "
                             "wide: d_model 1024; demo: the bundled demo checkpoint (d_model 128)")
    parser.add_argument("--quick", action="store_true", help="same as --model quick")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="runner modes to run, comma-separated (invariance costs need invariant and "
                             "unconstrained)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", default=None,
                        help="also write the JSON here (benchmarks/results/serve_throughput.json feeds report.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the engine and the reference (OMP_NUM_THREADS); on a machine shared "
                             "with other work, 1 keeps the timings from waiting on busy cores")
    parser.add_argument("--rounds", type=int, default=1,
                        help="engine processes to run (each times every mode, interleaved); each mode's best "
                             "figures over them are kept")
    parser.add_argument("--server", action="store_true",
                        help="through a real server on the bundled model: 8 concurrent vs 8 sequential seeded requests")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also measure the code of this git revision, interleaved (before/after in one run)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = "quick" if args.quick else args.model
    repeats = 3 if model == "quick" else 7
    modes_run = args.modes.split(",")
    if unknown := set(modes_run) - set(MODES):
        raise SystemExit(f"--modes: unknown runner mode(s) {sorted(unknown)}; choose from {list(MODES)}")
    if args.child:
        print(json.dumps(child(Path(args.child), modes_run, repeats)))
        return

    if args.baseline:  # the commit itself, so the JSON says what "before" was
        args.baseline = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], check=True,
                                       capture_output=True, text=True).stdout.strip()
    versions = {"after": None, **({"before": args.baseline} if args.baseline else {})}
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": args.threads or torch.get_num_threads()}
    if args.server:
        result = {"machine": machine, "model": "bundled demo (d_model 128, 4 layers)",
                  "workload": {"requests": SERVER_REQUESTS, "temperature": SERVER_TEMPERATURE, **SERVER_KNOBS,
                               "prompts": [SERVER_PROMPT(i) for i in range(SERVER_REQUESTS)]},
                  "rounds": args.rounds, "servers": server_main(args, versions), "load_average": os.getloadavg()}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        for version, r in result["servers"].items():
            for mode, m in r["modes"].items():
                print(f"server [{version} {r['rev']}, {mode}]: 8 concurrent vs sequential x"
                      f"{m['median_concurrent_speedup']:.2f} (runs " + " / ".join(f"{x:.2f}" for x in
                                                                        m["concurrent_speedup"])
                      + f"), {m['concurrent_tokens_per_s']:.0f} tokens/s, identical tokens "
                      f"{m['identical_tokens']}/{m['requests']}")
            print(f"  invariance cost at 8 concurrent: x{r['invariance_cost_at_8_concurrent']:.2f}")
        return

    config = MDMConfig.load(DEMO) if model == "demo" else MODELS[model]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        folder = DEMO if model == "demo" else Path(tmp)
        if model != "demo":
            save_pretrained(random_model(config, seed=0, std=0.1), folder)
        runs = {v: {mode: [] for mode in modes_run} for v in versions}
        base_env = {**os.environ, **VLLM_ENV, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        for _ in range(args.rounds):
            for version, rev in versions.items():  # before and after alternate: one load weighs on both
                with code_at(rev) as (env, cwd):
                    for mode, result in engine_rounds(folder, model, modes_run, {**base_env, **env}, cwd).items():
                        runs[version][mode].append(result)
        by_version = {v: {mode: best_of(results) for mode, results in r.items()} for v, r in runs.items()}

    def summary(modes: dict[str, dict]) -> dict:
        return {
            "modes": {m: {**r, "overhead_ratio": r["step_ms"] / r["reference_step_ms"],
                          "overhead_ratio_cpu": r["step_cpu_ms"] / r["reference_step_cpu_ms"],
                          "speedup_at_8": r["tokens_per_s"]["8"] / r["tokens_per_s"]["1"]}
                      for m, r in modes.items()},
            # what batch invariance costs: unconstrained tokens/s over invariant tokens/s (1.0 = free), by default
            # and with the row tiles always on (absent when --modes left either side out)
            "invariance_cost": cost_ratio(modes, "invariant"),
            "invariance_cost_tiles": cost_ratio(modes, "invariant_tiles"),
        }

    result = {
        "machine": machine,
        "model": {"d_model": config.d_model, "n_layers": config.n_layers, "n_heads": config.n_heads,
                  "vocab_size": config.vocab_size, "num_registers": config.num_registers,
                  **({"checkpoint": "bundled demo"} if model == "demo" else {})},
        "workload": {"prompt_len": PROMPT_LEN, **knobs(config.num_registers)},
        "load_average": os.getloadavg(),
        "rounds": args.rounds,
        **summary(by_version["after"]),
        **({"baseline": {"rev": args.baseline, **summary(by_version["before"])}} if args.baseline else {}),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for where, part in (("", result), (f"[baseline {args.baseline}] ", result.get("baseline"))):
            for m, r in (part or {}).get("modes", {}).items():
                tps = ", ".join(f"{n}: {v:.0f}" for n, v in r["tokens_per_s"].items())
                frac = ", ".join(f"{n}: {v:.0%}" for n, v in r["gemm_fraction_of_matmul_rate"].items())
                print(f"{where}engine [{m}]: {r['step_ms']:.2f} ms/step vs reference {r['reference_step_ms']:.2f} "
                      f"(x{r['overhead_ratio']:.2f}, CPU time x{r['overhead_ratio_cpu']:.2f}); tokens/s {tps}; "
                      f"8 vs 1: x{r['speedup_at_8']:.2f}; GEMM FLOP/s / matmul rate {frac}; GEMM share of step time "
                      + ", ".join(f"{n}: {v:.0%}" for n, v in r["gemm_time_share"].items()))
                print(f"  host / model ms per step [{m}]: " + ", ".join(
                    f"{n}: {r['host_step_ms'][n]:.1f} / {r['model_step_ms'][n]:.1f}" for n in r["host_step_ms"]))
            for key, label in (("invariance_cost", "invariance cost (unconstrained / invariant tokens/s)"),
                               ("invariance_cost_tiles", "  with the row tiles always on")):
                if part and part[key]:
                    print(f"{where}{label}: " + ", ".join(f"{n}: x{v:.2f}" for n, v in part[key].items()))


if __name__ == "__main__":
    main()
