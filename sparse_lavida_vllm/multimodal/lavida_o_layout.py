"""LaViDa-O image requests as engine requests: its prompt format, the VQ codec at the request's size, packed ids."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from sparse_lavida_vllm.model_executor.lavida_o_config import VQ_SUBFOLDER, LaViDaOConfig, load_config
from sparse_lavida_vllm.model_executor.lavida_o_vision import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, num_image_rows
from sparse_lavida_vllm.model_executor.patch_ids import PatchIds, codes_to_patches, patches_to_codes
from sparse_lavida_vllm.multimodal.layout import add_request_inputs, plan_args
from sparse_lavida_vllm.multimodal.vq import VQCodec

# The publishers' request (adobe-research/LaVida-O, llava/eval/predict_t2i_edit.py `text_to_image`, rendered with
# `conv_templates["llada"]` of llava/conversation.py): a system turn, the user turn, then an assistant turn holding the
# image placeholders; the rendering ends with the chat template's generation prompt, which stays (the result of
# predict_t2i_edit's `removesuffix` is discarded). Text-to-image: the caption template plus micro-conditioning;
# edits: `<image> ` + the source's VQ placeholders + "\n " + instruction, no micro-conditioning (text_to_image
# blanks it when an edit image is given).
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
T2I_TEMPLATE = "Generate an image with the caption:\n <prompt>"
MICRO_COND = "ORIGINAL WIDTH : {w}; ORIGINAL HEIGHT : {h}; TOP : 0; LEFT : 0; SCORE : {score}"
RESOLUTION = 1024
CLOSING_TOKEN = "<|eot_id|>"  # closes a turn; the uncond branch masks the prompt up to the user turn's
# The publishers' evaluation knobs (llava/eval/1024_eval.yaml; edits: 1024_eval_edit.yaml). Their temperature decay
# (`dynamic_temperature`, `schedule_temp: cosine2`, `min_temperature`) scales `alg_temp`, which only the
# confidence policies `mmada` / `mask_git` read; with `confidence_policy: stratified` codes are drawn at the constant
# `temperature`, so that is what these defaults say. `steps` is capped by the positions to decode.
DEFAULTS: dict[str, Any] = {"steps": 64, "temperature": 0.8, "guidance_scale": 4.0, "image_guidance_scale": 0.0,
                            "schedule": "shift", "order": "stratified", "shift": 5.0, "score": "7.110;"}
EDIT_DEFAULTS: dict[str, Any] = {**DEFAULTS, "guidance_scale": 1.2, "image_guidance_scale": 1.4}
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


# Where the rendered conversation holds the canvas and an edit's source placeholders: split out before tokenizing,
# as the publishers' reserved tokens split their text (special tokens never merge with their neighbours).
_CANVAS, _SOURCE = "\x00canvas\x00", "\x00source\x00"


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered request: the ids before the canvas (`_SOURCE` / IMAGE_PLACEHOLDER items where an edit's VQ
    placeholders and SigLIP rows go) and the ids after it (the suffix)."""

    before: list[int | str]
    after: list[int]


@dataclass(frozen=True)
class PublishersChat:
    """The publishers' request text as token ids: `conv_templates["llada"]` rendered by the checkpoint's chat
    template (system turn, user turn, an assistant turn holding the image, the template's generation prompt), then
    split and tokenized as llava/mm_utils.py `tokenizer_image_token` does: each piece between `<image>`s tokenized on
    its own, and when the first piece starts with BOS every later piece loses its first token (for the LLaDA
    tokenizer: the space or newline right after `<image>`, which the model never saw in training). Without a chat
    template the user text alone, with the canvas after it."""

    tokenizer: Any
    system: str = SYSTEM_PROMPT

    def _piece(self, text: str) -> list[int | str]:
        out: list[int | str] = []
        for i, part in enumerate(text.split(_SOURCE)):
            if i:
                out.append(_SOURCE)
            for j, sub in enumerate(part.split(_CANVAS)):
                if j:
                    out.append(_CANVAS)
                out += _ids(self.tokenizer, sub)
        return out

    def render(self, user: str) -> RenderedPrompt:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            turns = [{"role": "system", "content": self.system}, {"role": "user", "content": user},
                     {"role": "assistant", "content": _CANVAS}]
            text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        else:
            text = user + _CANVAS
        added = list(tok("").input_ids)  # what the tokenizer puts around every piece (BOS for some)
        pieces = [added + self._piece(chunk) for chunk in text.split(IMAGE_PLACEHOLDER)]
        drop = dropped_after_image(pieces[0], tok)
        items: list[int | str] = pieces[0][:drop]
        for i, piece in enumerate(pieces):
            if i:
                items.append(IMAGE_PLACEHOLDER)
            if drop and i and piece and isinstance(piece[0], str):
                raise ValueError("the publishers' tokenization would drop a placeholder after <image>")
            items += piece[drop:]
        canvas = items.index(_CANVAS)
        return RenderedPrompt(items[:canvas], [t for t in items[canvas + 1:] if isinstance(t, int)])


