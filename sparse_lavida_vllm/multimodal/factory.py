"""`load_image_codec`: build the `ImageCodec` a checkpoint's config names (`{"type": "pixel" | "vq", ...}`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparse_lavida_vllm.multimodal.codec import ImageCodec, PixelCodec

_KEYS = {
    "pixel": {"height", "width", "levels", "token_offset"},
    "vq": {"subfolder", "resolution", "token_offset", "fit"},
}


def load_image_codec(spec: Mapping[str, Any], checkpoint_dir: Path | None) -> ImageCodec:
    """The codec `spec` describes; VQ weights come from `checkpoint_dir / spec["subfolder"]` (local files only)."""
    kind = spec.get("type")
    if kind not in _KEYS:
        raise ValueError(f"codec.type must be one of {sorted(_KEYS)}, got {kind!r}")
    options = {key: value for key, value in spec.items() if key != "type"}
    unknown = sorted(set(options) - _KEYS[kind])
    if unknown:
        # A misspelt key would otherwise silently fall back to a default (e.g. the wrong resolution).
        raise ValueError(f"codec: unknown keys for type {kind!r}: {unknown} (allowed: {sorted(_KEYS[kind])})")
    if kind == "pixel":
        return PixelCodec(**options)
    if checkpoint_dir is None:
        raise ValueError("codec.type 'vq' needs a checkpoint directory holding the VQ model's subfolder")
    resolution = options.pop("resolution", None)
    if isinstance(resolution, list):  # JSON has no tuples: [height, width]
        resolution = tuple(resolution)
    # Imported here so text-only and pixel-codec serving never pay for (or need) diffusers.
    from sparse_lavida_vllm.multimodal.vq import VQCodec

    return VQCodec(Path(checkpoint_dir), resolution=resolution, **options)
