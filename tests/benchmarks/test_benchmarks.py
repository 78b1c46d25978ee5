"""Smoke test: every benchmark runs with --quick and writes JSON with the keys the report reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"benchmark", "date_utc", "command", "machine", "versions", "model"}
RATIO_KEYS = {"dense_s", "sparse_s", "speedup", "token_bound", "fraction_of_bound", "forward_tokens"}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


def run_quick(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert COMMON <= data.keys()
    assert {"cpu", "cores", "load_avg_start", "load_avg_end"} <= data["machine"].keys()
    assert data["quick"] is True
    return data


def test_sparse_vs_dense(results_dir):
    data = run_quick("sparse_vs_dense", results_dir)
    for name in ("text_64", "image_64", "image_64_cfg"):
        w = data[name]
        assert RATIO_KEYS <= w.keys()
        assert w["forward_tokens"]["sparse"] < w["forward_tokens"]["dense"]  # the sparse path feeds fewer rows
        assert w["token_bound"] == pytest.approx(w["forward_tokens"]["dense"] / w["forward_tokens"]["sparse"],
                                                 rel=1e-2)
        assert w["fraction_of_bound"] == pytest.approx(w["speedup"] / w["token_bound"], rel=2e-2)
    combos = data["table6_ablation"]["combinations"]
    assert len({(c["cache_prompt"], c["cache_response"], c["truncate"]) for c in combos}) == 8
    assert combos[0]["speedup_vs_all_off"] == 1.0
    assert data["bf16"]["token_match_bf16_vs_fp32_sparse"] >= 0


def test_peers(results_dir):
    data = run_quick("peers", results_dir)
    rows = data["text"]
    assert {"llada_reference", "ours_dense", "ours_sparse", "fastdllm_prefix_fixed", "fastdllm_dual_fixed"} \
        <= rows.keys()
    # the LLaDA re-implementation is the same greedy algorithm as our dense sampler: same tokens
    assert rows["llada_reference"]["token_match_vs_dense"] == 1.0
    # caching feeds fewer rows than the no-cache reference
    assert rows["fastdllm_dual_fixed"]["forward_tokens"] < rows["llada_reference"]["forward_tokens"]
    assert rows["ours_sparse"]["forward_tokens"] < rows["ours_dense"]["forward_tokens"]


def test_floor(results_dir):
    data = run_quick("floor", results_dir)
    assert data["machine_rates"]["peak_mm_gflops"] > 0 and data["machine_rates"]["copy_gbps"] > 0
    for cfg in data["configs"].values():
        assert cfg["gflop_per_step"] > 0 and 0 < cfg["fraction_of_peak_mm"] < 1.5
    dense, sparse = data["configs"]["image_64_dense"], data["configs"]["image_64_sparse"]
    assert sparse["gflop_per_step"] < dense["gflop_per_step"]


def test_report_renders_tables_and_plots(results_dir, tmp_path):
    pytest.importorskip("matplotlib")  # the plots need it (the `train` extra brings it)
    for name in ("sparse_vs_dense", "peers", "floor"):
        if not (results_dir / f"{name}.json").exists():
            run_quick(name, results_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--results", str(results_dir),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## Sparse vs dense", "### Table 6 ablation", "## Peers", "## Floor", "## Machine and versions"):
        assert heading in text
    check_plots(tmp_path, {"sparse_vs_dense", "ablation", "peers", "floor"})


def check_plots(out: Path, expected: set[str]) -> None:
    """`expected` plots are in out/plots, each a whole PNG of a readable size, and RESULTS.md links every one."""
    from PIL import Image

    linked = set(re.findall(r"\]\(plots/([a-z_]+)\.png\)", (out / "RESULTS.md").read_text()))
    assert expected <= linked
    assert {p.stem for p in (out / "plots").glob("*.png")} == linked  # each plot linked, each link drawn
    for name in linked:
        with Image.open(out / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300, (name, image.size)
            image.load()  # the whole image decodes (verify() checks less)
            assert len(image.getcolors(1 << 16) or range(256)) > 8  # not blank: axes, text, data in colour


def test_report_draws_every_plot_from_the_committed_results(tmp_path):
    """The committed JSON (benchmarks/results) gives every figure RESULTS.md embeds, in the same command."""
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_plots(tmp_path, {"sparse_vs_dense", "ablation", "peers", "quality_vs_speed", "floor",
                           "throughput_vs_concurrency", "images_vs_concurrency"})


@pytest.mark.slow  # a vLLM engine in a subprocess, both runners
def test_images(results_dir):
    out = results_dir / "images.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "images.py"), "--quick", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    for r in data["samplers"].values():
        assert r["forward_tokens"]["sparse"] < r["forward_tokens"]["dense"]
        assert r["token_bound"] == pytest.approx(r["forward_tokens"]["dense"] / r["forward_tokens"]["sparse"], rel=1e-2)
    for runner in ("invariant", "unconstrained"):
        rates = data["engine"][runner]["images_per_s"]
        assert set(rates) == {"sparse", "sparse_cfg", "dense", "dense_cfg"}
        assert all(v > 0 for r in rates.values() for v in r.values())


def test_peers_draw_digits_with_guidance_on_the_demo_checkpoints():
    # the image rows of the peers benchmark: every engine draws only image tokens (the guided peer loops apply the
    # codec's token range), caches feed fewer rows than LLaDA's no-cache loop, and the sparse sampler fewer still
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers
    import torch

    with torch.inference_mode():
        out = peers.demo_image_quality(peers.DEMO_DENSE, peers.DEMO, num=2, threshold=0.9, num_seeds=1)
    e = out["engines"]
    assert set(e) == {"llada_reference", "ours_dense", "ours_sparse", "fastdllm_prefix_fixed",
                      "fastdllm_prefix_threshold"}
    assert all(r["invalid_tokens"] == 0 and 0 <= r["geneval"] <= 1 for r in e.values())
    assert e["fastdllm_prefix_fixed"]["forward_tokens"] < e["llada_reference"]["forward_tokens"]
    assert e["ours_sparse"]["forward_tokens"] < e["ours_dense"]["forward_tokens"]
    # both no-cache loops feed prompt + canvas for both CFG branches at every step
    assert e["ours_dense"]["forward_tokens"] == e["llada_reference"]["forward_tokens"]


def test_plan_cost(results_dir):
    """benchmarks/plan_cost.py: per-code vs whole-position logits on a tiny LaViDa-O, single pixels vs 2x2 groups on
    the demo."""
    pytest.importorskip("diffusers")
    data = run_quick("plan_cost", results_dir)
    assert [part["guidance"] for part in data["lavida"]] == [0.0, 4.0]
    for part in data["lavida"]:
        first = part["by_step"][0]  # an empty canvas under both plans: the same logits
        assert first["max_abs_logit_diff"] == 0 and first["top1_agreement"] == 1.0
        assert sum(part["per_code_counts"]) == sum(part["per_position_counts_in_codes"]) == 256
    results = data["demo"]["results"]
    assert {"pixels@16", "groups_2x2@16", "pixels_at_group_counts@16", "pixels_pmj@16"} <= results.keys()
    assert results["groups_2x2@16"]["counts"] == [4] * 16 and 0 <= results["pixels@16"]["geneval"]["mean"] <= 1
