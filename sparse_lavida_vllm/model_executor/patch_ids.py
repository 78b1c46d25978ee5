"""LaViDa-O image positions: a 2x2 patch of VQ codes per transformer position, packed into one id above the vocab."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_lavida_vllm.model_executor.lavida_o_config import EXTRA_GEN_EMBEDDINGS, LaViDaOConfig


def codes_to_patches(codes: Tensor, height: int, width: int) -> Tensor:
    """(H*W,) raster codes -> (H/2 * W/2, 4) patches in raster position order (row-major inside each patch)."""
    if height % 2 or width % 2:
        raise ValueError(f"the code grid must have even sides for 2x2 positions, got {height}x{width}")
    grid = codes.reshape(height // 2, 2, width // 2, 2)
    return grid.permute(0, 2, 1, 3).reshape(-1, 4)


def patches_to_codes(patches: Tensor, height: int, width: int) -> Tensor:
    """Inverse of codes_to_patches: (H/2 * W/2, 4, ...) -> (H*W, ...)."""
    rest = patches.shape[2:]
    grid = patches.reshape(height // 2, width // 2, 2, 2, *rest)
    return grid.permute(0, 2, 1, 3, *range(4, 4 + len(rest))).reshape(height * width, *rest)


@dataclass(frozen=True)
class PatchIds:
    """One int64 id per image position, above the text vocabulary: how the served engine carries image rows.

    The scheduler's canvas, KV bookkeeping and the runner's rows stay one id per position; an image position's
    codes (each a row of gen_embedding, mask and register codes included) are packed base-`table` into one id:
    `base + ((c0 * T + c1) * T + c2) * T + c3` (row-major inside the 2x2 patch, as codes_to_patches). Two ranges:
    `gen_base` ids are image-stream rows (generated positions, image registers, and an edit's source image when
    the checkpoint sets enc_use_image_branch), `source_base` ids are text-stream rows carrying the zero-padded
    patch embedding (an edit's source image otherwise: context_inputs' two paths). Published sizes: 8448^4 ~ 5e15
    ids per range, well inside int64.
    """

    vocab_size: int
    table: int  # gen_embedding rows (num_vq_embeddings + 256)
    codes_per_position: int
    mask_code: int
    register_code: int | None
    enc_use_image_branch: bool

    @classmethod
    def of(cls, config: LaViDaOConfig) -> PatchIds:
        return cls(config.vocab_size, config.num_vq_embeddings + EXTRA_GEN_EMBEDDINGS, config.codes_per_position,
                   config.mask_code, config.register_code, config.enc_use_image_branch)

    @property
    def span(self) -> int:
        return self.table ** self.codes_per_position

    @property
    def codebook(self) -> int:
        """VQ codes the image head predicts (num_vq_embeddings)."""
        return self.table - EXTRA_GEN_EMBEDDINGS

    @property
    def gen_base(self) -> int:
        return self.vocab_size

    @property
    def source_base(self) -> int:
        return self.vocab_size + self.span

    def pack(self, patches: Tensor, source: bool = False) -> Tensor:
        """(n, codes_per_position) codes -> (n,) ids; `source`: an edit's source image (its stream per config)."""
        if patches.dim() != 2 or patches.shape[1] != self.codes_per_position:
            raise ValueError(f"patches must have shape (n, {self.codes_per_position}), got {tuple(patches.shape)}")
        if patches.numel() and (int(patches.min()) < 0 or int(patches.max()) >= self.table):
            raise ValueError(f"codes must lie in [0, {self.table}) (gen_embedding rows)")
        ids = torch.zeros(patches.shape[0], dtype=torch.long, device=patches.device)
        for i in range(self.codes_per_position):
            ids = ids * self.table + patches[:, i].long()
        base = self.source_base if source and not self.enc_use_image_branch else self.gen_base
        return ids + base

    def unpack(self, ids: Tensor) -> Tensor:
        """(n,) image ids of either range -> (n, codes_per_position) codes."""
        rest = (ids - self.gen_base) % self.span
        codes = []
        for _ in range(self.codes_per_position):
            codes.append(rest % self.table)
            rest = rest // self.table
        return torch.stack(codes[::-1], dim=1)

    def kinds(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(image-stream rows, text-stream patch rows) as bool masks over ids."""
        return (ids >= self.gen_base) & (ids < self.source_base), ids >= self.source_base

    def fill(self, code: int) -> int:
        """The id of a position whose codes are all `code` (the mask patch, the register patch)."""
        return int(self.pack(torch.full((1, self.codes_per_position), code, dtype=torch.long))[0])

    @property
    def mask_id(self) -> int:
        return self.fill(self.mask_code)

    @property
    def register_id(self) -> int | None:
        return None if self.register_code is None else self.fill(self.register_code)

