"""What a served checkpoint accepts in a request beyond its knobs, one class per model family (`request_rules`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from sparse_lavida_vllm.model_executor.lavida_o_config import ARCHITECTURE as LAVIDA_O
from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig, load_config
from sparse_lavida_vllm.model_executor.lavida_o_text import serves_lavida_o_images
from sparse_lavida_vllm.model_executor.patch_ids import PatchIds

Refusal = tuple[str, str]  # (field, message): the API server's 400 naming the field, or the scheduler's failed request

PER_CODE_ONLY = ("per_code (LaViDa-O's own per-code sampler) applies to LaViDa-O checkpoints whose positions are 2x2 "
                 "VQ codes")
EDITS_UNPUBLISHED = ("gen_enc_add_pos_emb=true (Sparse-LaViDa) changes how an edit's source image is embedded and "
                     "that code is not published: edits are not supported on this checkpoint")
NO_IMAGE_INPUTS = ("this model takes no image inputs (LaViDa-O understanding needs the whole model with its vision "
                   "tower and vqvae/)")


class RequestRules:
    """A checkpoint whose canvas positions are single token ids (a config.json `image_generation` codec, the demo) or
    that serves text only: no image inputs, no per-code sampler, no source codes.

    The scheduler builds its checkpoint's rules once (`request_rules`) and asks `refusal` of every request; the API
    server asks `per_code_refusal` before queueing. `params` is a request's frozen DiffusionParams or ImageParams
    (scheduler/), read by attribute.
    """

    patch_ids: PatchIds | None = None  # how a canvas position is one id (None: it is a token id)
    image_registers: tuple[int, bool] | None = None  # (count, has a register patch) of image requests; None: text's

    def per_code_refusal(self) -> str | None:
        """Why this checkpoint has no per-code sampler (`ImageParams.per_code`), None when it has one."""
        return PER_CODE_ONLY

    def refusal(self, params: Any, image_spans: list[tuple[int, int]]) -> Refusal | None:
        """Why this checkpoint cannot run the request, None when it can. `image_spans`: (offset, length) in the prompt
        of each image input vLLM's multimodal processor expanded (chat images, an edit's understanding copy)."""
        image = params.kind == "image"
        if image_spans and (refused := self._image_inputs_refusal(params, image_spans)) is not None:
            return refused
        if image and params.per_code and (why := self.per_code_refusal()) is not None:
            return "per_code", why
        return self._image_refusal(params) if image else None

    def _image_inputs_refusal(self, params: Any, image_spans: list[tuple[int, int]]) -> Refusal | None:
        return "messages", NO_IMAGE_INPUTS

    def _image_refusal(self, params: Any) -> Refusal | None:
        if params.source_codes is not None:  # would be silently ignored
            return "source_codes", ("source_codes applies to LaViDa-O checkpoints only (this checkpoint's source "
                                    "images are token ids in the prompt)")
        return None


@dataclass(frozen=True)
class LaViDaORules(RequestRules):
    """A LaViDa-O checkpoint served whole: canvas positions are packed 2x2 code patches (`PatchIds`), image requests
    use the image registers, an edit's source comes as `source_codes` (and, with a vision tower, as its understanding
    copy: the tower also takes chat images)."""

    config: LaViDaOConfig

    @cached_property
    def patch_ids(self) -> PatchIds:
        return PatchIds.of(self.config)

    @property
    def image_registers(self) -> tuple[int, bool]:
        # the checkpoint's image count, only with a declared register_code (never invented)
        ids = self.patch_ids
        return self.config.registers("image") if ids.register_code is not None else 0, ids.register_code is not None

    def per_code_refusal(self) -> str | None:
        return None if self.config.codes_per_position == 4 else PER_CODE_ONLY

    def _image_inputs_refusal(self, params: Any, image_spans: list[tuple[int, int]]) -> Refusal | None:
        if self.config.understanding is None:  # chat images need the vision tower (else refused, never dropped)
            return "messages", NO_IMAGE_INPUTS
        if params.kind != "image":
            return None
        if params.source_codes is None:
            # an edit's source also comes as its SigLIP copy (LaViDaOLayout.edit_prompt); nothing else takes images
            return "messages", ("image inputs apply to text answers (chat) and to edits (the source's understanding "
                                "copy), not to text-to-image requests")
        start, end = params.source_span
        for offset, length in image_spans:  # the SigLIP rows and the VQ rows are two copies, side by side
            if offset < end and start < offset + length:
                return "source_span", "source_span overlaps the source image's understanding rows"
        return None

    def _image_refusal(self, params: Any) -> Refusal | None:
        """What only the model knows about an image request on LaViDa-O: the canvas is the position grid, a given
        (inpainting) position is a packed patch, an edit's source codes are whole patches of the codebook."""
        ids = self.patch_ids
        if params.sampling.token_range is not None:
            return "token_range", "token_range does not apply to LaViDa-O images (the image head predicts codebook ids)"
        given = [t for t in params.init_canvas or () if t >= 0]  # -1 (GENERATE) marks a position to generate
        if any(not ids.gen_base <= t < ids.source_base for t in given):
            return "init_canvas", ("init_canvas entries must be packed image positions (lavida_o.PatchIds.pack) or -1 "
                                   "(generate)")
        if params.source_codes is None:
            return None
        start, end = params.source_span
        if len(params.source_codes) != (end - start) * ids.codes_per_position:
            return "source_codes", (f"source_codes must hold {ids.codes_per_position} codes per source position "
                                    f"({(end - start) * ids.codes_per_position}), got {len(params.source_codes)}")
        if any(c >= ids.codebook for c in params.source_codes):
            return "source_codes", f"source_codes must be codebook ids (< {ids.codebook})"
        if self.config.gen_enc_add_pos_emb:  # lavida_o image_context's rule
            return "source_codes", EDITS_UNPUBLISHED
        return None


def request_rules(architecture: str | None, model: str | Path) -> RequestRules:
    """The rules of the checkpoint at `model` served as `architecture`: LaViDa-O's when it is served whole (text and
    images), else the token-canvas ones."""
    if architecture != LAVIDA_O or serves_lavida_o_images(model) is not None:
        return RequestRules()
    return LaViDaORules(load_config(model))
