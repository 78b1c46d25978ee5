"""LaViDa-O image requests as engine requests: its prompt format, the VQ codec at the request's size, packed ids."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from sparse_lavida_vllm.model_executor.lavida_o import (
    VQ_SUBFOLDER,
    LaViDaOConfig,
    PatchIds,
    codes_to_patches,
    load_config,
    patches_to_codes,
)
from sparse_lavida_vllm.model_executor.lavida_o_vision import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, num_image_rows
from sparse_lavida_vllm.multimodal.layout import add_request_inputs
from sparse_lavida_vllm.multimodal.vq import VQCodec

# predict_t2i_edit.text_to_image's defaults: the caption template, the micro-conditioning appended to a caption
# (text-to-image only), the square resolution, and the closing token after the image placeholders.
T2I_TEMPLATE = "Generate an image with the caption:\n <prompt>"
MICRO_COND = "ORIGINAL WIDTH : {w}; ORIGINAL HEIGHT : {h}; TOP : 0; LEFT : 0; SCORE : 6.5"
RESOLUTION = 1024
CLOSING_TOKEN = "<|eot_id|>"
# Sampler defaults (the publishers' shift schedule and stratified order); guidance is off unless asked for, so a
# request runs one branch. `steps` is capped by the positions to decode.
DEFAULTS: dict[str, Any] = {"steps": 32, "temperature": 1.0, "guidance_scale": 0.0, "image_guidance_scale": 0.0,
                            "schedule": "shift", "order": "stratified", "shift": 3.0}
MAX_SIDE = 2048


@dataclass(frozen=True)
class EditPrompt:
    """An edit request's prompt. `prompt_ids` is what the engine is given; with a vision tower it holds
    `placeholder` (the ids of `<image>`) where the source's SigLIP rows go, which vLLM's multimodal processor
    expands into `image_rows` rows (`image`: the multimodal data). `source_span` is in the expanded prompt, the one
    the scheduler and the model see (`num_prompt_tokens` long)."""

    prompt_ids: list[int]
    source_span: tuple[int, int]
    source_codes: list[int]
    image: Image.Image | None = None
    image_start: int = 0  # where the SigLIP rows start (in either prompt: only text precedes them)
    image_rows: int = 0
    placeholder: tuple[int, ...] = ()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids) - len(self.placeholder) + self.image_rows

    def engine_prompt(self) -> dict[str, Any]:
        """The engine's prompt: token ids, and the SigLIP copy as vLLM multimodal data when there is one."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(self.prompt_ids)}
        if self.image is not None:
            prompt["multi_modal_data"] = {"image": self.image}
        return prompt

    def reference_ids(self) -> list[int]:
        """The prompt with one IMAGE_TOKEN_INDEX in place of the placeholder (the publishers' tokenizer_image_token
        output; lavida_o_vision.edit_understanding expands it), or the prompt itself without a tower."""
        if self.image is None:
            return list(self.prompt_ids)
        start, end = self.image_start, self.image_start + len(self.placeholder)
        return self.prompt_ids[:start] + [IMAGE_TOKEN_INDEX] + self.prompt_ids[end:]


