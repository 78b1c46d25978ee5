"""Image request knobs (text-to-image, edit, inpaint): validated once from SamplingParams into a frozen ImageParams."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from sparse_lavida_vllm.diffusion.planners import ORDERS, SCHEDULES, UnmaskPlan, image_plan, publishers_code_plan
from sparse_lavida_vllm.diffusion.sampling import TEMPERATURE_SCHEDULES, SamplingConfig
from sparse_lavida_vllm.scheduler.knobs import DiffusionParamError, read_bool, read_int

# The keys of an image request's `extra_args` (the images routes and `generate-image` fill them in).
IMAGE_KNOBS = ("kind", "height", "width", "steps", "schedule", "order", "shift", "sparse", "num_registers",
               "guidance_scale", "image_guidance_scale", "guidance_interval", "temperature_schedule",
               "min_temperature", "token_range", "init_canvas", "uncond_prompt_ids", "source_span", "suffix_ids",
               "source_codes", "preview_steps", "per_code")
GENERATE = -1  # an init_canvas entry that marks a position to generate (everything else is given)


@dataclass(frozen=True)
class ImageParams:
    """One image request: an H x W canvas of image tokens after the prompt, decoded by a fixed partition.

    An edit's source image is part of the prompt (cached, never masked); `source_span` says where, so the
    image-only guidance branch can keep it while masking the text. Inpainting gives `init_canvas`: the
    tokens outside the region to repaint, which are prefilled with the prompt and never planned.
    """

    height: int
    width: int
    steps: int
    schedule: str
    order: str
    shift: float
    sparse: bool
    num_registers: int
    init_canvas: tuple[int, ...] | None  # H*W ids, GENERATE where the plan decodes
    uncond_prompt_ids: tuple[int, ...] | None  # None: the prompt replaced by masks (LaViDa-O)
    source_span: tuple[int, int] | None  # [start, end) of the edit's source image tokens in the prompt
    sampling: SamplingConfig
    # text after the image (LaViDa-O's closing <|eot_id|>): prefilled at its true positions after the canvas
    suffix_ids: tuple[int, ...] = ()
    # LaViDa-O edits: the source image's VQ codes (codes_per_position per position of source_span, raster inside
    # each 2x2 patch); the prompt holds placeholders there, the scheduler feeds the packed patches (lavida_o.PatchIds)
    source_codes: tuple[int, ...] | None = None
    # after each of these steps (0-based) the scheduler also emits a snapshot of the whole canvas, undecoded
    # positions as the mask id (the images routes' partial images); sampling is unchanged
    preview_steps: tuple[int, ...] = ()
    # LaViDa-O's own sampler (dense only): single VQ codes unmasked in the publishers' stratified order with their
    # shift schedule (planners.publishers_code_plan, over the 2H x 2W code grid), instead of whole 2x2 positions
    per_code: bool = False
    # the text request's fields, neutral for images, so the scheduler treats both kinds alike
    min_tokens: int = 0
    stop_at_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    allowed_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0

    kind = "image"

    @property
    def gen_length(self) -> int:
        return self.height * self.width

    @property
    def block_length(self) -> int:  # the image is emitted whole, when its canvas is full
        return self.gen_length

    def masked(self) -> torch.Tensor | None:
        if self.init_canvas is None:
            return None
        return torch.tensor(self.init_canvas) == GENERATE

    def plan(self) -> UnmaskPlan:
        if self.per_code:  # the publishers' fixed order (their seed 42), whatever the request's seed
            return publishers_code_plan(2 * self.height, self.steps, self.shift, masked=self.masked())
        # the order is drawn from the request's seed: same seed, same partition, on every rank and alone or batched
        generator = torch.Generator().manual_seed(self.sampling.seed)
        return image_plan(self.height, self.width, self.steps, self.schedule, self.order, self.shift, generator,
                          self.masked())

    def branch_prompts(self, prompt: list[int], mask_id: int) -> list[list[int]]:
        """The prompts of the guidance branches: cond, then uncond and image-only when guidance asks for them."""
        return [p for p, _ in self.branches(prompt, mask_id)]

    def branches(self, prompt: list[int], mask_id: int) -> list[tuple[list[int], list[int]]]:
        """(prompt, text after the image) of each guidance branch, LaViDa-O's edit_branches: cond; uncond = the prompt
        all masks (the source image too), the suffix kept; image-only = every text row masked, the source kept. An
        edit's SigLIP rows (pad ids in the prompt) become masks in both companions, as edit_mode 0 has it."""
        suffix = list(self.suffix_ids)
        out = [(prompt, suffix)]
        if self.sampling.cfg_scale > 0:
            out.append((list(self.uncond_prompt_ids) if self.uncond_prompt_ids else [mask_id] * len(prompt), suffix))
            if self.sampling.image_cfg_scale > 0:
                start, end = self.source_span
                out.append(([t if start <= i < end else mask_id for i, t in enumerate(prompt)],
                            [mask_id] * len(suffix)))
        return out


