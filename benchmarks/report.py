"""Render benchmarks/RESULTS.md and its plots from benchmarks/results/*.json (`--run` re-runs the benchmarks first)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE  # RESULTS.md; the PNGs go to OUT / PLOTS
PLOTS = "plots"
BENCHMARKS = ("sparse_vs_dense", "peers", "floor", "images")
# The paper's numbers (A100, LaViDa-O 10.4B) and Fast-dLLM's, quoted for side-by-side reading.
PAPER = {"image_1024": 1.95, "image_1024_cfg": 1.95, "text": 2.80}
PAPER_TABLE6 = {(True, False, False): 1.29, (False, True, False): 1.13, (False, False, True): 1.19,
                (True, True, True): 1.96}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(data: dict) -> str:
    m = data["machine"]
    start = ", ".join(f"{x:.2f}" for x in m["load_avg_start"])
    end = ", ".join(f"{x:.2f}" for x in m.get("load_avg_end", []))
    return (f"`{data['benchmark']}`: {data['date_utc']} UTC, clock {data.get('clock', 'wall')}, {m['cpu']}, "
            f"{m['cores']} cores, torch threads "
            f"{m['torch_threads']}, load average (1/5/15 min) {start} at start, {end} at end, wall "
            f"{data.get('wall_s', '?')} s; torch {data['versions']['torch']}, commit {data['versions']['git_commit']}")


def save(fig, name: str, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> str:
    """Write `fig` to OUT/plots/<name>.png and close it; the Markdown link to it, relative to RESULTS.md."""
    import matplotlib.pyplot as plt

    folder = OUT / PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(folder / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"{PLOTS}/{name}.png"


def plain_log_axis(axis) -> None:
    """Ticks at 1, 2, 5 x 10^n written as 20 and 0.5 (not 2x10^1, 5x10^-1) on a log axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def workloads(data: dict) -> dict[str, dict]:
    """The sparse_vs_dense workloads (text_256, image_1024_cfg, ...): the entries with a token bound."""
    return {k: v for k, v in data.items() if isinstance(v, dict) and "token_bound" in v}


