"""What the sparse path's whole-position plan costs against the publishers' per-code dense plan (issue 22 item 3).

The sparse path commits whole 2x2 positions (4 VQ codes) per step, since a cached position must be final; LaViDa-O's
own sampler commits single codes in its PMJ order (planners.publishers_code_plan). Both parts run the dense driver
with either plan, so the plan is the only difference:

Part 1 (`lavida`, a tiny random LaViDa-O, greedy): the image logits of the first steps under both plans, same model,
same prompt, same number of steps. At step t each plan has run its first t-1 steps; the logits of every code still
masked in both canvases are compared (max |logit difference|, mean KL(per-code || per-position) of the softmax over
the codebook, top-1 agreement). Yardstick: the same numbers between their sampler and itself with another PMJ seed
(single codes both, other codes committed). Random weights: agreement, not quality.
Part 2 (`demo`, the bundled trained demo model, 8x8 digits, one token per pixel): digit-GenEval and digit-FID of
the same model at the same steps, committing single pixels vs whole 2x2 pixel groups (a 4x4 grid of "positions"),
the same choice at the demo's scale.
Usage: python benchmarks/plan_cost.py [--json [PATH]] [--quick] [--parts lavida,demo] [--steps 16,8]
       [--plans pixels,groups_2x2,pixels_at_group_counts,pixels_pmj] [--seeds 3] [--captions 60]
Recorded: --parts lavida -> results/plan_cost_lavida.json; --parts demo --plans pixels,groups_2x2,
pixels_at_group_counts -> results/plan_cost_demo.json; the same with --steps 8 and pixels_pmj added ->
results/plan_cost_demo_8steps.json.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import Run, add_common_args, setup

from sparse_lavida_vllm.diffusion.planners import (
    Stage,
    UnmaskPlan,
    image_plan,
    publishers_code_plan,
)
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig

# ---- part 1: logits of the first steps on a tiny LaViDa-O ------------------------------------------------------

SIDE_CODES = 16  # a 16x16 code grid = 8x8 positions (64 px at the VQ's factor 4)
STEPS = 16
SHIFT = 5.0


def tiny_lavida_o(seed: int = 0):
    """LaViDa-O as published, scaled down (the tests' shape: dual tower, per-modality layers 1-2, 2x2 downsampling)
    with a 64-code VQ codebook; std 0.3 gives decisive logits."""
    from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig
    from sparse_lavida_vllm.model_executor.lavida_o_weights import random_lavida_o

    config = LaViDaOConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=2, n_kv_heads=2, mlp_hidden_size=128,
                           rope_theta=500000.0, max_sequence_length=512, mask_token_id=254, eos_token_id=2,
                           pad_token_id=0, d_model_gen=32, mlp_hidden_size_gen=48, dual_tower=True,
                           dual_tower_layers=0, downsample=True, num_vq_embeddings=64, image_token_id=200,
                           edit_image_token_id=201, block_causal=False)
    return random_lavida_o(config, seed=seed, std=0.3)


def prefix_then_all(plan: UnmaskPlan, steps_done: int, everything: torch.Tensor) -> UnmaskPlan:
    """`plan`'s first `steps_done` stages, then one stage over `everything`: the driver's last step returns the
    logits of every position on the canvas those stages leave."""
    stages = plan.stages[:steps_done] + (Stage(everything, (everything.numel(),)),)
    return UnmaskPlan(plan.length, stages)


def code_canvas(plan: UnmaskPlan, steps_done: int, per_code: bool) -> torch.Tensor:
    """(positions, 4) bool: the codes committed after `steps_done` stages (a position plan commits whole
    patches)."""
    from sparse_lavida_vllm.diffusion.planners import code_slots

    positions = (SIDE_CODES // 2) ** 2
    done = torch.zeros(positions, 4, dtype=torch.bool)
    for stage in plan.stages[:steps_done]:
        if per_code:
            position, slot = code_slots(stage.positions, SIDE_CODES)
            done[position, slot] = True
        else:
            done[stage.positions] = True
    return done


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-code distributions (codes, codebook) of two runs at the same codes: max / mean |logit difference|, mean
    and max KL(a || b) of the softmax, top-1 agreement."""
    a, b = a.double(), b.double()
    kl = (F.softmax(a, -1) * (F.log_softmax(a, -1) - F.log_softmax(b, -1))).sum(-1)
    return {"max_abs_logit_diff": round(float((a - b).abs().max()), 5),
            "mean_abs_logit_diff": round(float((a - b).abs().mean()), 5),
            "mean_kl": round(float(kl.mean()), 6), "max_kl": round(float(kl.max()), 6),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).double().mean()), 4)}


