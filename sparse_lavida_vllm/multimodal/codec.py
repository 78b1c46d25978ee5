"""Image codecs: the abstract `ImageCodec` and the `PixelCodec` (grey levels as tokens) of the demo model."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class ImageCodec(ABC):
    """Turns an image into a grid of token ids (row-major) and back."""

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(height, width) of the token grid."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct image codes."""

    @abstractmethod
    def encode(self, image: Image.Image | np.ndarray) -> Tensor:
        """Token ids (h * w,) in the model's vocabulary."""

    @abstractmethod
    def decode(self, token_ids: Tensor) -> Image.Image:
        """A PIL image from token ids (h * w,)."""

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels of the images it encodes and decodes; one pixel per token by default."""
        h, w = self.grid
        return w, h


class PixelCodec(ImageCodec):
    """One token per pixel: the grey level quantized to `levels` values, ids `token_offset + level`.

    The demo model's "codebook": 8x8 images, 16 grey levels (black = 0 .. white = levels - 1).
    """

    def __init__(self, height: int = 16, width: int = 16, levels: int = 16, token_offset: int = 0) -> None:
        for name, value in (("height", height), ("width", width), ("levels", levels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if levels > 256:
            raise ValueError(f"levels must be <= 256, got {levels}")
        if token_offset < 0:
            raise ValueError(f"token_offset must be >= 0, got {token_offset}")
        self.height, self.width, self.levels, self.token_offset = height, width, levels, token_offset

    @property
    def grid(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def vocab_size(self) -> int:
        return self.levels

    def quantize(self, pixels: np.ndarray) -> np.ndarray:
        """Floats in [0, 1] -> integer levels 0..levels-1."""
        return np.clip(np.rint(pixels * (self.levels - 1)), 0, self.levels - 1).astype(np.int64)

    def encode(self, image: Image.Image | np.ndarray) -> Tensor:
        if isinstance(image, Image.Image):
            image = image.convert("L")
            if image.size != (self.width, self.height):
                # BOX averages each token's pixels: an image upscaled by an integer factor (what the images
                # routes return) maps back to exactly its own tokens
                image = image.resize((self.width, self.height), Image.BOX)
            pixels = np.asarray(image, dtype=np.float64) / 255.0
        else:
            pixels = np.asarray(image, dtype=np.float64)
            if pixels.shape != (self.height, self.width):
                raise ValueError(f"image array must have shape {(self.height, self.width)}, got {pixels.shape}")
            if pixels.min() < 0 or pixels.max() > 1:
                raise ValueError("image array values must lie in [0, 1]")
        return torch.from_numpy(self.quantize(pixels).reshape(-1)) + self.token_offset

    def levels_of(self, token_ids: Tensor) -> Tensor:
        """Grey levels (h * w,) of image token ids; ids outside the codebook raise."""
        levels = token_ids.long().cpu() - self.token_offset
        if levels.numel() != self.num_tokens:
            raise ValueError(f"token_ids must hold {self.num_tokens} tokens, got {levels.numel()}")
        if bool((levels < 0).any() or (levels >= self.levels).any()):
            raise ValueError(f"token_ids must lie in [{self.token_offset}, {self.token_offset + self.levels})")
        return levels

    def decode(self, token_ids: Tensor) -> Image.Image:
        levels = self.levels_of(token_ids).numpy().reshape(self.height, self.width)
        pixels = np.rint(levels * (255.0 / (self.levels - 1))).astype(np.uint8)
        return Image.fromarray(pixels, mode="L")
