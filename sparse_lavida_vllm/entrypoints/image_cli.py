"""`sparse-lavida generate-image`: text-to-image, edit and inpaint through vLLM's offline engine, PNGs out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sparse_lavida_vllm.entrypoints.cli import DEMO_MODEL, set_cpu_env


def _outputs(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def generate_image(ns: argparse.Namespace) -> int:
    model = ns.model or str(DEMO_MODEL)
    if not (Path(model) / "config.json").exists():
        sys.exit(f"--model: no config.json in {model}")
    for flag, path in (("--image", ns.image), ("--mask", ns.mask)):
        if path and not Path(path).is_file():
            sys.exit(f"{flag}: no such file: {path}")
    if ns.n < 1:
        sys.exit(f"-n must be >= 1, got {ns.n}")
    set_cpu_env()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from PIL import Image
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from sparse_lavida_vllm.entrypoints.images import BadField, mask_to_canvas, read_image
    from sparse_lavida_vllm.multimodal.layout import ImageLayout
    from sparse_lavida_vllm.scheduler.image_params import GENERATE
    from sparse_lavida_vllm.scheduler.params import DiffusionParamError, parse_params

    llm = LLM(model=model, dtype=ns.dtype, enforce_eager=True, max_model_len=ns.max_model_len)
    tokenizer = llm.get_tokenizer()
    model_config = llm.llm_engine.model_config
    try:
        layout = ImageLayout.from_config(getattr(model_config.hf_config, "image_generation", None), model,
                                         tokenizer.get_vocab().get, model_config.architecture)
    except ValueError as e:
        sys.exit(f"{model}: {e}")
    text = list(tokenizer.encode(ns.prompt, add_special_tokens=False))
    span, init_canvas = None, None
    try:
        if ns.image:
            source = read_image(Path(ns.image).read_bytes(), "--image")
            source_ids = layout.codec.encode(source).tolist()
            if ns.mask:
                init_canvas = mask_to_canvas(read_image(Path(ns.mask).read_bytes(), "--mask"), source, source_ids,
                                             layout.codec.grid)
                if GENERATE not in init_canvas:
                    sys.exit("--mask keeps every pixel: nothing to repaint")
            prompt, span = layout.edit_prompt(source_ids, text)
        elif ns.mask:
            sys.exit("--mask needs --image (the picture to repaint)")
        else:
            prompt = layout.t2i_prompt(text)
    except BadField as e:
        sys.exit(f"{e.field}: {e}")
    extra = layout.request_args(steps=ns.steps, guidance_scale=ns.guidance_scale,
                                image_guidance_scale=ns.image_guidance_scale, source_span=span,
                                init_canvas=init_canvas, sparse=not ns.dense, num_registers=ns.num_registers,
                                order=ns.order, schedule=ns.schedule)
    temperature = layout.defaults["temperature"] if ns.temperature is None else ns.temperature
    params = [SamplingParams(max_tokens=layout.codec.num_tokens, temperature=temperature, seed=ns.seed + i,
                             extra_args=dict(extra), detokenize=False) for i in range(ns.n)]
    try:  # the engine's own checks, before anything runs: a bad flag is one clear line
        hf_config = model_config.hf_config
        parse_params(params[0], len(prompt), model_config.max_model_len, int(getattr(hf_config, "num_registers", 0)),
                     default_sparse=bool(getattr(hf_config, "block_causal", False)),
                     has_register_token=getattr(hf_config, "register_token_id", None) is not None)
    except DiffusionParamError as e:
        sys.exit(f"{e.field}: {e}")

    engine = llm.llm_engine
    for i, p in enumerate(params):  # submitted together: the engine batches the n images and their CFG branches
        engine.add_request(f"image-{i}", {"prompt_token_ids": prompt}, p)
    finished = {}
    with tqdm(total=extra["steps"], desc="denoising", unit="step", disable=ns.quiet) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            bar.update(min(1, bar.total - bar.n))
    for i, path in enumerate(_outputs(ns.out, ns.n)):
        out = finished[f"image-{i}"]
        tokens = list(out.outputs[0].token_ids)
        if len(tokens) != layout.codec.num_tokens:
            sys.exit(f"image {i} did not finish ({out.outputs[0].finish_reason})")
        image = layout.codec.decode(torch.tensor(tokens, dtype=torch.long))
        if ns.scale > 1:
            image = image.resize((image.width * ns.scale, image.height * ns.scale), Image.NEAREST)
        image.save(path)
        metrics = (out.kv_transfer_params or {}).get("sparse_lavida_metrics", {})
        print(f"wrote {path} ({image.width}x{image.height}) {json.dumps(metrics)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate-image", help="text-to-image / edit / inpaint offline through vLLM")
    p.add_argument("prompt", help="caption (text-to-image) or instruction (with --image)")
    p.add_argument("-o", "--out", default="out.png", help="PNG path; with -n N: out-0.png ... out-{N-1}.png")
    p.add_argument("--model", default=None, help=f"checkpoint folder (default: {DEMO_MODEL})")
    p.add_argument("--image", default=None, help="source image to edit")
    p.add_argument("--mask", default=None, help="PNG of the image's size; transparent pixels are repainted")
    p.add_argument("-n", type=int, default=1, help="images, generated as one batch (seeds seed..seed+n-1)")
    p.add_argument("--steps", type=int, default=None, help="unmasking steps (default: the checkpoint's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--image-guidance-scale", type=float, default=None, help="edits: three-way guidance")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--order", default=None, choices=["stratified", "random", "raster"])
    p.add_argument("--schedule", default=None, choices=["linear", "cosine", "shift"])
    p.add_argument("--num-registers", type=int, default=None)
    p.add_argument("--dense", action="store_true", help="vanilla MDM sampling (no cache, no truncation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the saved PNG")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=generate_image)
