"""`sparse-lavida demo`: generate text with the reference samplers (no vLLM) and show the sparse speedup."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparse_lavida_vllm.diffusion.planners import text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo" / "sparse"


def _load(model_path: str | None):
    """The model and, when the folder has one, its tokenizer; a random model when nothing is bundled."""
    path = Path(model_path) if model_path else DEMO_MODEL
    if not (path / "config.json").exists():
        if model_path:
            raise FileNotFoundError(f"--model: no config.json in {path}")
        config = MDMConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, mlp_hidden_size=256)
        return random_model(config, seed=0), None, "random weights (no bundled demo model found)"
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer  # only when a tokenizer ships with the model

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return load_pretrained(path), tokenizer, str(path)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_demo(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model, tokenizer, source = _load(args.model)
    if tokenizer is not None:
        prompt_ids = torch.tensor(tokenizer.encode(args.prompt, add_special_tokens=False), dtype=torch.long)
    else:
        prompt_ids = torch.arange(2, 2 + len(args.prompt.split()), dtype=torch.long)
    plan = text_plan(args.gen_length, args.block_length, args.steps)
    sampling = SamplingConfig(temperature=args.temperature, seed=args.seed)
    options = SparseOptions(num_registers=model.config.num_registers if args.num_registers is None
                            else args.num_registers)
    generate_sparse(model, prompt_ids, plan, sampling, options)  # warm-up
    sparse, sparse_s = _timed(lambda: generate_sparse(model, prompt_ids, plan, sampling, options))
    dense, dense_s = _timed(lambda: generate_dense(model, prompt_ids, plan, sampling))
    report = {
        "model": source,
        "prompt": args.prompt,
        "sparse_tokens": sparse.tokens.tolist(),
        "dense_tokens": dense.tokens.tolist(),
        "steps": len(sparse.steps),
        "num_registers": options.num_registers,
        "forward_tokens": {"dense": dense.forward_tokens, "sparse": sparse.forward_tokens},
        "token_ratio": dense.forward_tokens / sparse.forward_tokens,
        "seconds": {"dense": dense_s, "sparse": sparse_s},
        "speedup": dense_s / sparse_s,
    }
    if tokenizer is not None:
        eos = model.config.eos_token_id
        for name, result in (("sparse", sparse), ("dense", dense)):
            ids = result.tokens.tolist()
            report[f"{name}_text"] = tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids,
                                                      skip_special_tokens=True)
    return report


def _command(args: argparse.Namespace) -> int:
    report = run_demo(args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"model: {report['model']}")
    print(f"prompt: {report['prompt']!r}")
    for name in ("sparse", "dense"):
        text = report.get(f"{name}_text")
        print(f"{name:>6}: {text!r}" if text is not None else f"{name:>6}: {report[f'{name}_tokens']}")
    f = report["forward_tokens"]
    print(f"forward tokens dense/sparse: {f['dense']}/{f['sparse']} = {report['token_ratio']:.2f}x; "
          f"wall time dense/sparse: {report['speedup']:.2f}x ({report['steps']} steps, "
          f"{report['num_registers']} registers)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate with the reference sparse and dense samplers (no vLLM)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--prompt", default="Q: 37+48=? A:")
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--num-registers", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command)
