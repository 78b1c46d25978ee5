"""Streamed images: partial images from a canvas partly decoded, and OpenAI's image stream events (SSE)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi.responses import StreamingResponse
from PIL import Image

from sparse_lavida_vllm.entrypoints.image_io import png_b64
from sparse_lavida_vllm.model_executor.patch_ids import patches_to_codes
from sparse_lavida_vllm.multimodal.layout import ImageLayout

PREVIEW_GREY = 128  # what a position not decoded yet shows in a partial image
# the values the OpenAI stream events allow for the request fields they echo (anything else is echoed as "auto")
EVENT_QUALITY = ("low", "medium", "high", "xhigh", "max", "auto")
EVENT_BACKGROUND = ("transparent", "opaque", "auto")


def preview_steps(steps: int, partial_images: int) -> list[int]:
    """The steps after which a streamed image's partial images are taken: evenly spaced, all before the last step
    (its canvas is the image). An image of few steps gets fewer (OpenAI's stream may send fewer than asked too)."""
    taken = {i * steps // (partial_images + 1) - 1 for i in range(1, partial_images + 1)}
    return sorted(s for s in taken if 0 <= s < steps - 1)


def render_preview(layout: Any, canvas: list[int], size: tuple[int, int]) -> Image.Image:
    """A partial image from a canvas partly decoded. A code not decoded yet is one outside the codebook (the mask;
    image sampling draws codebook ids only): the codec decodes the canvas with the codebook's first code there (a
    decoder needs some code), then those codes' cells are painted grey. `layout`: an `ImageLayout` (codec token ids)
    or a `LaViDaOLayout` (packed 2x2 positions, each code on its own: a position may be partly decoded)."""
    tokens = torch.tensor(canvas, dtype=torch.long)
    if isinstance(layout, ImageLayout):
        lo, hi = layout.token_range
        undecoded = (tokens < lo) | (tokens >= hi)
        image = layout.codec.decode(torch.where(undecoded, lo, tokens))
        cells = undecoded.view(layout.codec.grid)
    else:
        ids, grid = layout.patch_ids, layout.codec_at(size).grid
        patches = ids.unpack(tokens)
        undecoded = patches >= ids.codebook
        image = layout.decode(ids.pack(torch.where(undecoded, 0, patches)), size)
        cells = (patches_to_codes(undecoded, *grid) if layout.config.downsample else undecoded).reshape(grid)
    pixels = np.array(image)
    (rows, cols), (height, width) = cells.shape, pixels.shape[:2]
    pixels[cells.numpy().repeat(height // rows, 0).repeat(width // cols, 1)] = PREVIEW_GREY
    return Image.fromarray(pixels)


def sse(event: dict[str, Any]) -> str:
    """One Server-Sent Event as OpenAI's streams write it: the event's type, then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


@dataclass(frozen=True)
class StreamSpec:
    """A streamed request's events: their type prefix (image_generation / image_edit) and the fields they echo."""

    kind: str
    size: tuple[int, int]
    quality: str
    background: str

    @classmethod
    def echoing(cls, kind: str, size: tuple[int, int], quality: str | None, background: str | None) -> StreamSpec:
        """The events of a request with these fields, which the images are not drawn by: echoed as the OpenAI stream
        events allow them (anything else as "auto")."""
        return cls(kind, size, quality if quality in EVENT_QUALITY else "auto",
                   background if background in EVENT_BACKGROUND else "auto")

    def event(self, suffix: str, image: Image.Image, **fields: Any) -> dict[str, Any]:
        return {"type": f"{self.kind}.{suffix}", "b64_json": png_b64(image, self.size),
                "size": f"{self.size[0]}x{self.size[1]}", "quality": self.quality, "background": self.background,
                "output_format": "png", "created_at": int(time.time()), **fields}

    def partial(self, image: Image.Image, index: int) -> dict[str, Any]:
        return self.event("partial_image", image, partial_image_index=index)

    def completed(self, image: Image.Image, input_tokens: int, image_tokens: int, output_tokens: int,
                  token_ids: list[int] | None = None) -> dict[str, Any]:
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                 "total_tokens": input_tokens + output_tokens,
                 "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": input_tokens - image_tokens}}
        extra = {} if token_ids is None else {"token_ids": token_ids}  # return_token_ids, as the JSON response has
        return self.event("completed", image, usage=usage, **extra)


def error_event(message: str) -> dict[str, Any]:
    """A failure after the stream started (the status is already 200): the `openai` client raises it as APIError."""
    return {"type": "error", "error": {"message": message, "type": "InternalServerError", "param": None,
                                       "code": 500}}


def event_stream(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield sse(event)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