@dataclass
class LaViDaOLayout:
    """A `llava_llada` checkpoint's image requests as engine requests.

    Prompt (the publishers' predict_t2i_edit.py): the tokenizer's chat template around the user turn, the image's
    positions after it (the canvas, one packed id per 2x2 code patch), then `<|eot_id|>` after the image (a suffix
    prefilled at its true positions). Text-to-image: the caption template + micro-conditioning. Edits: the user turn
    is `<image> <|reserved_token_6|> x positions` (the source's SigLIP rows when the checkpoint has a vision tower,
    then its VQ codes, prompt rows of the stream the checkpoint's enc_use_image_branch names) then the instruction.
    The codec is the checkpoint's vqvae/ at the request's size: an H x W image is (H/f) x (W/f) codes and
    (H/2f) x (W/2f) positions (f = the VQ downsampling).
    """

    folder: Path
    config: LaViDaOConfig
    codec: VQCodec
    encode_chat: Callable[..., tuple[list[int], list[int]]]  # user text -> ids (before, after) the split point
    suffix: tuple[int, ...]
    image_registers: int
    # the ids of `<image>` and of the space after it (predict_t2i_edit writes f"<image> {placeholders}..."); only
    # used on checkpoints with a vision tower
    image_placeholder: tuple[int, ...] = ()
    space: tuple[int, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULTS))
    _codecs: dict[tuple[int, int], VQCodec] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path, tokenizer: Any) -> LaViDaOLayout:
        folder = Path(folder)
        config = load_config(folder)
        codec = VQCodec(folder, subfolder=VQ_SUBFOLDER, resolution=RESOLUTION, fit="pad")
        vocab = tokenizer.get_vocab()
        suffix = (vocab[CLOSING_TOKEN],) if CLOSING_TOKEN in vocab else ()
        registers = config.registers("image") if config.register_code is not None else 0
        return cls(folder, config, codec, _chat_encoder(tokenizer), suffix, registers,
                   tuple(_ids(tokenizer, IMAGE_PLACEHOLDER)), tuple(_ids(tokenizer, " ")))

    @property
    def patch_ids(self) -> PatchIds:
        return PatchIds.of(self.config)

    @property
    def factor(self) -> int:
        """Pixels per side of one position (2x2 codes)."""
        return self.codec.downsample * (2 if self.config.downsample else 1)

    # ---- sizes ----

    def parse_size(self, value: Any) -> tuple[int, int]:
        """'WxH' (or 'auto': the publishers' 1024x1024) with sides that are multiples of one position's pixels; a
        ValueError (the route's 400 on `size`) otherwise."""
        f = self.factor
        if value in (None, "auto"):
            return RESOLUTION, RESOLUTION
        ok = isinstance(value, str) and value.count("x") == 1 and all(p.isdigit() for p in value.split("x"))
        w, h = (int(p) for p in value.split("x")) if ok else (0, 0)
        if not ok or not (w and h) or w % f or h % f or max(w, h) > MAX_SIDE:
            raise ValueError(f"size must be 'WIDTHxHEIGHT' with sides multiples of {f} px up to {MAX_SIDE} "
                                   f"(one position = 2x2 VQ codes of {self.codec.downsample} px), got {value!r}")
        return w, h

    def codec_at(self, size: tuple[int, int]) -> VQCodec:
        """The checkpoint's VQ codec at this (width, height): one VQ model, any resolution (it is convolutional)."""
        if size not in self._codecs:
            codec = copy.copy(self.codec)
            codec.width, codec.height = size
            self._codecs[size] = codec
        return self._codecs[size]

    def positions(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the position grid of a (width, height) image."""
        return size[1] // self.factor, size[0] // self.factor

    def num_outputs(self, size: tuple[int, int]) -> int:
        rows, cols = self.positions(size)
        return rows * cols

    # ---- codes <-> packed positions ----

    def encode(self, image: Image.Image, size: tuple[int, int]) -> Tensor:
        """An image as its (positions, codes_per_position) code patches at `size`."""
        codec = self.codec_at(size)
        codes = codec.encode(image)
        return codes_to_patches(codes, *codec.grid) if self.config.downsample else codes.view(-1, 1)

    def decode(self, token_ids: Tensor, size: tuple[int, int]) -> Image.Image:
        """The PNG of a finished canvas (packed position ids)."""
        codec = self.codec_at(size)
        patches = self.patch_ids.unpack(token_ids.long())
        codes = patches_to_codes(patches, *codec.grid) if self.config.downsample else patches.view(-1)
        return codec.decode(codes)

    def canvas_ids(self, patches: Tensor) -> list[int]:
        """Given (inpainting) positions as the canvas holds them: image-stream packed ids."""
        return self.patch_ids.pack(patches).tolist()

    # ---- prompts ----

    def t2i_prompt(self, caption: str, size: tuple[int, int]) -> list[int]:
        micro = MICRO_COND.format(w=size[0], h=size[1])
        before, after = self.encode_chat(T2I_TEMPLATE.replace("<prompt>", f"{caption} {micro}"))
        return before + after

    def edit_prompt(self, instruction: str, source: Tensor, image: Image.Image | None = None) -> EditPrompt:
        """The edit's prompt: the source's VQ placeholders (`source`: its code patches) and the instruction, after
        the source's SigLIP copy (`image`, the picture as uploaded) on checkpoints with a vision tower. Without a
        tower (or an image) the prompt is the VQ placeholders and the instruction, as before."""
        before, after = self.encode_chat(f"\n {instruction} ", split=True)
        codes = source.reshape(-1).tolist()
        understanding = self.config.understanding
        if understanding is None or image is None:
            start = len(before)
            prompt = before + [self.config.edit_image_token_id] * source.shape[0] + after
            return EditPrompt(prompt, (start, start + source.shape[0]), codes)
        image = image.convert("RGB")
        rows = num_image_rows(understanding, image.size)
        placeholder = self.image_placeholder
        prompt = before + list(placeholder) + list(self.space) + [self.config.edit_image_token_id] * source.shape[0]
        start = len(before) + rows + len(self.space)  # in the expanded prompt
        return EditPrompt(prompt + after, (start, start + source.shape[0]), codes, image, len(before), rows,
                          placeholder)

    def request_args(self, size: tuple[int, int], *, steps: int | None = None, guidance_scale: float | None = None,
                     image_guidance_scale: float | None = None, source_span: tuple[int, int] | None = None,
                     source_codes: list[int] | None = None, init_canvas: list[int] | None = None,
                     uncond_prompt_ids: list[int] | None = None, **knobs: Any) -> dict[str, Any]:
        """`SamplingParams.extra_args` of a LaViDa-O image request (None: the defaults above)."""
        rows, cols = self.positions(size)
        to_generate = rows * cols if init_canvas is None else sum(t < 0 for t in init_canvas)
        square = rows == cols and rows & (rows - 1) == 0
        args: dict[str, Any] = {
            "kind": "image", "height": rows, "width": cols,
            "steps": max(1, min(int(self.defaults["steps"]), to_generate)) if steps is None else steps,
            "schedule": self.defaults["schedule"], "order": self.defaults["order"] if square else "random",
            "shift": self.defaults["shift"], "num_registers": self.image_registers,
            "guidance_scale": self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale}
        if self.suffix:
            args["suffix_ids"] = list(self.suffix)
        if source_span is not None:
            args["source_codes"] = list(source_codes or [])
        return add_request_inputs(args, self.defaults, init_canvas=init_canvas, source_span=source_span,
                                  image_guidance_scale=image_guidance_scale, uncond_prompt_ids=uncond_prompt_ids,
                                  **knobs)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


_SPLIT = "\x00"  # where the source image's placeholders go inside the rendered user turn


def _chat_encoder(tokenizer: Any) -> Callable[..., tuple[list[int], list[int]]]:
    """User text -> token ids of the chat-templated turn (generation prompt included), split at the start of the
    text when `split` (the edit's source image goes there). Without a chat template: the text alone."""

    def encode(text: str, split: bool = False) -> tuple[list[int], list[int]]:
        content = (_SPLIT + text) if split else text
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True)
        else:
            rendered = content
        head, _, tail = rendered.partition(_SPLIT) if split else ("", "", rendered)
        return _ids(tokenizer, head), _ids(tokenizer, tail)

    return encode


__all__ = ["LaViDaOLayout", "EditPrompt", "T2I_TEMPLATE", "MICRO_COND", "DEFAULTS"]