def lavida_part(steps_compared: int, guidance: float, seed: int = 0) -> dict:
    from sparse_lavida_vllm.drivers.lavida_o_image import generate_image_dense

    model = tiny_lavida_o()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, 190, (24,), generator=gen)  # text ids: any prompt, the same for both plans
    suffix = torch.randint(5, 190, (4,), generator=gen)
    sampling = SamplingConfig(temperature=0.0, cfg_scale=guidance, seed=seed)
    side = SIDE_CODES // 2
    per_code = publishers_code_plan(SIDE_CODES, STEPS, SHIFT, seed=42)  # their sampler: PMJ codes, their counts
    per_position = image_plan(side, side, STEPS, "shift", "stratified", SHIFT, torch.Generator().manual_seed(seed))
    # the yardstick: their own sampler with another PMJ seed (single codes too, other codes committed)
    other_order = publishers_code_plan(SIDE_CODES, STEPS, SHIFT, seed=7)
    all_codes, all_positions = torch.arange(SIDE_CODES ** 2), torch.arange(side * side)
    rows = []
    for t in range(1, steps_compared + 1):
        logits = {}
        for name, plan, per in (("per_code", per_code, True), ("per_position", per_position, False),
                                ("per_code_other_order", other_order, True)):
            run = generate_image_dense(model, prompt, prefix_then_all(plan, t - 1, all_codes if per else all_positions),
                                       sampling, suffix, code_width=SIDE_CODES if per else None)
            assert torch.equal(run.steps[-1].decode, all_positions)
            logits[name] = (run.steps[-1].logits, code_canvas(plan, t - 1, per))
        code, pos, other = logits["per_code"], logits["per_position"], logits["per_code_other_order"]
        masked = ~code[1] & ~pos[1]
        masked_other = ~code[1] & ~other[1]
        rows.append({"step": t, "codes_committed_before": {k: int(v[1].sum()) for k, v in logits.items()},
                     "codes_masked_in_both": int(masked.sum()),
                     **compare_logits(code[0][masked], pos[0][masked]),
                     "yardstick_other_pmj_order": {"codes_masked_in_both": int(masked_other.sum()),
                                                   **compare_logits(code[0][masked_other], other[0][masked_other])}})
    final_code = generate_image_dense(model, prompt, per_code, sampling, suffix, code_width=SIDE_CODES).patches
    final_pos = generate_image_dense(model, prompt, per_position, sampling, suffix).patches
    final_other = generate_image_dense(model, prompt, other_order, sampling, suffix, code_width=SIDE_CODES).patches
    return {"guidance": guidance, "steps": STEPS, "shift": SHIFT, "code_grid": [SIDE_CODES, SIDE_CODES],
            "positions": side * side, "codebook": model.config.num_vq_embeddings,
            "per_code_counts": [len(s.positions) for s in per_code.stages],
            "per_position_counts_in_codes": [4 * len(s.positions) for s in per_position.stages],
            "by_step": rows, "final_codes_equal": round(float((final_code == final_pos).double().mean()), 4),
            "final_codes_equal_yardstick": round(float((final_code == final_other).double().mean()), 4)}


# ---- part 2: digit-GenEval of the trained demo model, single pixels vs 2x2 pixel groups ------------------------

def group_pixels(groups: torch.Tensor, side: int = 8) -> torch.Tensor:
    """2x2 pixel groups (row-major on the (side/2) x (side/2) grid) -> their 4 pixels each (row-major, 8 wide)."""
    gy, gx = groups // (side // 2), groups % (side // 2)
    offsets = torch.tensor([0, 1, side, side + 1])
    return ((2 * gy * side + 2 * gx)[:, None] + offsets).reshape(-1)


def demo_plans(steps: int, gen_seed: int) -> dict[str, UnmaskPlan]:
    """The plans compared on the demo, all over its 8x8 pixel canvas with `steps` steps."""
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(gen_seed)

    pixels = image_plan(8, 8, steps, generator=gen())  # the demo's own: stratified pixels, shift schedule
    groups = image_plan(4, 4, steps, generator=gen())  # whole 2x2 groups: stratified groups, shift schedule
    grouped = UnmaskPlan(64, tuple(Stage(group_pixels(s.positions), (4 * len(s.positions),)) for s in groups.stages))
    order = torch.cat([s.positions for s in pixels.stages])
    counts = [4 * len(s.positions) for s in groups.stages]  # single pixels at the grouped plan's per-step counts
    same_counts = UnmaskPlan(64, tuple(Stage(p, (len(p),)) for p in torch.split(order, counts)))
    return {"pixels": pixels, "pixels_pmj": publishers_code_plan(8, steps, 5.0, seed=gen_seed),
            "groups_2x2": grouped, "pixels_at_group_counts": same_counts}


