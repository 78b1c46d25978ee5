"""The attention seam: one call that every backend (reference SDPA, vLLM paged cache, GPU kernel) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lavida_vllm.diffusion.masks import spans_to_mask


class AttentionBackend(ABC):
    """Computes attention for one layer of one forward pass and owns any cache writes."""

    @abstractmethod
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (rows, heads, dim); k, v: (rows, kv_heads, dim) for this pass's rows. Returns (rows, heads, dim)."""


class KVCache:
    """A contiguous per-sequence K/V cache for the reference samplers (vLLM uses its paged pool instead)."""

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Stage rows (rows, kv_heads, dim) at [length, length + rows); `advance` makes them visible."""
        n = k.shape[0]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n} > capacity {self.capacity}")
        self.k[layer, :, self.length:self.length + n] = k.transpose(0, 1)
        self.v[layer, :, self.length:self.length + n] = v.transpose(0, 1)

    def advance(self, n: int) -> None:
        self.length += n


def sdpa_with_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q: (heads, rows, dim); k, v: (kv_heads, keys, dim); mask: bool (rows, keys) or None (full)."""
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=mask).squeeze(0)


class SpanAttention(AttentionBackend):
    """Reference backend: keys are [cache | this pass's rows]; each row attends to its spans.

    The first `num_commit` rows are written to `cache` (they are C_{k-1}); the caller advances the
    cache after the forward pass. `spans=None` means full attention (the dense MDM).
    """

    def __init__(self, spans: Tensor | None, cache: KVCache | None = None, num_commit: int = 0) -> None:
        if num_commit and cache is None:
            raise ValueError("num_commit > 0 needs a cache to write into")
        self.spans = spans
        self.cache = cache
        self.num_commit = num_commit
        self._mask: Tensor | None = None

    def _mask_for(self, num_keys: int, device: torch.device) -> Tensor | None:
        if self.spans is None:
            return None
        if self._mask is None:  # same mask for every layer: build once per pass
            self._mask = spans_to_mask(self.spans.to(device), num_keys)
        return self._mask

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache = self.cache
        if cache is not None and cache.length:
            keys = torch.cat([cache.k[layer, :, :cache.length], k.transpose(0, 1)], dim=1)
            values = torch.cat([cache.v[layer, :, :cache.length], v.transpose(0, 1)], dim=1)
        else:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        out = sdpa_with_mask(q.transpose(0, 1), keys, values, self._mask_for(keys.shape[1], q.device))
        if self.num_commit:
            cache.write(layer, k[:self.num_commit], v[:self.num_commit])
        return out.transpose(0, 1)
