"""Text-to-image with the bundled demo model and the reference sparse sampler; writes a PNG grid."""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from sparse_lavida_vllm.diffusion.planners import image_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.entrypoints.hub import add_hub_arguments, resolve_model_arg
from sparse_lavida_vllm.model_executor.weights import load_pretrained
from sparse_lavida_vllm.training.data import DEMO_ROOT, DIGIT_WORDS, DemoData
from sparse_lavida_vllm.training.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEMO_ROOT / "sparse"), help="checkpoint folder or Hugging Face id")
    add_hub_arguments(parser)
    parser.add_argument("--prompt", default=None, help="default: 'a handwritten digit <word>' for 0..9")
    parser.add_argument("--sampler", choices=["sparse", "dense"], default="sparse")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="text_to_image.png")
    args = parser.parse_args()

    torch.set_num_threads(2)
    folder = resolve_model_arg(args.model, args)
    model = load_pretrained(folder)
    data = DemoData(load_tokenizer(folder))
    prompts = [args.prompt] if args.prompt else [f"a handwritten digit {w}" for w in DIGIT_WORDS]
    tiles = []
    for i, text in enumerate(prompts):
        sampling = SamplingConfig(temperature=args.temperature, cfg_scale=args.cfg_scale, seed=args.seed + i)
        plan = image_plan(16, 16, args.steps, generator=torch.Generator().manual_seed(args.seed + i))
        prompt = data.t2i_prompt(text)
        if args.sampler == "sparse":
            result = generate_sparse(model, prompt, plan, sampling, SparseOptions(model.config.num_registers))
        else:
            result = generate_dense(model, prompt, plan, sampling)
        image_ids = result.tokens.clamp(data.codec.token_offset, data.codec.token_offset + data.codec.levels - 1)
        tiles.append(data.codec.decode(image_ids).resize((64, 64), Image.NEAREST))
        print(f"{text!r}: {result.forward_tokens} forward tokens")
    grid = Image.new("L", (64 * len(tiles), 64))
    for i, tile in enumerate(tiles):
        grid.paste(tile, (64 * i, 0))
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