def plot_sparse_vs_dense(data: dict, plt) -> str:
    """Seconds per generation and speedup (with its token-count bound) against generation length."""
    clock = data.get("clock", "wall")
    series = {}  # (kind, cfg) -> [(length, workload)]
    for w in workloads(data).values():
        cfg = (w.get("sampling") or {}).get("cfg_scale", 0) or w.get("guidance_scale", 0)
        series.setdefault((w["kind"], bool(cfg)), []).append((w["gen_length"], w))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, ((kind, cfg), points) in enumerate(sorted(series.items())):
        points.sort(key=lambda p: p[0])
        lengths = [n for n, _ in points]
        label = kind + (" + CFG" if cfg else "")
        color = f"C{i}"
        left.plot(lengths, [w["dense_s"] for _, w in points], "s--", color=color, label=f"{label}, dense")
        left.plot(lengths, [w["sparse_s"] for _, w in points], "o-", color=color, label=f"{label}, sparse")
        right.plot(lengths, [w["speedup"] for _, w in points], "o-", color=color, label=f"{label}, measured")
        right.plot(lengths, [w["token_bound"] for _, w in points], "x:", color=color, label=f"{label}, token bound")
    lengths = sorted({n for points in series.values() for n, _ in points})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlim(min(lengths) / 1.4, max(lengths) * 1.4)
        ax.set_xlabel("generation length (text tokens / image positions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    plain_log_axis(left.yaxis)
    left.set_ylabel(f"{clock} s per generation (median)")
    left.set_title("Time per generation")
    right.set_ylabel("speedup, dense s / sparse s")
    right.set_ylim(bottom=0)
    right.set_title("Sparse speedup and its token-count bound")
    fig.suptitle(f"Sparse vs dense, {data['model']['parameters'] / 1e6:.1f} M-parameter random model, CPU, "
                 "one thread")
    return save(fig, "sparse_vs_dense")


def plot_ablation(combos: list[dict], plt) -> str:
    """The Table 6 ablation: speed against all-off for each combination, the paper's values beside."""
    keys = [(r["cache_prompt"], r["cache_response"], r["truncate"]) for r in combos]
    labels = ["".join(c for c, on in zip("PRT", key, strict=True) if on) or "none" for key in keys]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, [r["speedup_vs_all_off"] for r in combos], label="measured (CPU)")
    paper = [(label, PAPER_TABLE6[key]) for label, key in zip(labels, keys, strict=True) if key in PAPER_TABLE6]
    ax.plot([p[0] for p in paper], [p[1] for p in paper], "D", color="C3", label="paper (A100, 10.4 B)")
    ax.set_xlabel("switched on (P = cache prompt, R = cache response, T = truncate)")
    ax.set_ylabel("speedup vs all off (x)")
    ax.set_title("Table 6 ablation, image workload (1024 positions, no CFG)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save(fig, "ablation")


def plot_peers(rows: dict, gen_length: int, plt) -> str:
    """Text generation seconds per engine (random model), forward tokens written on the bars."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.barh(names, [rows[n]["seconds"] for n in names])
    ax.bar_label(bars, [f"{rows[n]['forward_tokens']} tokens" for n in names], padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(right=max(rows[n]["seconds"] for n in names) * 1.3)
    ax.set_xlabel("CPU seconds per generation (lower is better)")
    ax.set_title(f"Text, {gen_length} tokens, random model: each engine's time and forward tokens")
    return save(fig, "peers")


def plot_quality_vs_speed(peers: dict, plt) -> str | None:
    """Quality against seconds and against forward tokens for every engine, on the demo checkpoints."""
    panels = [(key, label, quality, spread) for key, label, quality, spread in (
        ("demo_image_quality", "text-to-image: digit-GenEval", "geneval", "geneval_std"),
        ("demo_quality", "sums: arithmetic exact match", "arithmetic_accuracy", "arithmetic_accuracy_std"))
        if key in peers]
    if not panels:
        return None
    engines = list(dict.fromkeys(e for key, *_ in panels for e in peers[key]["engines"]))
    markers = "osD^v<>PXh*"
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for (key, label, quality, spread), row in zip(panels, axes, strict=True):
        for i, name in enumerate(engines):
            e = peers[key]["engines"].get(name)
            if e is None:
                continue
            for ax, x in zip(row, (e["seconds"], e["forward_tokens"]), strict=True):
                ax.errorbar(x, e[quality], yerr=e.get(spread, 0), fmt=markers[i % len(markers)], color=f"C{i}",
                            capsize=3, markersize=7, label=name)
        row[0].set_xlabel("CPU seconds, total over all prompts (lower is faster)")
        row[1].set_xlabel("forward tokens, total over all prompts (log)")
        row[1].set_xscale("log")
        plain_log_axis(row[1].xaxis)
        for ax in row:
            ax.set_ylabel(label.split(": ")[1])
            ax.set_title(f"{label} (bars: ± std over seeds)")
            ax.grid(alpha=0.3)
    handles, names = [], []
    for ax in axes.flat:  # one legend for the figure, each engine once
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(5, len(names)), fontsize=8)
    fig.suptitle("Quality against speed on the demo checkpoints (0.88 M parameters, CPU, one thread)")
    return save(fig, "quality_vs_speed", rect=(0, 0.025 * (1 + len(names) // 5), 1, 1))


def plot_floor(data: dict, plt) -> str:
    """A roofline: each configuration's achieved GFLOP/s at its FLOP/byte, under the machine's measured rates."""
    rates, configs = data["machine_rates"], data["configs"]
    peak, copy = rates["peak_mm_gflops"], rates["copy_gbps"]
    intensities = [c["arithmetic_intensity_flop_per_byte"] for c in configs.values()]
    xs = [min(intensities) / 4, peak / copy, max(intensities) * 4]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [min(peak, copy * x) for x in xs], "k-", label=f"floor: {peak} GFLOP/s matmul, {copy} GB/s copy")
    for i, (name, c) in enumerate(configs.items()):
        ax.plot(c["arithmetic_intensity_flop_per_byte"], c["achieved_gflops"], "os"[i % 2], color=f"C{i // 2}",
                markersize=8, label=f"{name} ({c['fraction_of_peak_mm']:.0%} of peak)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(min(c["achieved_gflops"] for c in configs.values()) / 1.5, peak * 1.5)
    plain_log_axis(ax.xaxis)
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Floor: achieved rate against the measured matmul and copy rates")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, "floor")


def plot_throughput(serves: dict[str, dict], plt) -> str | None:
    """Serving tokens/s against concurrency for each runner mode, one panel per measured model."""
    serves = {title: d for title, d in serves.items() if d and d.get("modes")}
    if not serves:
        return None
    styles = {"invariant": "o-", "invariant_tiles": "s--", "unconstrained": "^:"}
    fig, axes = plt.subplots(1, len(serves), figsize=(5.5 * len(serves), 4), squeeze=False)
    for ax, (title, data) in zip(axes[0], serves.items(), strict=True):
        for i, (mode, r) in enumerate(data["modes"].items()):
            levels = sorted(r["tokens_per_s"], key=int)
            ax.plot([int(n) for n in levels], [r["tokens_per_s"][n] for n in levels], styles.get(mode, "D-."),
                    color=f"C{i}", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(n) for n in levels], levels)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("generated tokens/s (engine steps)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Serving throughput: batch-invariant runner vs unconstrained, CPU, one torch thread")
    return save(fig, "throughput_vs_concurrency")


def plot_images_engine(engine: dict, plt) -> str | None:
    """Images/s against concurrency through vLLM's engine: each configuration, invariant vs unconstrained."""
    runners = [r for r in ("invariant", "unconstrained") if r in engine]
    if not runners:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4))
    configs = list(engine[runners[0]]["images_per_s"])
    for runner, style in zip(runners, ("o-", "^:"), strict=False):
        for i, config in enumerate(configs):
            values = engine[runner]["images_per_s"].get(config, {})
            levels = sorted(values, key=int)
            ax.plot([int(n) for n in levels], [values[n] for n in levels], style, color=f"C{i}",
                    label=f"{config}, {runner}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(n) for n in levels], levels)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent image requests")
    ax.set_ylabel("images/s")
    ax.set_title("Images through vLLM's engine (demo model; noisy: shared, loaded cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, "images_vs_concurrency")


def section_sparse_vs_dense(data: dict, plt) -> list[str]:
    m = data["model"]
    out = ["## Sparse vs dense (`benchmarks/sparse_vs_dense.py`)", "",
           f"Model: LLaDA-shaped, random weights, d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} "
           f"heads (head_dim {m['head_dim']}), MLP {m['mlp_hidden_size']}, vocab {m['vocab_size']}, "
           f"{m['parameters'] / 1e6:.1f} M parameters. {data.get('notes', '')}", ""]
    rows = []
    for name, w in data.items():
        if isinstance(w, dict) and "token_bound" in w:
            paper = PAPER.get(name, PAPER["text"] if w["kind"] == "text" else "")
            rows.append([name, w["steps"], w["dense_s"], w["sparse_s"], f"**{w['speedup']}x**",
                         f"{w['speedup_wall']}x" if "speedup_wall" in w else "",
                         f"{w['forward_tokens']['dense']} / {w['forward_tokens']['sparse']}", f"{w['token_bound']}x",
                         f"**{w['fraction_of_bound']:.0%}**", f"{paper}x (A100)" if paper else ""])
    clock = data.get("clock", "wall")
    out += [f"Seconds are {clock} seconds (median); the wall-clock speedup sits beside it.", "",
            table(["workload", "steps", f"dense {clock} s", f"sparse {clock} s", "speedup", "speedup (wall)",
                   "forward tokens dense / sparse", "token bound", "fraction of bound", "paper"], rows), ""]
    out += [f"![sparse vs dense seconds and speedup against generation length]({plot_sparse_vs_dense(data, plt)})",
            ""]
    if "table6_ablation" in data:
        combos = data["table6_ablation"]["combinations"]
        out += ["### Table 6 ablation (image workload, no CFG; registers kept in every row)", ""]
        rows = []
        for r in combos:
            key = (r["cache_prompt"], r["cache_response"], r["truncate"])
            rows.append(["yes" if key[0] else "", "yes" if key[1] else "", "yes" if key[2] else "", r["seconds"],
                         r["forward_tokens"], f"{r['speedup_vs_all_off']}x", f"{r.get('speedup_vs_dense', '')}x",
                         f"{PAPER_TABLE6[key]}x" if key in PAPER_TABLE6 else ""])
        out += [table(["cache prompt", "cache response", "truncate", "seconds", "forward tokens", "vs all off",
                       "vs dense", "paper (vs all off)"], rows), ""]
        out += [f"![ablation]({plot_ablation(combos, plt)})", ""]
    if "bf16" in data:
        b = data["bf16"]
        out += ["### bf16 on CPU (measured option, not the default)", "",
                table(["sampler", "fp32 s", "bf16 s", "bf16 speedup", "tokens equal to fp32"],
                      [["dense", b["dense_fp32_s"], b["dense_bf16_s"], f"{b['dense_bf16_speedup']}x",
                        f"{b['token_match_bf16_vs_fp32_dense']:.1%}"],
                       ["sparse", b["sparse_fp32_s"], b["sparse_bf16_s"], f"{b['sparse_bf16_speedup']}x",
                        f"{b['token_match_bf16_vs_fp32_sparse']:.1%}"]]), "",
                f"Drift: first-step max |logit diff| {b['first_step_max_abs_logit_diff']} on logits of magnitude up "
                f"to {b['first_step_logit_scale']}; sparse/dense speedup in bf16 {b['sparse_speedup_bf16']}x.", ""]
    return out


def section_peers(data: dict, plt) -> list[str]:
    w, rows = data["workload"], data["text"]
    out = ["## Peers (`benchmarks/peers.py`)", "",
           f"Text, gen length {w['gen_length']}, block {w['block_length']}, {w['steps_fixed']} steps, prompt "
           f"{w['prompt_len']}, greedy, same random model as above; our sparse sampler uses "
           f"{w['sparse_registers']} registers. Quality: {data['quality']}.", "",
           table(["engine", f"{data.get('clock', 'wall')} seconds", "tokens/s", "forward tokens",
                  "vs LLaDA reference", "vs our dense",
                  "token match vs dense"],
                 [[k, r["seconds"], r["tokens_per_s"], r["forward_tokens"], f"{r['speedup_vs_llada_reference']}x",
                   f"{r['speedup_vs_ours_dense']}x", f"{r['token_match_vs_dense']:.1%}"] for k, r in rows.items()]),
           "", f"![peers]({plot_peers(rows, w['gen_length'], plt)})", ""]
    if "demo_quality" in data:
        d = data["demo_quality"]
        seeds = d.get("seeds", [None])
        out += [f"### Quality at speed on the demo checkpoint (`{Path(d['checkpoint']).name}`)", "",
                f"{d['problems']} held-out sums per seed, {len(seeds)} seeds (accuracy: mean ± std over seeds), gen "
                f"length {d['gen_length']}, block {d['block_length']}, {d['steps_fixed']} steps for fixed-count "
                f"engines, threshold {d['threshold']} for the others; seconds and forward tokens are totals over "
                "all problems.", "",
                table(["engine", "seconds", "arithmetic exact match", "token match vs our dense", "forward tokens"],
                      [[k, e["seconds"], f"{e['arithmetic_accuracy']:.3f} ± {e.get('arithmetic_accuracy_std', 0):.3f}",
                        f"{e.get('token_match_vs_dense', 0):.1%}", e["forward_tokens"]]
                       for k, e in d["engines"].items()]), ""]
    if "demo_image_quality" in data:
        d = data["demo_image_quality"]
        e_d, e_s = d["engines"]["ours_dense"], d["engines"]["ours_sparse"]
        out += ["### Text-to-image quality at speed on the demo checkpoints", "",
                f"{d['images']} held-out captions per seed, {len(d['seeds'])} seeds (digit-GenEval: mean ± std over "
                f"seeds), CFG {d['cfg_scale']}, temperature {d['temperature']}, {d['steps_fixed']} steps for "
                f"fixed-count engines, threshold {d['threshold']} for the other. The peers and our dense sampler run "
                "the dense checkpoint, our sparse sampler its step-causal SFT; the peers decode the canvas as one "
                "block (for one block Fast-dLLM's dual cache is its prefix cache). Seconds and forward tokens are "
                "totals over all images.", "",
                table(["engine", "checkpoint", "seconds", "digit-GenEval", "forward tokens"],
                      [[k, e["checkpoint"], e["seconds"], f"{e['geneval']:.3f} ± {e['geneval_std']:.3f}",
                        e["forward_tokens"]] for k, e in d["engines"].items()]), "",
                "On this 0.88 M-parameter model fixed per-pass costs dominate: our sparse sampler feeds "
                f"{e_d['forward_tokens'] / e_s['forward_tokens']:.1f}x fewer tokens than our dense one in "
                f"{e_s['seconds'] / e_d['seconds']:.2f}x its seconds, and the threshold peer, which decodes fewer "
                "pixels per pass on high-entropy image tokens than its fixed count, runs more passes and takes longer. "
                "Forward tokens are what carries to a real model (the random-model rows above turn them into time).",
                ""]
    quality = plot_quality_vs_speed(data, plt)
    if quality:
        out += ["Every engine's quality (mean ± std over seeds) against its total seconds and forward tokens; up and "
                "to the left is better:", "", f"![quality vs speed]({quality})", ""]
    return out


def section_floor(data: dict, plt) -> list[str]:
    r = data["machine_rates"]
    out = ["## Floor (`benchmarks/floor.py`)", "",
           "Measured rates: " + ", ".join(f"{k} {v}" for k, v in r.items()) + ".", "", data.get("notes", ""), "",
           table(["configuration", "seconds", "GFLOP/step", "MB/step", "FLOP/byte", "achieved GFLOP/s",
                  "fraction of peak mm", "floor s", "bound by", "fraction of floor"],
                 [[k, c["seconds"], c["gflop_per_step"], c["mbytes_per_step"],
                   c["arithmetic_intensity_flop_per_byte"], c["achieved_gflops"], f"{c['fraction_of_peak_mm']:.0%}",
                   c["floor_s"], c["bound_by"], f"{c['fraction_of_floor']:.0%}"] for k, c in data["configs"].items()]),
           "", f"![roofline]({plot_floor(data, plt)})", ""]
    return out


def at_counts(values: dict[str, float], fmt: str, unit: str = "") -> str:
    """"v at n, ..." for a {concurrency: value} dict, in concurrency order (the JSON's keys are strings)."""
    return ", ".join(f"{v:{fmt}}{unit} at {n}" for n, v in sorted(values.items(), key=lambda item: int(item[0])))


def host_share(mode: dict, n: str) -> float:
    """The host's share of an engine step at concurrency n: host ms / (host + model ms), medians."""
    return mode["host_step_ms"][n] / (mode["host_step_ms"][n] + mode["model_step_ms"][n])


def per_mode(values: dict[str, dict[str, float]]) -> str:
    """"mode p% at n, ...; mode ..." for {mode: {concurrency: fraction}}."""
    return "; ".join(f"{m} {at_counts(f, '.0%')}" for m, f in values.items())


def soak_load(load) -> str:
    """The soak's machine load: a (1, 5, 15 min) load average at its end, or a sentence where none was recorded."""
    if isinstance(load, list):
        return "Load average (1/5/15 min) at the end, the soak's own traffic included: " + ", ".join(
            f"{x:.2f}" for x in load) + "."
    return str(load)


def section_serve(data: dict, title: str = "Serving throughput (`benchmarks/serve_throughput.py`, written by the "
                                             "vLLM room)") -> list[str]:
    out = [f"## {title}", ""]
    if "model" in data:
        out += ["Model: " + ", ".join(f"{k} {v}" for k, v in data["model"].items()) + "; workload: "
                + ", ".join(f"{k} {v}" for k, v in data.get("workload", {}).items()) + "."
                + ("" if "machine" not in data else " Machine: " + ", ".join(f"{k} {v}" for k, v in
                                                                            data["machine"].items()) + "."), ""]
    modes = data.get("modes", {})
    if modes:
        levels = sorted({n for r in modes.values() for n in r.get("tokens_per_s", {})}, key=int)
        out += [table(["runner mode", "engine ms/step", "reference ms/step", "engine / reference",
                       *(f"tokens/s at {n}" for n in levels)],
                      [[m, round(r["step_ms"], 2), round(r["reference_step_ms"], 2), round(r["overhead_ratio"], 2),
                        *(round(r["tokens_per_s"].get(n, float("nan")), 1) for n in levels)]
                       for m, r in modes.items()]), ""]
        cost = data.get("invariance_cost")
        if cost:
            out += ["Cost of batch invariance (unconstrained tokens/s over invariant tokens/s): "
                    + at_counts(cost, ".2f", "x")
                    + (f"; torch threads {data['machine']['torch_threads']}" if "machine" in data else "") + ".", ""]
        fractions = {m: r["gemm_fraction_of_matmul_rate"] for m, r in modes.items()
                     if "gemm_fraction_of_matmul_rate" in r}
        if fractions:
            first = next(iter(fractions))
            out += ["Fraction of the measured matmul rate (F.linear in the same process, "
                    f"{modes[first].get('matmul_gflops', float('nan')):.0f} GFLOP/s for the {first} run) that "
                    "the engine steps reach, counting the GEMMs' FLOPs only (attention, norms, RoPE, gathers, "
                    "sampling and scheduling are the rest of each step's time): "
                    + per_mode(fractions) + ".", ""]
        host = {m: {n: host_share(r, n) for n in r["host_step_ms"]} for m, r in modes.items() if "host_step_ms" in r}
        if host:
            out += ["Share of an engine step spent on the host (scheduler, row building, slot mapping, sampling, "
                    "output processing: the step's time outside the model's forward; medians): "
                    + per_mode(host) + ".", ""]
        shares = {m: r["gemm_time_share"] for m, r in modes.items() if "gemm_time_share" in r}
        if shares:
            out += ["Share of the engine steps' time spent inside the GEMMs (timed around `model.tiled`; a ratio of "
                    "two times that a busy machine stretches alike, so steadier than the fraction above): "
                    + per_mode(shares) + ".", ""]
        rows, tiles = modes.get("invariant", {}).get("plain_gemm_rows"), data.get("invariance_cost_tiles")
        if rows is not None:
            line = (f"The invariant runner ran plain GEMMs in chunks of up to {rows} rows (checked at load to give "
                    "every row its 64-row tile's bits; 0 = tiles only).")
            if tiles:
                line += (" With the row tiles always on (`plain_gemm: false`) the cost is "
                         + at_counts(tiles, ".2f", "x") + ".")
            out += [line, ""]
    else:
        out += ["```json", json.dumps(data, indent=1)[:6000], "```", ""]
    return out


def section_images(data: dict, plt) -> list[str]:
    out = ["## Images (`benchmarks/images.py`)", "",
           "Seconds per image, sparse vs dense, both with classifier-free guidance (the uncond branch is a "
           "companion sequence with its own cache in the sparse sampler), pure-PyTorch samplers, one thread, CPU "
           "seconds:", ""]
    rows = [[name, r["positions"], r["steps"], r["guidance_scale"], r["num_registers"], r["dense_s"], r["sparse_s"],
             f"**{r['speedup']}x**", f"{r['token_bound']}x", f"{r['fraction_of_bound']:.0%}"]
            for name, r in data.get("samplers", {}).items()]
    out += [table(["model", "positions", "steps", "guidance", "registers", "dense s", "sparse s", "speedup",
                   "token bound", "of bound"], rows), ""]
    engine = data.get("engine", {})
    if engine:
        out += ["Through vLLM's engine (bundled demo model): " + engine.get("note", ""), ""]
        for runner in ("invariant", "unconstrained", "exact", "flat"):
            if runner not in engine:
                continue
            e = engine[runner]
            levels = list(e["images_per_s"]["sparse"])
            out += [f"Runner `{runner}`:", "",
                    table(["configuration", *(f"images/s at {n}" for n in levels)],
                          [[k, *(v[n] for n in levels)] for k, v in e["images_per_s"].items()]), "",
                    "Guided cost per image (guided s / unguided s; 2.0 = a second model run per image): "
                    + "; ".join(f"{mode} " + ", ".join(f"{c} at {n}" for n, c in v.items())
                                for mode, v in e["guided_cost_per_image"].items()) + ".", ""]
        figure = plot_images_engine(engine, plt)
        if figure:
            out += [f"![images per second vs concurrency]({figure})", ""]
    return out


def section_soak(data: dict) -> list[str]:
    keys = ("duration_s", "concurrency", "requests", "good", "seeded", "aborted", "bad", "server_errors_5xx",
            "seeded_mismatches", "leaks", "throughput_req_s", "latency_p50_s", "latency_p99_s", "rss_before_mb",
            "rss_after_mb")
    return ["## Soak (`benchmarks/soak.py`)", "",
            "Bounded mixed traffic against a real `sparse-lavida serve` (dense, sparse, streamed, seeded, abandoned "
            "streams, bad requests), then leak checks: nothing running or waiting, KV usage 0, resident memory, "
            "seeded tokens equal their solo runs. " + soak_load(data.get("load_avg_end", "")), "",
            table(list(keys), [[data.get(k, "") for k in keys]]), ""]


def section_summary(found: dict) -> list[str]:
    """The closing numbers in one place, computed from the JSON (so they regenerate with everything else)."""
    out = ["## Summary", ""]
    svd, peers, floor = found["sparse_vs_dense"], found["peers"], found["floor"]
    if svd:
        for name, w in svd.items():
            if isinstance(w, dict) and "token_bound" in w:
                out.append(f"- {name}: sparse/dense **{w['speedup']}x**, token bound {w['token_bound']}x, "
                           f"**{w['fraction_of_bound']:.0%} of the bound** (goal >= 70%).")
        if "table6_ablation" in svd:
            best = svd["table6_ablation"]["combinations"][-1]
            out.append(f"- Table 6, all three on: {best['speedup_vs_all_off']}x vs all off (paper 1.96x).")
    if peers:
        r = peers["text"]
        best = min((k for k in r if k.startswith("fastdllm")), key=lambda k: r[k]["seconds"])
        out.append(f"- Peers (text {peers['workload']['gen_length']}): ours sparse {r['ours_sparse']['seconds']} s, "
                   f"LLaDA reference {r['llada_reference']['seconds']} s "
                   f"({r['ours_sparse']['speedup_vs_llada_reference']}x), fastest Fast-dLLM-style cache ({best}) "
                   f"{r[best]['seconds']} s ({r[best]['seconds'] / r['ours_sparse']['seconds']:.2f}x slower than ours "
                   f"sparse).")
        if "demo_quality" in peers:
            e = peers["demo_quality"]["engines"]
            out.append("- Demo checkpoint (arithmetic exact match / token match with our dense sampler / total "
                       "seconds): " + "; ".join(f"{k} {v['arithmetic_accuracy']:.0%} / "
                                                f"{v.get('token_match_vs_dense', 0):.0%} / {v['seconds']} s"
                                                for k, v in e.items()) + ".")
        if "demo_image_quality" in peers:
            e = peers["demo_image_quality"]["engines"]
            out.append("- Demo text-to-image (digit-GenEval / forward tokens / total seconds): " + "; ".join(
                f"{k} {v['geneval']:.3f} / {v['forward_tokens']} / {v['seconds']} s" for k, v in e.items()) + ".")
    if floor:
        c = floor["configs"]
        out.append("- Achieved fraction of the measured fp32 matmul rate ("
                   f"{floor['machine_rates']['peak_mm_gflops']} GFLOP/s): " + ", ".join(
                       f"{k} {v['fraction_of_peak_mm']:.0%}" for k, v in c.items()) + ".")
    for name in ("serve_throughput", "serve_throughput_wide"):
        serve = found.get(name)
        if serve and serve.get("invariance_cost") and "8" in serve["invariance_cost"]:
            invariant = serve["modes"]["invariant"]
            out.append(f"- Serving, d_model {serve['model']['d_model']}, 8 requests: batch invariance costs "
                       f"{serve['invariance_cost']['8']:.2f}x the unconstrained runner's tokens/s; its GEMMs reach "
                       f"{invariant['gemm_fraction_of_matmul_rate']['8']:.0%} of the matmul rate (goal >= 80%)"
                       + (f"; the host takes {host_share(invariant, '8'):.0%} of its steps (goal <= 25%)."
                          if "host_step_ms" in invariant else "."))
    return out + [""]


def render() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["# Benchmark results", "",
             "Regenerate everything (runs every benchmark, then this page and its plots; ~15 min on 2 shared "
             "cores): `.venv/bin/python benchmarks/report.py --run`. Re-render from the committed JSON only: "
             "`.venv/bin/python benchmarks/report.py`.", "",
             "Ratios are measured within one run (same model, prompts, seeds; contenders interleaved a, b, a, b "
             "so load changes on this shared machine hit both), median of the repeats after a warm-up.", ""]
    found = {name: load(name) for name in (*BENCHMARKS, "serve_throughput", "serve_throughput_wide", "soak")}
    machines = [machine_line(d) for d in found.values() if d and "machine" in d and "date_utc" in d]
    parts += section_summary(found)
    parts += ["## Machine and versions", "", *(f"- {m}" for m in machines), ""]
    if found["sparse_vs_dense"]:
        parts += section_sparse_vs_dense(found["sparse_vs_dense"], plt)
    if found["peers"]:
        parts += section_peers(found["peers"], plt)
    if found["floor"]:
        parts += section_floor(found["floor"], plt)
    if found["serve_throughput"]:
        parts += section_serve(found["serve_throughput"])
    if found.get("serve_throughput_wide"):
        parts += section_serve(found["serve_throughput_wide"], "Serving throughput on a wider model "
                               "(`benchmarks/serve_throughput.py --model wide`)")
    serves = {f"d_model {d['model']['d_model']}, {d['model']['n_layers']} layers": d
              for d in (found["serve_throughput"], found.get("serve_throughput_wide")) if d and "model" in d}
    throughput = plot_throughput(serves, plt)
    if throughput:
        parts += ["Tokens/s against concurrency for both models (the tables above):", "",
                  f"![throughput vs concurrency]({throughput})", ""]
    if found.get("images"):
        parts += section_images(found["images"], plt)
    if found.get("soak"):
        parts += section_soak(found["soak"])
    notes = RESULTS / "NOTES.md"
    if notes.exists():
        parts += [notes.read_text()]
    return "\n".join(parts) + "\n"


def main() -> None:
    global RESULTS, OUT
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", action="store_true", help="run every benchmark (writing its JSON) first")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON results")
    parser.add_argument("--out", default=str(OUT), help="folder for RESULTS.md and the plots")
    args = parser.parse_args()
    RESULTS, OUT = Path(args.results), Path(args.out)
    if args.run and RESULTS != HERE / "results":
        raise SystemExit("--run writes benchmarks/results; do not combine it with --results")
    if args.run:
        for name in BENCHMARKS:
            subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--json"], check=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "RESULTS.md").write_text(render())
    print(f"wrote {OUT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
