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
    """q: ([batch,] heads, rows, dim); k, v: ([batch,] kv_heads, keys, dim); mask: bool (rows, keys) or None (full).

    A batch of same-shape requests gives each the bits it gets alone (the CPU kernel works per (batch, head, row
    block); tests/worker/test_paged_attention.py checks it), which lets the paged backend batch them.
    """
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    if q.dim() == 4:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=mask).squeeze(0)


def prefix_runs(spans: Tensor | None, num_rows: int, num_keys: int,
                max_runs: int = 4) -> list[tuple[int, int, int]] | None:
    """Describe a mask as runs of rows that each see one key prefix: [(row_start, row_end, key_end)].

    The sparse inference step is of this form (commit rows see the clean prefix, all other rows
    see every key), so it needs no materialised mask: one maskless SDPA call per run. Returns None
    when the spans are not prefix-only (e.g. Algorithm 1's masked blocks) or need too many runs.
    """
    if spans is None:
        return [(0, num_rows, num_keys)]
    if spans.shape[0] != num_rows:
        raise ValueError(f"spans has {spans.shape[0]} rows, the pass has {num_rows}")
    spans = spans.cpu()
    if num_rows == 0 or bool((spans[:, 0, 0] != 0).any()) or bool((spans[:, 1, 1] > spans[:, 1, 0]).any()):
        return None
    ends = spans[:, 0, 1].clamp(max=num_keys)
    if bool((ends <= 0).any()):  # a row that sees no key: leave it to the masked path
        return None
    change = (ends[1:] != ends[:-1]).nonzero().flatten().add(1).tolist()
    if len(change) + 1 > max_runs:
        return None
    bounds = [0, *change, num_rows]
    return [(a, b, int(ends[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class SpanAttention(AttentionBackend):
    """Reference backend: keys are [cache | this pass's rows]; each row attends to its spans.

    The first `num_commit` rows are written to `cache` (they are C_{k-1}); the caller advances the
    cache after the forward pass. `spans=None` means full attention (the dense MDM). When the
    cache has room, this pass's K/V go straight into it after the cached rows (rows past
    `num_commit` are scratch that the next pass overwrites) so the keys are a view, not a copy.
    """

    def __init__(self, spans: Tensor | None, cache: KVCache | None = None, num_commit: int = 0) -> None:
        if num_commit and cache is None:
            raise ValueError("num_commit > 0 needs a cache to write into")
        self.spans = spans
        self.cache = cache
        self.num_commit = num_commit
        self._mask: Tensor | None = None
        self._runs: list[tuple[int, int, int]] | None = None
        self._planned = False

    def _mask_for(self, num_keys: int, device: torch.device) -> Tensor | None:
        if self.spans is None:
            return None
        if self._mask is None:  # same mask for every layer: build once per pass
            self._mask = spans_to_mask(self.spans.to(device), num_keys)
        return self._mask

    def _runs_for(self, num_rows: int, num_keys: int) -> list[tuple[int, int, int]] | None:
        if not self._planned:  # same for every layer: one host-side look at the spans per pass
            self._runs = prefix_runs(self.spans, num_rows, num_keys)
            self._planned = True
        return self._runs

    def keys_values(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(kv_heads, keys, dim) K and V over [cache | this pass]; writes the commit rows to the cache.

        (The paged vLLM backend, worker/paged_attention.py, gathers its keys itself and repeats the dispatch of
        attend() below with the same prefix_runs / sdpa_with_mask calls, which keeps its logits bit-identical to
        the reference: keep the two in step; the I4 tests compare them.)
        """
        cache, rows = self.cache, k.shape[0]
        if cache is None:
            return k.transpose(0, 1), v.transpose(0, 1)
        end = cache.length + rows
        if end <= cache.capacity:
            cache.k[layer, :, cache.length:end] = k.transpose(0, 1)
            cache.v[layer, :, cache.length:end] = v.transpose(0, 1)
            return cache.k[layer, :, :end], cache.v[layer, :, :end]
        if cache.length:
            keys = torch.cat([cache.k[layer, :, :cache.length], k.transpose(0, 1)], dim=1)
            values = torch.cat([cache.v[layer, :, :cache.length], v.transpose(0, 1)], dim=1)
        else:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        if self.num_commit:
            cache.write(layer, k[:self.num_commit], v[:self.num_commit])
        return keys, values

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.keys_values(layer, k, v)
        qt = q.transpose(0, 1)
        runs = self._runs_for(q.shape[0], keys.shape[1])
        if runs is None:
            out = sdpa_with_mask(qt, keys, values, self._mask_for(keys.shape[1], q.device))
        elif len(runs) == 1:
            out = sdpa_with_mask(qt, keys[:, :runs[0][2]], values[:, :runs[0][2]], None)
        else:
            out = torch.cat([sdpa_with_mask(qt[:, a:b], keys[:, :end], values[:, :end], None)
                             for a, b, end in runs], dim=1)
        return out.transpose(0, 1)
