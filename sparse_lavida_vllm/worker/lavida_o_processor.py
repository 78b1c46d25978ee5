"""vLLM's multimodal processor for LaViDa-O image understanding: anyres tiles in, `num_image_rows` placeholder rows."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from sparse_lavida_vllm.model_executor.lavida_o_config import (
    ARCHITECTURE,
    LaViDaOConfig,
    UnderstandingConfig,
    load_config,
)
from sparse_lavida_vllm.model_executor.lavida_o_text import serves_lavida_o_images
from sparse_lavida_vllm.model_executor.lavida_o_vision import IMAGE_PLACEHOLDER, num_image_rows, preprocess_image
from sparse_lavida_vllm.multimodal.lavida_o_layout import chat_image_ids


@functools.cache
def _config(model: str) -> LaViDaOConfig:
    return load_config(Path(model))


def understanding_refusal(model: str) -> str | None:
    """None when this server answers image inputs for a `llava_llada` checkpoint, else why not (an HTTP 400).
    The tensor-parallel size does not matter: the whole model shards, its tower replicated on every rank."""
    why = serves_lavida_o_images(model)
    if why is not None:
        return f"image inputs need the whole model: {why}"
    if _config(model).understanding is None:
        return ("this checkpoint's config.json declares no vision tower (mm_vision_tower), so it takes no image "
                "inputs")
    return None


def row_token_id(config: LaViDaOConfig) -> int:
    """The id an image's prompt rows carry (the publishers use -200, which no tokenizer or vLLM accepts). Any id
    works for the model, whose runner feeds the image features at those rows; the pad token keeps the prompt text
    readable and survives vLLM's decode / re-encode fallback as one special token."""
    return config.pad_token_id


def publishers_prompt_ids(tokenizer: Any, prompt: Mapping[str, object], add_special_tokens: bool) -> list[int] | None:
    """A LaViDa-O text prompt with images (a rendered chat, or `{"prompt": ..., "multi_modal_data": ...}`) as the
    publishers tokenize it (lavida_o_layout.chat_image_ids: piece by piece around each `<image>`, the token after
    each image dropped), with the ids of `<image>` where the processor expands each image; None for any other prompt,
    which vLLM tokenizes whole. A prompt given as token ids never comes here (an edit's already are theirs)."""
    text = prompt.get("prompt")
    if not prompt.get("multi_modal_data") or not isinstance(text, str) or IMAGE_PLACEHOLDER not in text:
        return None
    placeholder = tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
    return chat_image_ids(tokenizer, text, placeholder, add_special_tokens)


class LaViDaOProcessingInfo(BaseProcessingInfo):
    """The understanding config of the served checkpoint; no images at all when the server cannot answer them."""

    @property
    def lavida(self) -> LaViDaOConfig:
        return _config(self.ctx.model_config.model)

    @property
    def understanding(self) -> UnderstandingConfig | None:
        model_config = self.ctx.model_config
        if model_config.architecture != ARCHITECTURE:
            return None
        return self.lavida.understanding if serves_lavida_o_images(model_config.model) is None else None

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # {} makes vLLM run the model text-only (no encoder budget, no media parsing)
        return {"image": None} if self.understanding is not None else {}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        config = self.understanding
        if config is None:
            return {}
        # the largest grid of image_grid_pinpoints, unpadding nothing: an upper bound on num_image_rows
        side = config.pooled_side
        grids = [(w // config.tile_size, h // config.tile_size) for w, h in config.image_grid_pinpoints]
        return {"image": side * side + max(rows * side * (cols * side + 1) for cols, rows in grids)}

    def num_rows(self, width: int, height: int) -> int:
        config = self.understanding
        if config is None:
            raise ValueError(f"{ARCHITECTURE}: this checkpoint takes no image inputs")
        return num_image_rows(config, (width, height))


class LaViDaODummyInputsBuilder(BaseDummyInputsBuilder[LaViDaOProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None) -> dict:
        config = self.info.understanding
        num_images = mm_counts.get("image", 0)
        if config is None or not num_images:
            return {}
        width, height = max(config.image_grid_pinpoints, key=lambda p: p[0] * p[1])
        return {"image": self._get_dummy_images(width=width, height=height, num_images=num_images)}


class LaViDaOMultiModalProcessor(BaseMultiModalProcessor[LaViDaOProcessingInfo]):
    """Images -> the publishers' anyres tiles (lavida_o_vision.preprocess_image, no HF processor: LaViDa-O ships
    none); each `<image>` in the prompt -> `num_image_rows` rows of `row_token_id`, all of them feature rows."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        config = self.info.understanding
        images = list(hf_data.get("images") or ())
        if config is None or not images:
            return BatchFeature()
        tiles = [preprocess_image(config, image) for image in images]
        return BatchFeature({
            "pixel_values": torch.cat([t.pixel_values for t in tiles]),
            "num_tiles": torch.tensor([t.pixel_values.shape[0] for t in tiles]),
            "image_sizes": torch.tensor([t.image_size for t in tiles]),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        num_tiles = hf_inputs.get("num_tiles", torch.empty(0, dtype=torch.long))
        return {"pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_tiles),
                "num_tiles": MultiModalFieldConfig.batched("image"),
                "image_sizes": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        row_id = row_token_id(self.info.lavida)

        def rows(item_idx: int) -> PromptUpdateDetails:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return PromptUpdateDetails.from_seq([row_id] * self.info.num_rows(size.width, size.height))

        # the placeholder's token ids (vLLM matches ids first, then the decoded text when BPE merged it differently)
        target = self.info.get_tokenizer().encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
        return [PromptReplacement(modality="image", target=target, replacement=rows)]


__all__ = ["IMAGE_PLACEHOLDER", "LaViDaOProcessingInfo", "LaViDaODummyInputsBuilder", "LaViDaOMultiModalProcessor",
           "understanding_refusal", "row_token_id", "publishers_prompt_ids"]