@dataclass
class LaViDaOLayout:
    """A `llava_llada` checkpoint's image requests as engine requests, as the publishers' predict_t2i_edit.py lays
    them out (PublishersChat): [system turn, user turn, assistant header] the canvas (one packed id per 2x2 code
    patch) then the suffix (`<|eot_id|>` and the template's generation prompt, prefilled at its true positions).
    Text-to-image: the caption template + micro-conditioning. Edits: the user turn is `<image> ` + the source's
    `<|reserved_token_6|>` placeholders (its SigLIP rows when the checkpoint has a vision tower, then its VQ codes,
    prompt rows of the stream the checkpoint's enc_use_image_branch names) + "\\n " + the instruction.
    The codec is the checkpoint's vqvae/ at the request's size: an H x W image is (H/f) x (W/f) codes and
    (H/2f) x (W/2f) positions (f = the VQ downsampling).
    """

    folder: Path
    config: LaViDaOConfig
    codec: VQCodec
    chat: PublishersChat
    suffix: tuple[int, ...]
    image_registers: int
    image_placeholder: tuple[int, ...] = ()  # the ids of `<image>` (vLLM's processor expands them into SigLIP rows)
    closing_id: int | None = None  # CLOSING_TOKEN's id, None when the tokenizer has none
    defaults: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULTS))
    edit_defaults: Mapping[str, Any] = field(default_factory=lambda: dict(EDIT_DEFAULTS))
    _codecs: dict[tuple[int, int], VQCodec] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path, tokenizer: Any) -> LaViDaOLayout:
        folder = Path(folder)
        config = load_config(folder)
        codec = VQCodec(folder, subfolder=VQ_SUBFOLDER, resolution=RESOLUTION, fit="pad")
        chat = PublishersChat(tokenizer)
        suffix = tuple(chat.render("").after)
        registers = config.registers("image") if config.register_code is not None else 0
        return cls(folder, config, codec, chat, suffix, registers, tuple(_ids(tokenizer, IMAGE_PLACEHOLDER)),
                   tokenizer.get_vocab().get(CLOSING_TOKEN))

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
        micro = MICRO_COND.format(w=size[0], h=size[1], score=self.defaults["score"])
        rendered = self.chat.render(T2I_TEMPLATE.replace("<prompt>", f"{caption} {micro}"))
        return [int(t) for t in rendered.before]

    def edit_prompt(self, instruction: str, source: Tensor, image: Image.Image | None = None) -> EditPrompt:
        """The edit's prompt: the source's VQ placeholders (`source`: its code patches) and the instruction, after
        the source's SigLIP copy (`image`, the picture as uploaded) on checkpoints with a vision tower. Without a
        tower (or an image) the user turn starts at the VQ placeholders."""
        codes = source.reshape(-1).tolist()
        understanding = self.config.understanding
        siglip = understanding is not None and image is not None
        user = f"{IMAGE_PLACEHOLDER} {_SOURCE}\n {instruction} " if siglip else f"{_SOURCE}\n {instruction} "
        items = self.chat.render(user).before
        n = source.shape[0]
        rows = num_image_rows(understanding, image.size) if siglip else 0
        prompt: list[int] = []
        image_start = start = 0
        for t in items:
            if t == IMAGE_PLACEHOLDER:
                image_start = len(prompt)
                prompt += self.image_placeholder
            elif t == _SOURCE:
                start = len(prompt) + (rows - len(self.image_placeholder) if siglip else 0)  # in the expanded prompt
                prompt += [self.config.edit_image_token_id] * n
            else:
                prompt.append(int(t))
        if not siglip:
            return EditPrompt(prompt, (start, start + n), codes)
        return EditPrompt(prompt, (start, start + n), codes, image.convert("RGB"), image_start, rows,
                          self.image_placeholder)

    def uncond_ids(self, prompt: list[int] | EditPrompt) -> list[int] | None:
        """The uncond guidance branch's prompt, as predict_t2i_edit masks it (`is_prompt`): every row through the
        user turn's closing `<|eot_id|>` (system turn, user turn, an edit's SigLIP and VQ rows) is the mask token,
        the assistant header after it is kept. None when the tokenizer has no closing token: the scheduler's default,
        the whole prompt masked."""
        ids = prompt.prompt_ids if isinstance(prompt, EditPrompt) else list(prompt)
        if self.closing_id not in ids:
            return None
        cut = len(ids) - ids[::-1].index(self.closing_id)
        grown = prompt.num_prompt_tokens - len(ids) if isinstance(prompt, EditPrompt) else 0  # SigLIP rows, before cut
        return [self.config.mask_token_id] * (cut + grown) + ids[cut:]

    def request_args(self, size: tuple[int, int], *, steps: int | None = None, guidance_scale: float | None = None,
                     image_guidance_scale: float | None = None, source_span: tuple[int, int] | None = None,
                     source_codes: list[int] | None = None, init_canvas: list[int] | None = None,
                     uncond_prompt_ids: list[int] | None = None, **knobs: Any) -> dict[str, Any]:
        """`SamplingParams.extra_args` of a LaViDa-O image request (None: the publishers' defaults, EDIT_DEFAULTS for
        an edit). `uncond_prompt_ids`: the uncond branch's prompt (`uncond_ids`). A dense request (sparse false, or
        the checkpoint's default when it was not trained step-causal) on a square power-of-two grid runs the
        publishers' per-code sampler (`per_code`) unless it names another order, schedule or `per_code: false`."""
        defaults = self.defaults if source_span is None else self.edit_defaults
        rows, cols = self.positions(size)
        to_generate = rows * cols if init_canvas is None else sum(t < 0 for t in init_canvas)
        square = rows == cols and rows & (rows - 1) == 0
        args = plan_args(defaults, (rows, cols), steps=steps, guidance_scale=guidance_scale, to_generate=to_generate,
                         order=None if square else "random")
        args.update(shift=defaults["shift"], num_registers=self.image_registers)
        if self.suffix:
            args["suffix_ids"] = list(self.suffix)
        if source_span is not None:
            args["source_codes"] = list(source_codes or [])
        sparse = self.config.block_causal if knobs.get("sparse") is None else knobs["sparse"]  # the engine's default
        theirs = knobs.get("order") in (None, "stratified") and knobs.get("schedule") in (None, "shift")
        if knobs.get("per_code") is None and not sparse and theirs and args["order"] == "stratified" \
                and self.config.codes_per_position == 4:
            args["per_code"] = True  # dense: the publishers' own sampler, code by code
        return add_request_inputs(args, defaults, init_canvas=init_canvas, source_span=source_span,
                                  image_guidance_scale=image_guidance_scale, uncond_prompt_ids=uncond_prompt_ids,
                                  **knobs)


