"""`sparse-lavida generate-image`: text-to-image, edit and inpaint through vLLM's offline engine, PNGs out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sparse_lavida_vllm.entrypoints.cli import DEMO_MODEL, set_cpu_env
from sparse_lavida_vllm.entrypoints.hub import add_hub_arguments, resolve_model_arg


def _outputs(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def _layout_request(ns: argparse.Namespace, model: str, tokenizer: Any, model_config: Any) -> tuple:
    """(prompt, extra_args, layout) of a checkpoint with an `image_generation` section (the demo's kind)."""
    from sparse_lavida_vllm.entrypoints.image_io import mask_to_canvas, read_image
    from sparse_lavida_vllm.entrypoints.image_protocol import BadField
    from sparse_lavida_vllm.multimodal.layout import ImageLayout
    from sparse_lavida_vllm.scheduler.image_params import GENERATE

    try:
        layout = ImageLayout.from_config(getattr(model_config.hf_config, "image_generation", None), model,
                                         tokenizer.get_vocab().get, model_config.architecture)
    except ValueError as e:
        sys.exit(f"{model}: {e}")
    if ns.size:
        sys.exit("--size: this checkpoint draws images of its codec's size (use --scale to enlarge the PNG)")
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
                                init_canvas=init_canvas, sparse=_sparse(ns), num_registers=ns.num_registers,
                                order=ns.order, schedule=ns.schedule)
    return prompt, extra, layout


def _sparse(ns: argparse.Namespace) -> bool | None:
    """--sparse / --dense, or None: the checkpoint's own mode (sparse only when trained step-causal)."""
    return True if ns.sparse else (False if ns.dense else None)


def _lavida_o_request(ns: argparse.Namespace, llm: Any, model: str, tokenizer: Any) -> tuple:
    """(prompt, extra_args, positions, decode, image registers, has a register code) of a LaViDa-O request, laid out
    as the images routes do (multimodal/lavida_o_layout.py); the prompt is token ids, or an edit's EditPrompt."""
    import torch

    from sparse_lavida_vllm.entrypoints.image_io import mask_to_canvas, read_image
    from sparse_lavida_vllm.entrypoints.image_protocol import BadField
    from sparse_lavida_vllm.model_executor.lavida_o_text import serves_lavida_o_images
    from sparse_lavida_vllm.multimodal.lavida_o_layout import LaViDaOLayout
    from sparse_lavida_vllm.scheduler.image_params import GENERATE

    why = serves_lavida_o_images(model)
    if why is not None:
        sys.exit(f"{model}: {why}")
    layout = LaViDaOLayout.load(model, tokenizer)
    try:
        size = layout.parse_size(ns.size)
    except ValueError as e:
        sys.exit(f"--size: {e}")
    span = codes = init_canvas = None
    try:
        if ns.image:
            if layout.config.gen_enc_add_pos_emb:
                sys.exit("--image: gen_enc_add_pos_emb=true (Sparse-LaViDa) embeds an edit's source image with code "
                         "that is not published: edits are not supported on this checkpoint")
            source = read_image(Path(ns.image).read_bytes(), "--image")
            patches = layout.encode(source, size)
            if ns.mask:
                init_canvas = mask_to_canvas(read_image(Path(ns.mask).read_bytes(), "--mask"), source,
                                             layout.canvas_ids(patches), layout.positions(size))
                if GENERATE not in init_canvas:
                    sys.exit("--mask keeps every pixel: nothing to repaint")
            prompt = layout.edit_prompt(ns.prompt, patches, source)  # with a tower: its SigLIP copy too
            span, codes = prompt.source_span, prompt.source_codes
        elif ns.mask:
            sys.exit("--mask needs --image (the picture to repaint)")
        else:
            prompt = layout.t2i_prompt(ns.prompt, size)
    except BadField as e:
        sys.exit(f"{e.field}: {e}")
    extra = layout.request_args(size, steps=ns.steps, guidance_scale=ns.guidance_scale,
                                image_guidance_scale=ns.image_guidance_scale, source_span=span, source_codes=codes,
                                init_canvas=init_canvas, sparse=_sparse(ns), num_registers=ns.num_registers,
                                order=ns.order, schedule=ns.schedule, uncond_prompt_ids=layout.uncond_ids(prompt))

    def decode(tokens: list[int]) -> Any:
        return layout.decode(torch.tensor(tokens, dtype=torch.long), size)

    return (prompt, extra, layout.num_outputs(size), decode, layout.image_registers,
            layout.config.register_code is not None)


