"""Step-causal attention over vLLM's paged KV cache: per-request spans, commit rows written through a slot mapping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_lavida_vllm.model_executor.attention import AttentionBackend, SpanAttention


@dataclass
class Segment:
    """The rows [start, end) of one request in a flat batch.

    cached_slots: cache slots of the keys already in the cache, in the order they were written;
    commit_slots: where the first len(commit_slots) rows of the segment go; spans: (rows, 2, 2)
    key intervals over [cache | segment rows], or None for full attention.
    """

    start: int
    end: int
    cached_slots: Tensor
    commit_slots: Tensor
    spans: Tensor | None


def request_slots(block_ids: list[int], start: int, end: int, block_size: int) -> Tensor:
    """Cache slots of a request's token indices [start, end): block table lookup + offset."""
    idx = torch.arange(start, end)
    return torch.tensor(block_ids, dtype=torch.long)[idx // block_size] * block_size + idx % block_size


class _SegmentAttention(SpanAttention):
    """The reference backend's attention for one request, with keys gathered from the paged pool.

    Only where keys come from changes: the mask / prefix-run logic is the reference's own code,
    so the vLLM path stays bit-identical to the reference sampler (I4) as that code evolves.
    """

    def __init__(self, pool: list[Tensor], seg: Segment) -> None:
        super().__init__(seg.spans)
        self.pool = pool
        self.seg = seg

    def keys_values(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cache, seg = self.pool[layer], self.seg
        cached = seg.cached_slots.numel()
        keys = torch.empty(k.shape[1], cached + k.shape[0], k.shape[2], dtype=k.dtype, device=k.device)
        values = torch.empty_like(keys)
        if cached:
            keys[:, :cached] = cache[0, seg.cached_slots].transpose(0, 1)
            values[:, :cached] = cache[1, seg.cached_slots].transpose(0, 1)
        keys[:, cached:] = k.transpose(0, 1)
        values[:, cached:] = v.transpose(0, 1)
        n = seg.commit_slots.numel()
        if n:  # only C_{k-1} (or the prompt) reaches the pool; masks and registers never do (I1)
            cache[0, seg.commit_slots] = k[:n]
            cache[1, seg.commit_slots] = v[:n]
        return keys, values


class PagedSpanAttention(AttentionBackend):
    """A flat batch of requests; each attends to [its cached K/V gathered from the pool | its rows].

    pool[layer] is (2, num_slots, kv_heads, head_dim): the K and V planes of vLLM's block pool
    seen as flat slots. The gather keeps write order, so a request's keys come in the same order
    as the reference KVCache's.
    """

    def __init__(self, pool: list[Tensor], segments: list[Segment]) -> None:
        self.segments = [(seg, _SegmentAttention(pool, seg)) for seg in segments]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        outs = [backend.attend(layer, q[s.start:s.end], k[s.start:s.end], v[s.start:s.end])
                for s, backend in self.segments]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