def dropped_after_image(first_piece: Sequence[object], tokenizer: Any) -> int:
    """How many tokens the publishers' `tokenizer_image_token` (llava/mm_utils.py ~447-466) cuts from the front of
    every piece after an `<image>`: 1 when the first piece, as their `tokenizer(chunk)` gives it, starts with BOS
    (meant to drop the BOS their call adds to each piece; the LLaDA tokenizer adds none, so it cuts the piece's first
    real token), else 0."""
    return 1 if first_piece and first_piece[0] == getattr(tokenizer, "bos_token_id", None) else 0


def chat_image_ids(tokenizer: Any, text: str, placeholder: Sequence[int],
                   add_special_tokens: bool = False) -> list[int]:
    """A rendered chat holding `<image>`s tokenized as the publishers' `tokenizer_image_token` does, `placeholder`
    (the ids of `<image>`, which vLLM's multimodal processor expands into the image's rows) at each image: the pieces
    between `<image>`s each tokenized on its own, and every piece after an image less its first
    `dropped_after_image` tokens (for LLaDA's tokenizer: the "\\n" vLLM writes after each image part). The first piece
    is encoded as vLLM encodes the prompt (`add_special_tokens`), the later ones by their call (`tokenizer(piece)`).
    Text without `<image>` is tokenized whole, as theirs."""
    chunks = text.split(IMAGE_PLACEHOLDER)
    ids = list(tokenizer(chunks[0], add_special_tokens=add_special_tokens).input_ids)
    drop = dropped_after_image(tokenizer(chunks[0]).input_ids, tokenizer)
    for chunk in chunks[1:]:
        ids += [*placeholder, *tokenizer(chunk).input_ids[drop:]]
    return ids


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


__all__ = ["LaViDaOLayout", "EditPrompt", "PublishersChat", "RenderedPrompt", "T2I_TEMPLATE", "MICRO_COND",
           "SYSTEM_PROMPT", "DEFAULTS", "EDIT_DEFAULTS", "chat_image_ids", "dropped_after_image"]
