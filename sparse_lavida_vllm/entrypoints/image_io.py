"""The images API's files: a size asked for, uploaded images and masks read (BadField naming the field), PNGs out."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sparse_lavida_vllm.entrypoints.image_protocol import BadField
from sparse_lavida_vllm.scheduler.image_params import GENERATE

MAX_SIDE = 2048  # pixels per side of a returned (upscaled) image
MAX_UPLOAD = 20 * 1024 * 1024


def parse_size(value: Any, native: tuple[int, int]) -> tuple[int, int]:
    """'WxH' (or 'auto' = the codec's size): the codec's size or an integer multiple of it (nearest upscaling)."""
    w0, h0 = native
    if value in (None, "auto"):
        return native
    allowed = ", ".join(f"{w0 * k}x{h0 * k}" for k in (1, 2, 4, 8, 16, 32, 64) if max(w0, h0) * k <= MAX_SIDE)
    if not isinstance(value, str) or value.count("x") != 1:
        raise BadField("size", f"size must be 'WIDTHxHEIGHT' or 'auto', got {value!r} (this model: {allowed})")
    w, h = value.split("x")
    if not (w.isdigit() and h.isdigit()):
        raise BadField("size", f"size must be 'WIDTHxHEIGHT' or 'auto', got {value!r} (this model: {allowed})")
    w, h = int(w), int(h)
    if w % w0 or h % h0 or w // w0 != h // h0 or w == 0 or max(w, h) > MAX_SIDE:
        raise BadField("size", f"size {value} is not supported: this model draws {w0}x{h0} images; "
                               f"sizes: {allowed}")
    return w, h


def read_image(data: bytes, field: str) -> Image.Image:
    if not data:
        raise BadField(field, f"{field} is empty")
    if len(data) > MAX_UPLOAD:
        raise BadField(field, f"{field} is larger than {MAX_UPLOAD // (1024 * 1024)} MB")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadField(field, f"{field} is not a readable image (PNG, JPEG, WebP): {e}") from None
    return image


def mask_to_canvas(mask: Image.Image, source: Image.Image, source_ids: list[int], grid: tuple[int, int]) -> list[int]:
    """OpenAI mask semantics: transparent pixels mark what to repaint. A token is repainted when its cell of
    the mask is mostly transparent (mean alpha < 128); the others keep the source's token."""
    if mask.size != source.size:
        raise BadField("mask", f"mask must have the image's size {source.size[0]}x{source.size[1]}, "
                               f"got {mask.size[0]}x{mask.size[1]}")
    if "A" not in mask.getbands():
        raise BadField("mask", "mask must have an alpha channel (transparent pixels mark the region to edit)")
    h, w = grid
    alpha = np.asarray(mask.getchannel("A").resize((w, h), Image.BOX), dtype=np.float64).reshape(-1)
    return [GENERATE if a < 128 else t for a, t in zip(alpha, source_ids)]


def png_b64(image: Image.Image, size: tuple[int, int]) -> str:
    if image.size != size:
        image = image.resize(size, Image.NEAREST)  # integer upscaling: each token's pixels become blocks
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
