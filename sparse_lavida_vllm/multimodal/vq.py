"""VQCodec: images <-> VQ code ids through a diffusers `VQModel` read from a checkpoint's `vqvae/` folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sparse_lavida_vllm.multimodal.codec import ImageCodec

if TYPE_CHECKING:
    from diffusers import VQModel

Fit = Literal["crop", "pad"]


def _load_vq_model(checkpoint_dir: Path, subfolder: str, dtype: torch.dtype) -> VQModel:
    folder = checkpoint_dir / subfolder
    if not (folder / "config.json").is_file():
        # Checked here so a wrong path never turns into a Hub download attempt or a vague diffusers error.
        raise ValueError(f"VQ codec: no VQModel at {folder} (expected {folder / 'config.json'} and its weights)")
    try:
        from diffusers import VQModel
    except ImportError as exc:  # diffusers comes with the `train` extra; serving text only does not need it
        raise ImportError("VQ codec needs diffusers: pip install diffusers (or the project's [train] extra)") from exc
    # low_cpu_mem_usage=False: the meta-device path needs accelerate, which we do not depend on.
    return VQModel.from_pretrained(
        checkpoint_dir, subfolder=subfolder, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
    )


class VQCodec(ImageCodec):
    """LaViDa-O's image tokenizer: Meissonic/aMUSEd-style VQ-GAN (16x downsampling, 8192 codes at full size).

    Pixels go in and come out in [0, 1] (LaViDa-O preprocesses with `VaeImageProcessor(do_normalize=False)`).
    Encode is `vqvae.quantize(vqvae.encode(x).latents)[2][2]` (nearest-code indices, row-major over the latent
    grid); decode is `vqvae.decode(idx, force_not_quantize=True, shape=(B, h, w, C)).sample.clip(0, 1)`, which
    looks the ids up in the codebook because the config sets `lookup_from_codebook`. Token ids are the code
    index plus `token_offset` (0 for LaViDa-O, whose gen head predicts in code space).

    `resolution` (pixels, int or (height, width)) defaults to the config's `sample_size`; pass it explicitly for
    Meissonic/aMUSEd VQs, whose configs say 32 although LaViDa-O runs them at 1024 (-> 64x64 codes).
    `fit` maps other input sizes onto it: "crop" (center crop) or "pad" (black bars, LaViDa-O's edit input).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        subfolder: str = "vqvae",
        resolution: int | tuple[int, int] | None = None,
        token_offset: int = 0,
        fit: Fit = "crop",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if token_offset < 0:
            raise ValueError(f"token_offset must be >= 0, got {token_offset}")
        if fit not in ("crop", "pad"):
            raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
        self.vqvae = _load_vq_model(Path(checkpoint_dir), subfolder, dtype).to(device).eval()
        config = self.vqvae.config
        if not config.lookup_from_codebook:
            # Without it VQModel.decode(force_not_quantize=True) feeds the raw ids to the decoder as latents.
            raise ValueError(f"VQ codec: {Path(checkpoint_dir) / subfolder} config must set lookup_from_codebook=true")
        if config.in_channels != 3 or config.out_channels != 3:
            raise ValueError(
                f"VQ codec: RGB model expected, config has in_channels={config.in_channels}, "
                f"out_channels={config.out_channels}"
            )
        # Every encoder block but the last halves the resolution (LaViDa-O computes the factor the same way).
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        if resolution is None:
            resolution = int(config.sample_size)
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        for name, value in (("height", height), ("width", width)):
            if value < self.downsample or value % self.downsample:
                raise ValueError(
                    f"resolution {name} must be a positive multiple of the VQ downsampling factor "
                    f"{self.downsample}, got {value}"
                )
        self.height, self.width = int(height), int(width)
        self.token_offset, self.fit = token_offset, fit
        self.device, self.dtype = torch.device(device), dtype

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.downsample, self.width // self.downsample

    @property
    def image_size(self) -> tuple[int, int]:
        # One token covers a downsample x downsample patch, not one pixel as the seam's default assumes.
        return self.width, self.height

    @property
    def vocab_size(self) -> int:
        return int(self.vqvae.config.num_vq_embeddings)

    @property
    def latent_channels(self) -> int:
        return int(self.vqvae.config.latent_channels)

    # ---- pixels ----

    def fit_image(self, image: Image.Image) -> Image.Image:
        """RGB image of exactly the codec resolution (center crop, or LaViDa-O's pad-with-black for edits)."""
        image = image.convert("RGB")
        w, h = image.size
        target_w, target_h = self.width, self.height
        if (w, h) == (target_w, target_h):
            return image
        if self.fit == "pad":
            # predict_t2i_edit.py: pad to the target aspect (black, centered) at source scale, then resize.
            canvas = (max(w, -(-h * target_w // target_h)), max(h, -(-w * target_h // target_w)))
            padded = ImageOps.pad(image, canvas, color=(0, 0, 0))
            return padded.resize((target_w, target_h), Image.Resampling.BICUBIC)
        # mm_utils.resize_and_center_crop: scale the limiting side to the target, LANCZOS, crop the middle.
        if w * target_h > h * target_w:
            new_w, new_h = max(target_w, int(w * target_h / h)), target_h
        else:
            new_w, new_h = target_w, max(target_h, int(h * target_w / w))
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        return image.crop((left, top, left + target_w, top + target_h))

    def to_pixels(self, image: Image.Image | np.ndarray) -> Tensor:
        """(3, H, W) float pixels in [0, 1] from a PIL image (any size) or an (H, W, 3) array at the codec size."""
        if isinstance(image, Image.Image):
            array = np.asarray(self.fit_image(image), dtype=np.float32) / 255.0
        else:
            array = np.asarray(image)
            if array.shape != (self.height, self.width, 3):
                raise ValueError(f"image array must have shape {(self.height, self.width, 3)}, got {array.shape}")
            if array.dtype == np.uint8:
                array = array.astype(np.float32) / 255.0
            elif array.min() < 0 or array.max() > 1:
                raise ValueError("float image array values must lie in [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)

    # ---- codes ----

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[Image.Image | np.ndarray]) -> Tensor:
        """Token ids (B, h * w) for B images, one encoder pass."""
        if not images:
            raise ValueError("encode_batch needs at least one image")
        x = torch.stack([self.to_pixels(image) for image in images]).to(self.device, self.dtype)
        latents = self.vqvae.encode(x).latents
        # VectorQuantizer.forward returns (z_q, loss, (perplexity, one_hots, indices)); indices are
        # (B * h * w, 1) in (batch, row, column) order since sane_index_shape is off.
        indices = self.vqvae.quantize(latents)[2][2]
        return indices.reshape(len(images), self.num_tokens).long().cpu() + self.token_offset

    def encode(self, image: Image.Image | np.ndarray) -> Tensor:
        return self.encode_batch([image])[0]

    def codes_of(self, token_ids: Tensor) -> Tensor:
        """VQ code indices (B, h * w) of token ids (h * w,) or (B, h * w); ids outside the codebook raise."""
        codes = token_ids.long().cpu() - self.token_offset
        if codes.dim() == 1:
            codes = codes.unsqueeze(0)
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(
                f"token_ids must hold {self.num_tokens} tokens per image ({self.grid[0]}x{self.grid[1]} grid), "
                f"got shape {tuple(token_ids.shape)}"
            )
        if bool((codes < 0).any() or (codes >= self.vocab_size).any()):
            raise ValueError(
                f"token_ids must lie in [{self.token_offset}, {self.token_offset + self.vocab_size}), "
                f"got min {int(codes.min()) + self.token_offset}, max {int(codes.max()) + self.token_offset}"
            )
        return codes

    @torch.inference_mode()
    def decode_pixels(self, token_ids: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [0, 1] of token ids (h * w,) or (B, h * w), through LaViDa-O's decode call."""
        codes = self.codes_of(token_ids).to(self.device)
        h, w = self.grid
        shape = (codes.shape[0], h, w, self.latent_channels)
        return self.vqvae.decode(codes, force_not_quantize=True, shape=shape).sample.clip(0, 1)

    def decode_batch(self, token_ids: Tensor) -> list[Image.Image]:
        """RGB images from token ids (B, h * w), one decoder pass."""
        pixels = self.decode_pixels(token_ids).permute(0, 2, 3, 1).float().cpu().numpy()
        # Truncating (not rounding) to uint8 as LaViDa-O's decode_image_gen does, so images match it byte for byte.
        return [Image.fromarray((image * 255).astype(np.uint8)) for image in pixels]

    def decode(self, token_ids: Tensor) -> Image.Image:
        if token_ids.dim() != 1:
            raise ValueError(f"decode takes one image's token ids (h * w,), got shape {tuple(token_ids.shape)}")
        return self.decode_batch(token_ids)[0]