def _number(extra: dict, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    value = extra.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DiffusionParamError(name, f"{name} must be a finite number, got {value!r}", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DiffusionParamError(name, f"{name} must be in [{lo}, {hi}], got {value!r}", value)
    return float(value)


def _choice(extra: dict, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = extra.get(name, default)
    if value not in allowed:
        raise DiffusionParamError(name, f"{name} must be one of {', '.join(allowed)}, got {value!r}", value)
    return value


def _ints(extra: dict, name: str, length: int | None = None) -> tuple[int, ...] | None:
    value = extra.get(name)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise DiffusionParamError(name, f"{name} must be a list of integers", None)
    if length is not None and len(value) != length:
        raise DiffusionParamError(name, f"{name} must hold {length} integers, got {len(value)}", None)
    return tuple(value)


def parse_image_params(sampling_params: Any, extra: dict, prompt_len: int, max_model_len: int,
                       default_num_registers: int, default_sparse: bool = True) -> ImageParams:
    """Validate an image request (extra_args with kind "image"); a bad value raises naming the field."""
    unknown = sorted(set(extra) - set(IMAGE_KNOBS))
    if unknown:
        raise DiffusionParamError(unknown[0], f"unknown image knob {unknown[0]!r}; known: {', '.join(IMAGE_KNOBS)}")
    height, width = read_int(extra, "height", None), read_int(extra, "width", None)
    for name, value in (("height", height), ("width", width)):
        if value is None or value < 1:
            raise DiffusionParamError(name, f"{name} (image tokens) must be an integer >= 1, got {value}", value)
    suffix = _ints(extra, "suffix_ids") or ()
    if any(t < 0 for t in suffix):
        raise DiffusionParamError("suffix_ids", "suffix_ids must be token ids (>= 0)", None)
    if prompt_len + height * width + len(suffix) > max_model_len:
        raise DiffusionParamError("size", f"the image ({height}x{width} tokens) plus the prompt ({prompt_len} "
                                  f"tokens) exceeds max_model_len ({max_model_len})", height * width)
    init_canvas = _ints(extra, "init_canvas", height * width)
    if init_canvas is not None and any(t < GENERATE for t in init_canvas):
        raise DiffusionParamError("init_canvas", f"init_canvas entries must be token ids or {GENERATE} (generate)")
    to_generate = height * width if init_canvas is None else sum(t == GENERATE for t in init_canvas)
    if to_generate == 0:
        raise DiffusionParamError("mask", "nothing to generate: the mask keeps every position of the image")
    steps = read_int(extra, "steps", min(16, to_generate))
    if steps < 1 or steps > to_generate:
        raise DiffusionParamError("steps", f"steps must be in [1, {to_generate}] (the tokens to generate), "
                                  f"got {steps}", steps)
    preview_steps = _ints(extra, "preview_steps") or ()
    if list(preview_steps) != sorted(set(preview_steps)) or any(not 0 <= s < steps - 1 for s in preview_steps):
        raise DiffusionParamError("preview_steps", f"preview_steps must be increasing step indices in [0, {steps - 1})"
                                  f" (after the last step the image itself is emitted), got {list(preview_steps)}")
    order = _choice(extra, "order", "stratified", ORDERS)
    if order == "stratified" and (height != width or height & (height - 1)):
        raise DiffusionParamError("order", f"the stratified order needs a square power-of-two grid, got "
                                  f"{height}x{width}; use order random or raster", order)
    num_registers = read_int(extra, "num_registers", default_num_registers)
    if num_registers < 0 or num_registers > max_model_len:
        raise DiffusionParamError("num_registers", f"num_registers must be in [0, {max_model_len}], "
                                  f"got {num_registers}", num_registers)
    uncond = _ints(extra, "uncond_prompt_ids", prompt_len)
    span = _ints(extra, "source_span", 2)
    if span is not None and not 0 <= span[0] < span[1] <= prompt_len:
        raise DiffusionParamError("source_span", f"source_span must be [start, end) inside the prompt "
                                  f"({prompt_len} tokens), got {list(span)}", None)
    source_codes = _ints(extra, "source_codes")
    if source_codes is not None:
        if span is None:
            raise DiffusionParamError("source_codes", "source_codes needs source_span (where the source image sits)")
        per = len(source_codes) // max(span[1] - span[0], 1)
        if per < 1 or per * (span[1] - span[0]) != len(source_codes) or any(c < 0 for c in source_codes):
            raise DiffusionParamError("source_codes", f"source_codes must hold the same number of codes (>= 0) for "
                                      f"each of the {span[1] - span[0]} source positions, got {len(source_codes)}")
    image_guidance = _number(extra, "image_guidance_scale", 0.0, 0.0, 100.0)
    if image_guidance > 0 and span is None:
        raise DiffusionParamError("image_guidance_scale", "image_guidance_scale needs a source image (an edit)",
                                  image_guidance)
    interval = extra.get("guidance_interval", [0.0, 1.0])
    if (not isinstance(interval, list | tuple) or len(interval) != 2
            or any(isinstance(v, bool) or not isinstance(v, int | float) for v in interval)
            or not 0 <= interval[0] <= interval[1] <= 1):
        raise DiffusionParamError("guidance_interval", f"guidance_interval must be [start, end] with "
                                  f"0 <= start <= end <= 1, got {interval!r}", None)
    token_range = _ints(extra, "token_range", 2)
    if token_range is not None and not 0 <= token_range[0] < token_range[1]:
        raise DiffusionParamError("token_range", f"token_range must be [lo, hi) with lo < hi, got {token_range}")
    temperature = getattr(sampling_params, "temperature", 1.0)
    seed = getattr(sampling_params, "seed", None)
    try:
        sampling = SamplingConfig(
            temperature=float(temperature), top_k=max(int(getattr(sampling_params, "top_k", 0) or 0), 0),
            top_p=float(getattr(sampling_params, "top_p", 1.0)),
            cfg_scale=_number(extra, "guidance_scale", 0.0, 0.0, 100.0), image_cfg_scale=image_guidance,
            cfg_interval=(float(interval[0]), float(interval[1])),
            temperature_schedule=_choice(extra, "temperature_schedule", "constant", TEMPERATURE_SCHEDULES),
            min_temperature=_number(extra, "min_temperature", 0.0, 0.0), token_range=token_range,
            seed=secrets.randbits(62) if seed is None else int(seed))
    except ValueError as e:  # SamplingConfig's messages start with the field name
        raise DiffusionParamError(str(e).split()[0], str(e)) from None
    schedule, sparse = _choice(extra, "schedule", "shift", SCHEDULES), read_bool(extra, "sparse", default_sparse)
    per_code = read_bool(extra, "per_code", False)
    if per_code and (sparse or schedule != "shift" or order != "stratified"):
        raise DiffusionParamError("per_code", "per_code (LaViDa-O's own per-code sampler) runs dense with the shift "
                                  "schedule and the stratified order: send sparse false (a sparse step caches whole "
                                  "2x2 positions), schedule shift, order stratified", None)
    return ImageParams(height=height, width=width, steps=steps, schedule=schedule, order=order,
                       shift=_number(extra, "shift", 5.0, 1e-3, 1e3), sparse=sparse, per_code=per_code,
                       num_registers=num_registers, init_canvas=init_canvas, uncond_prompt_ids=uncond,
                       source_span=span, sampling=sampling, suffix_ids=tuple(suffix), source_codes=source_codes,
                       preview_steps=preview_steps)