def generate_image(ns: argparse.Namespace) -> int:
    model = resolve_model_arg(ns.model or str(DEMO_MODEL), ns)
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

    from sparse_lavida_vllm.model_executor.lavida_o_config import ARCHITECTURE as LAVIDA_O
    from sparse_lavida_vllm.multimodal.lavida_o_layout import DEFAULTS as _LAVIDA_DEFAULTS
    from sparse_lavida_vllm.scheduler.params import DiffusionParamError, parse_params

    llm = LLM(model=model, dtype=ns.dtype, enforce_eager=True, max_model_len=ns.max_model_len)
    tokenizer = llm.get_tokenizer()
    model_config = llm.llm_engine.model_config
    hf_config = model_config.hf_config
    registers = int(getattr(hf_config, "num_registers", 0))
    has_register = getattr(hf_config, "register_token_id", None) is not None
    if model_config.architecture == LAVIDA_O:
        prompt, extra, num_outputs, decode, registers, has_register = _lavida_o_request(ns, llm, model, tokenizer)
        scale, defaults = ns.scale or 1, _LAVIDA_DEFAULTS  # decoded at the requested size: no upscaling by default
    else:
        prompt, extra, layout = _layout_request(ns, model, tokenizer, model_config)
        num_outputs, scale = layout.codec.num_tokens, ns.scale or 4
        defaults = layout.defaults

        def decode(tokens: list[int]) -> Image.Image:
            return layout.codec.decode(torch.tensor(tokens, dtype=torch.long))
    temperature = defaults["temperature"] if ns.temperature is None else ns.temperature
    # a LaViDa-O edit (EditPrompt) may carry the source's SigLIP copy: vLLM's processor expands its `<image>`
    engine_prompt = prompt.engine_prompt() if hasattr(prompt, "engine_prompt") else {"prompt_token_ids": prompt}
    prompt_length = prompt.num_prompt_tokens if hasattr(prompt, "engine_prompt") else len(prompt)
    params = [SamplingParams(max_tokens=num_outputs, temperature=temperature, seed=ns.seed + i,
                             extra_args=dict(extra), detokenize=False) for i in range(ns.n)]
    try:  # the engine's own checks, before anything runs: a bad flag is one clear line
        parse_params(params[0], prompt_length, model_config.max_model_len, registers,
                     default_sparse=bool(getattr(hf_config, "block_causal", False)), has_register_token=has_register)
    except DiffusionParamError as e:
        sys.exit(f"{e.field}: {e}")

    engine = llm.llm_engine
    for i, p in enumerate(params):  # submitted together: the engine batches the n images and their CFG branches
        engine.add_request(f"image-{i}", engine_prompt, p)
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
        if len(tokens) != num_outputs:
            sys.exit(f"image {i} did not finish ({out.outputs[0].finish_reason})")
        image = decode(tokens)
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        image.save(path)
        metrics = (out.kv_transfer_params or {}).get("sparse_lavida_metrics", {})
        print(f"wrote {path} ({image.width}x{image.height}) {json.dumps(metrics)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate-image", help="text-to-image / edit / inpaint offline through vLLM")
    p.add_argument("prompt", help="caption (text-to-image) or instruction (with --image)")
    p.add_argument("-o", "--out", default="out.png", help="PNG path; with -n N: out-0.png ... out-{N-1}.png")
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder or Hugging Face id org/name (default: {DEMO_MODEL})")
    add_hub_arguments(p)
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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dense", action="store_true", help="vanilla MDM sampling (no cache, no truncation); on "
                      "LaViDa-O the publishers' per-code sampler (default: the checkpoint's mode)")
    mode.add_argument("--sparse", action="store_true", help="Sparse-LaViDa sampling (default: the checkpoint's mode, "
                      "sparse when it was trained step-causal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="LaViDa-O: WIDTHxHEIGHT (sides multiples of 32 px; default 1024x1024)")
    p.add_argument("--scale", type=int, default=None,
                   help="nearest-neighbour upscaling of the saved PNG (default: 4; LaViDa-O: 1)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=generate_image)
