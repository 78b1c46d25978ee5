"""Arithmetic with the bundled demo model: semi-autoregressive blocks through the reference sparse sampler."""

from __future__ import annotations

import argparse

import torch

from sparse_lavida_vllm.diffusion.planners import text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.entrypoints.hub import add_hub_arguments, resolve_model_arg
from sparse_lavida_vllm.model_executor.weights import load_pretrained
from sparse_lavida_vllm.training.data import DEMO_ROOT, TEXT_GEN_LENGTH, DemoData, text_prompt
from sparse_lavida_vllm.training.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("questions", nargs="*", default=["37+48=?", "5+9=?", "99+99=?", "60+7=?"])
    parser.add_argument("--model", default=str(DEMO_ROOT / "sparse"), help="checkpoint folder or Hugging Face id")
    add_hub_arguments(parser)
    parser.add_argument("--sampler", choices=["sparse", "dense"], default="sparse")
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(2)
    folder = resolve_model_arg(args.model, args)
    model = load_pretrained(folder)
    data = DemoData(load_tokenizer(folder))
    for question in args.questions:
        prompt = data.encode_text(text_prompt(question))
        plan = text_plan(TEXT_GEN_LENGTH, args.block_length, args.steps)
        if args.sampler == "sparse":
            result = generate_sparse(model, prompt, plan, SamplingConfig(), SparseOptions(model.config.num_registers))
        else:
            result = generate_dense(model, prompt, plan, SamplingConfig())
        ids = result.tokens.tolist()
        ids = ids[:ids.index(data.eos)] if data.eos in ids else ids
        print(f"Q: {question} A: {data.tok.decode(ids)}   ({result.forward_tokens} forward tokens)")


if __name__ == "__main__":
    main()
