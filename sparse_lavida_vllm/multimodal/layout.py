"""How a checkpoint lays out image requests: codec, prompt prefixes, sampler defaults (config "image_generation")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_lavida_vllm.model_executor.lavida_o_config import ARCHITECTURE as LAVIDA_O
from sparse_lavida_vllm.multimodal.codec import ImageCodec

# Architectures whose image requests another layout builds: from_config names it instead of reading config.json.
OTHER_LAYOUT = {
    LAVIDA_O: (
        f"{LAVIDA_O} (LaViDa-O / Sparse-LaViDa) lays out its image requests with "
        "sparse_lavida_vllm.multimodal.lavida_o_layout.LaViDaOLayout (the images routes and `generate-image` use "
        "it), not with a config.json image_generation section"),
}
# Sampler defaults when the checkpoint names none (LaViDa-O's image sampler, scaled to small grids).
DEFAULTS: dict[str, Any] = {"steps": 16, "temperature": 0.8, "guidance_scale": 0.0, "image_guidance_scale": 0.0,
                            "schedule": "shift", "order": "stratified"}


def plan_args(defaults: Mapping[str, Any], grid: tuple[int, int], *, steps: int | None, guidance_scale: float | None,
              to_generate: int | None = None, order: str | None = None) -> dict[str, Any]:
    """The plan part of an image request's extra_args, shared by every layout: the canvas (`grid`: rows, columns),
    the step count (None: the default, at most `to_generate`, the positions to generate, when given), the schedule,
    the order (None: the default) and the guidance (None: the default)."""
    default_steps = int(defaults["steps"])
    if to_generate is not None:  # fewer positions to generate than the default step count
        default_steps = max(1, min(default_steps, to_generate))
    return {"kind": "image", "height": grid[0], "width": grid[1], "steps": default_steps if steps is None else steps,
            "schedule": defaults["schedule"], "order": defaults["order"] if order is None else order,
            "guidance_scale": defaults["guidance_scale"] if guidance_scale is None else guidance_scale}


def add_request_inputs(args: dict[str, Any], defaults: Mapping[str, Any], *, init_canvas: list[int] | None,
                       source_span: tuple[int, int] | None, image_guidance_scale: float | None,
                       uncond_prompt_ids: list[int] | None, **knobs: Any) -> dict[str, Any]:
    """The request-specific part of an image request's extra_args, shared by every layout: the inpainting canvas,
    the source image's span and its guidance (the checkpoint default when None), the negative prompt, the knobs."""
    if init_canvas is not None:
        args["init_canvas"] = list(init_canvas)
    if source_span is not None:
        args["source_span"] = list(source_span)
        scale = defaults["image_guidance_scale"] if image_guidance_scale is None else image_guidance_scale
        if scale:
            args["image_guidance_scale"] = scale
    elif image_guidance_scale:
        args["image_guidance_scale"] = image_guidance_scale  # refused by validation: no source image
    if uncond_prompt_ids is not None:
        args["uncond_prompt_ids"] = list(uncond_prompt_ids)
    args.update({k: v for k, v in knobs.items() if v is not None})
    return args


@dataclass(frozen=True)
class ImageLayout:
    """An image request as token ids: `[t2i prefix] text` or `[edit prefix] source image tokens text`, then
    an H x W canvas of image tokens decoded by the diffusion plan.

    `image_generation` in config.json: {"codec": {...}, "t2i_prefix": [token names], "edit_prefix": [token
    names], "defaults": {steps, temperature, guidance_scale, ...}}. The codec's ids are offset into the
    model's vocabulary (`token_range`), and sampling is restricted to them.
    """

    codec: ImageCodec
    t2i_prefix: tuple[int, ...]
    edit_prefix: tuple[int, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, image_generation: Mapping[str, Any] | None, checkpoint: str | Path | None,
                    token_to_id: Callable[[str], int | None], architecture: str | None = None) -> ImageLayout:
        """Build it from config.json's section; a missing or bad entry raises ValueError naming it. An
        `architecture` in OTHER_LAYOUT is refused first, naming the layout that serves it."""
        from sparse_lavida_vllm.multimodal.factory import load_image_codec

        if architecture in OTHER_LAYOUT:
            raise ValueError(OTHER_LAYOUT[architecture])
        if not image_generation:
            raise ValueError("this checkpoint has no image_generation section in config.json: it serves text only")
        if "codec" not in image_generation:
            raise ValueError("image_generation.codec is missing in config.json")
        codec = load_image_codec(dict(image_generation["codec"]), Path(checkpoint) if checkpoint else None)

        def ids(key: str) -> tuple[int, ...]:
            out = []
            for name in image_generation.get(key, []):
                token = token_to_id(name)
                if token is None:
                    raise ValueError(f"image_generation.{key}: token {name!r} is not in the tokenizer")
                out.append(int(token))
            return tuple(out)

        return cls(codec, ids("t2i_prefix"), ids("edit_prefix"),
                   {**DEFAULTS, **dict(image_generation.get("defaults", {}))})

    @property
    def token_range(self) -> tuple[int, int]:
        offset = int(getattr(self.codec, "token_offset", 0))
        return offset, offset + self.codec.vocab_size

    def t2i_prompt(self, text_ids: list[int]) -> list[int]:
        return [*self.t2i_prefix, *text_ids]

    def edit_prompt(self, source_ids: list[int], text_ids: list[int]) -> tuple[list[int], tuple[int, int]]:
        """The edit prompt and where its source image tokens sit (the image-only guidance branch keeps them)."""
        start = len(self.edit_prefix)
        return [*self.edit_prefix, *source_ids, *text_ids], (start, start + len(source_ids))

    def request_args(self, *, steps: int | None = None, guidance_scale: float | None = None,
                     image_guidance_scale: float | None = None, source_span: tuple[int, int] | None = None,
                     init_canvas: list[int] | None = None, uncond_prompt_ids: list[int] | None = None,
                     **knobs: Any) -> dict[str, Any]:
        """`SamplingParams.extra_args` of an image request; None means the checkpoint's default."""
        to_generate = None if init_canvas is None else sum(t < 0 for t in init_canvas)  # a repaint region's tokens
        args = plan_args(self.defaults, self.codec.grid, steps=steps, guidance_scale=guidance_scale,
                         to_generate=to_generate)
        args["token_range"] = list(self.token_range)
        for key in ("temperature_schedule", "min_temperature", "guidance_interval", "shift"):
            if key in self.defaults:
                args[key] = self.defaults[key]
        return add_request_inputs(args, self.defaults, init_canvas=init_canvas, source_span=source_span,
                                  image_guidance_scale=image_guidance_scale, uncond_prompt_ids=uncond_prompt_ids,
                                  **knobs)
