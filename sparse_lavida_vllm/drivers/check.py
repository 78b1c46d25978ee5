"""`sparse-lavida check consistency`: watch I2 (sparse incremental == one Algorithm 1 forward) on random cases."""

from __future__ import annotations

import argparse
import json

import torch

from sparse_lavida_vllm.diffusion.planners import UnmaskPlan, image_plan, text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_sparse, step_causal_logits
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.weights import random_model


def consistency_error(model: LLaDAMDM, prompt_ids: torch.Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
                      num_registers: int) -> float:
    """Max |sparse step logits - Algorithm 1 logits| over every step of one sampled trajectory."""
    result = generate_sparse(model, prompt_ids, plan, sampling, SparseOptions(num_registers), record_logits=True)
    worst = 0.0
    for k, step in enumerate(result.steps):
        oracle = step_causal_logits(model, prompt_ids, result.tokens, result.partition[:k], [step.decode],
                                    num_registers)[0]
        worst = max(worst, (oracle - step.logits).abs().max().item())
    return worst


def random_cases(num_cases: int, seed: int = 0):
    """Random fp32 models, prompts and trajectories: text blocks and image partitions, 0..8 registers."""
    g = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    for i in range(num_cases):
        heads = pick(2, 4)
        config = MDMConfig(vocab_size=96, d_model=16 * heads, n_layers=pick(1, 2, 3), n_heads=heads,
                           n_kv_heads=pick(1, heads), mlp_hidden_size=64, mask_token_id=94, register_token_id=95)
        model = random_model(config, seed=seed * 1000 + i, std=0.1)
        prompt = torch.randint(2, 90, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
        if i % 2:
            plan = text_plan(16, pick(4, 8, 16), 8)
            sampling = SamplingConfig(temperature=pick(0.0, 1.0), seed=i, remasking=pick("low_confidence", "random"))
        else:
            side = pick(2, 4)
            plan = image_plan(side, side, pick(2, 3, 4), pick("linear", "cosine", "shift"),
                              pick("stratified", "random"), generator=g)
            sampling = SamplingConfig(temperature=pick(0.0, 1.0), seed=i)
        yield model, prompt, plan, sampling, pick(0, 1, 8)


def run_consistency(num_cases: int, seed: int) -> dict:
    errors = [consistency_error(*case) for case in random_cases(num_cases, seed)]
    return {"max_abs_diff": max(errors), "cases": len(errors), "tolerance": 1e-5, "dtype": "float32"}


def _command(args: argparse.Namespace) -> int:
    report = run_consistency(args.cases, args.seed)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"I2 consistency over {report['cases']} random cases: max |sparse - Algorithm 1| = "
              f"{report['max_abs_diff']:.2e} (tolerance {report['tolerance']:.0e})")
    return 0 if report["max_abs_diff"] <= report["tolerance"] else 1


def register(subparsers) -> None:
    check = subparsers.add_parser("check", help="check invariants of the sampler")
    sub = check.add_subparsers(dest="what", required=True)
    p = sub.add_parser("consistency", help="I2: sparse incremental logits vs one Algorithm 1 forward")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command)