def demo_part(seeds: list[int], captions: int, steps_list: list[int], names: list[str] | None = None) -> dict:
    from sparse_lavida_vllm.drivers.text import generate_dense
    from sparse_lavida_vllm.model_executor.weights import load_pretrained
    from sparse_lavida_vllm.training.data import DEMO_ROOT, DemoData
    from sparse_lavida_vllm.training.evaluate import (
        DigitClassifier,
        EvalConfig,
        frechet_distance,
        image_sampling,
        t2i_order,
        tokens_to_levels,
    )
    from sparse_lavida_vllm.training.tokenizer import load_tokenizer

    folder = DEMO_ROOT / "dense"
    # which weights: read before loading them (the demo checkpoint may be replaced while this runs)
    commit = subprocess.run(["git", "log", "-1", "--format=%h %cI %s", "--", str(folder / "model.safetensors")],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", str(folder)], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    model = load_pretrained(folder)
    data = DemoData(load_tokenizer(folder))
    clf = DigitClassifier(data)
    results: dict = {}
    for steps in steps_list:
        for name in names or list(demo_plans(steps, 0)):
            per_seed = []
            for seed in seeds:
                cfg = EvalConfig(sampler="dense", num_images=captions, image_steps=steps, seed=seed)
                order = t2i_order(data, cfg)
                images, invalid = [], 0
                for i, idx in enumerate(order):
                    sampling, gen = image_sampling(cfg, i)
                    plan = demo_plans(steps, int(gen.initial_seed()))[name]
                    levels, bad = tokens_to_levels(generate_dense(model, data.t2i_prompt(data.captions[idx]), plan,
                                                                  sampling).tokens)
                    images.append(levels)
                    invalid += bad
                images = np.stack(images)
                per_seed.append({"seed": seed, "geneval": float((clf.predict(images) == data.labels[order]).mean()),
                                 "fid": frechet_distance(clf.features(images), clf.real_features),
                                 "invalid_tokens": invalid})
                print(name, steps, per_seed[-1], flush=True)
            summary = {key: {"mean": round(float(np.mean([r[key] for r in per_seed])), 4),
                             "std": round(float(np.std([r[key] for r in per_seed], ddof=1)), 4)
                             if len(per_seed) > 1 else 0.0,
                             "values": [round(r[key], 4) for r in per_seed]} for key in ("geneval", "fid")}
            plan = demo_plans(steps, 0)[name]
            results[f"{name}@{steps}"] = {"plan": name, "steps": steps, **summary,
                                          "counts": [len(s.positions) for s in plan.stages],
                                          "invalid_tokens": sum(r["invalid_tokens"] for r in per_seed)}
            print(name, steps, summary["geneval"], summary["fid"], flush=True)
    return {"checkpoint": str(folder.relative_to(DEMO_ROOT.parents[2])), "checkpoint_commit": commit,
            "checkpoint_uncommitted_changes": dirty or None, "model_safetensors_sha256": weights,
            "sampling": {"temperature": 0.8, "cfg_scale": 3.0, "sampler": "dense (full attention, no cache)"},
            "seeds": seeds, "captions_per_seed": captions, "classifier_held_out_accuracy": clf.held_out_accuracy,
            "results": results}


MODELS = {"lavida": "a tiny random LaViDa-O (tiny_lavida_o: d_model 64 / 32, 3 layers, 64 VQ codes, std 0.3)",
          "demo": "the bundled demo's dense checkpoint (sparse_lavida_vllm/assets/demo/dense)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--parts", default="lavida,demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--captions", type=int, default=60)
    parser.add_argument("--steps", default="16", help="demo steps, comma-separated")
    parser.add_argument("--plans", default="", help="demo plans, comma-separated (default: all of demo_plans)")
    args = parser.parse_args()
    setup(args)
    run = Run("plan_cost", args.quick)
    parts = args.parts.split(",")
    run.data["model"] = {k: v for k, v in MODELS.items() if k in parts}
    if "lavida" in parts:
        k = 3 if args.quick else 8
        run.data["lavida"] = [lavida_part(k, guidance) for guidance in (0.0, 4.0)]
    if "demo" in parts:
        seeds, captions = ([1234], 8) if args.quick else ([1234 + k for k in range(args.seeds)], args.captions)
        steps = [int(s) for s in args.steps.split(",")]
        run.data["demo"] = demo_part(seeds, captions, steps, [p for p in args.plans.split(",") if p] or None)
    run.finish(args.json)


if __name__ == "__main__":
    main()
