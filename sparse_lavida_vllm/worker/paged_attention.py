"""Step-causal attention over vLLM's paged KV cache: per-request spans, commit rows written through a slot mapping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lavida_vllm.diffusion.masks import spans_to_mask
from sparse_lavida_vllm.model_executor.attention import AttentionBackend, prefix_runs, sdpa_with_mask


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


@dataclass
class _Group:
    """Consecutive requests of one shape: `size` blocks of `rows` pass rows from `start` and of `keys` keys
    ([cache | rows]) from `key_start` in the layer's key buffer; `runs` as prefix_runs, else the spans' `mask`."""

    start: int
    key_start: int
    size: int
    rows: int
    keys: int
    runs: list[tuple[int, int, int]] | None
    mask: Tensor | None


def _blocks(x: Tensor, start: int, size: int, n: int) -> Tensor:
    """(size, heads, n, dim) view of `size` consecutive blocks of n rows of x (rows, heads, dim) from row `start`."""
    return x[start:start + size * n].view(size, n, *x.shape[1:]).transpose(1, 2)


class PagedSpanAttention(AttentionBackend):
    """A flat batch of requests; each attends to [its cached K/V gathered from the pool | its rows].

    pool[layer] is (2, num_slots, kv_heads, head_dim): the K and V planes of vLLM's block pool seen as flat
    slots. Per layer, one index_select gathers every request's cached K/V (in write order, so a request's keys
    come in the reference KVCache's order) and one cat lays out [request 0's cache | its rows | request 1's
    cache | ...] in a key-major buffer; one index_copy writes every request's commit rows to the pool. Requests
    own disjoint slots, so gathering before any commit row is written reads what request-by-request would.

    Attention has the reference's arithmetic (SpanAttention: one maskless SDPA call per prefix run of the spans,
    or one masked call): moving data in fewer calls changes no value, and consecutive requests of one shape (same
    cache length, rows and spans, e.g. requests started together) share each SDPA call as a batch, which gives
    each the bits it gets alone. Each request's result is therefore independent of the batch (batch invariance).
    """

    def __init__(self, pool: list[Tensor], segments: list[Segment], slot_is_image: Tensor | None = None) -> None:
        self.pool = pool
        self.segments = segments
        self.slot_is_image = slot_is_image  # the runner's per-slot modality flags (LaViDa-O), beside the pool
        device = pool[0].device
        self.groups: list[_Group] = []
        self.parts: list[tuple[int, int, int, int]] = []  # per request: cached [a, b) of the gather, rows [c, d)
        self.key_starts: list[int] = []  # per request: where its keys start in the layer's key buffer
        gathered = offset = 0
        for seg in segments:
            cached, rows = seg.cached_slots.numel(), seg.end - seg.start
            keys = cached + rows
            runs = prefix_runs(seg.spans, rows, keys)
            last = self.groups[-1] if self.groups else None
            if last is not None and runs is not None and (last.rows, last.keys, last.runs) == (rows, keys, runs):
                last.size += 1
            else:
                mask = None if runs is not None or seg.spans is None else spans_to_mask(seg.spans.to(device), keys)
                self.groups.append(_Group(seg.start, offset, 1, rows, keys, runs, mask))
            self.parts.append((gathered, gathered + cached, seg.start, seg.end))
            self.key_starts.append(offset)
            gathered += cached
            offset += keys
        self.cached_slots = torch.cat([seg.cached_slots for seg in segments]).to(device)
        self.commit_rows = torch.cat([torch.arange(seg.start, seg.start + seg.commit_slots.numel())
                                      for seg in segments]).to(device)
        self.commit_slots = torch.cat([seg.commit_slots for seg in segments]).to(device)

    def _gather(self, plane: Tensor, rows: Tensor) -> Tensor:
        """(keys, kv_heads, head_dim): the key-major buffer (SDPA computes the same bits on its per-head strided
        views as on per-head contiguous keys: tests/worker/test_paged_attention.py checks it)."""
        cached = plane.index_select(0, self.cached_slots)
        pieces = []
        for a, b, c, d in self.parts:
            pieces += [cached[a:b], rows[c:d]]
        return torch.cat(pieces)

    def keys_values(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The key-major K and V buffers [request 0's cache | its rows | ...]; writes the commit rows to the pool."""
        cache = self.pool[layer]
        keys, values = self._gather(cache[0], k), self._gather(cache[1], v)
        if self.commit_rows.numel():  # only C_{k-1} (or the prompt) reaches the pool; masks and registers never do (I1)
            cache[0].index_copy_(0, self.commit_slots, k.index_select(0, self.commit_rows))
            cache[1].index_copy_(0, self.commit_slots, v.index_select(0, self.commit_rows))
        return keys, values

    def attend_groups(self, q: Tensor, keys: Tensor, values: Tensor, groups: list[_Group]) -> Tensor:
        out = q.new_empty(q.shape)
        for g in groups:
            qg, og = _blocks(q, g.start, g.size, g.rows), _blocks(out, g.start, g.size, g.rows)
            kg, vg = _blocks(keys, g.key_start, g.size, g.keys), _blocks(values, g.key_start, g.size, g.keys)
            if g.runs is None:
                og.copy_(sdpa_with_mask(qg, kg, vg, g.mask))
            for a, b, end in g.runs or []:
                og[:, :, a:b] = sdpa_with_mask(qg[:, :, a:b], kg[:, :, :end], vg[:, :, :end], None)
        return out

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.keys_values(layer, k, v)
        return self.attend_groups(q, keys, values, self.groups)

    def with_modality(self, row_is_image: Tensor, first_split_layer: int) -> PagedModalityAttention:
        """This pass under LaViDa-O's per-modality layers (lavida_o.LaViDaOMDM.wrap_attention calls it)."""
        if self.slot_is_image is None:
            raise ValueError("per-modality layers need the per-slot modality flags of the pool (slot_is_image)")
        return PagedModalityAttention(self, row_is_image, first_split_layer)


class PagedModalityAttention(AttentionBackend):
    """LaViDa-O's split layers over the paged pool: ModalityAttention's rule (the spans AND same-modality keys).

    Each cached key's modality is a per-slot flag beside the K/V pool (`slot_is_image`), written with the commit
    rows' K/V (the same slots), so a request's cached keys carry their modality like a ModalKVCache's rows. Joint
    layers, and split layers of a request whose rows and keys all have one modality (a text request), keep the
    wrapped backend's arithmetic; the others run one masked SDPA per request, as ModalityAttention does.
    """

    def __init__(self, inner: PagedSpanAttention, row_is_image: Tensor, first_split_layer: int) -> None:
        self.inner = inner
        self.first_split_layer = first_split_layer
        flags = inner.slot_is_image
        rows = row_is_image.to(flags.device)
        cached = flags.index_select(0, inner.cached_slots)
        self.groups: list[_Group] = []  # one group per request, with the modality mask where it matters
        self.mixed = False
        for seg, (a, b, c, d), key_start in zip(inner.segments, inner.parts, inner.key_starts, strict=True):
            row_mod = rows[c:d]
            keys = torch.cat([cached[a:b], row_mod])
            n_rows, n_keys = d - c, keys.numel()
            spans = None if seg.spans is None else spans_to_mask(seg.spans.to(flags.device), n_keys)
            if n_keys == 0 or bool((keys == keys[0]).all()):  # one modality: the joint arithmetic
                runs = prefix_runs(seg.spans, n_rows, n_keys)
                self.groups.append(_Group(c, key_start, 1, n_rows, n_keys, runs, None if runs else spans))
                continue
            self.mixed = True
            mask = row_mod.view(-1, 1) == keys.view(1, -1)
            self.groups.append(_Group(c, key_start, 1, n_rows, n_keys, None, mask if spans is None else mask & spans))
        if inner.commit_rows.numel():  # the commit rows' modality goes where their K/V go
            flags.index_copy_(0, inner.commit_slots, rows.index_select(0, inner.commit_rows))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer < self.first_split_layer or not self.mixed:
            return self.inner.attend(layer, q, k, v)
        keys, values = self.inner.keys_values(layer, k, v)
        return self.inner.attend_groups(q, keys, values, self.groups)


@dataclass
class StepLayout:
    """Where each request of a flat batch sits, as (B,) tensors; requests lie back to back in row order.

    Request b owns `rows[b]` consecutive rows. Its first `num_commit[b]` rows are written to the pool
    at its cache slots [cache_len[b], cache_len[b] + num_commit[b]) and see only the cache and the
    commit rows (the step-causal rule); every other row sees all of the request's keys. Cache slot i
    of request b is block_table[b, i // block_size] * block_size + i % block_size.
    """

    rows: Tensor
    cache_len: Tensor
    num_commit: Tensor
    block_table: Tensor  # (B, max blocks), padded with block 0 (never read: padded keys are masked)
    block_size: int

    def slots(self, index: Tensor) -> Tensor:
        """Pool slots of per-request cache indices (B, n) (indices past a request's blocks give block 0)."""
        col = (index // self.block_size).clamp(max=max(self.block_table.shape[1] - 1, 0))
        table = self.block_table if self.block_table.numel() else torch.zeros(len(index), 1, dtype=torch.long)
        return table.gather(1, col) * self.block_size + index % self.block_size


class BatchedPagedAttention(AttentionBackend):
    """Every request of a flat batch in one SDPA call per layer: rows padded to (B, heads, R, d).

    Keys of request b are [its cached K/V (padded to C) | its rows (padded to R)], gathered with one
    index_select from the pool per layer; a bool mask built once per pass from the layout keeps each
    request on its own keys and applies the step-causal rule. A batched SDPA rounds differently from
    per-request calls, so this is the flat (throughput) mode's backend; the exact mode keeps
    PagedSpanAttention.
    """

    def __init__(self, pool: list[Tensor], layout: StepLayout) -> None:
        self.pool = pool
        rows, cache_len, commit = layout.rows, layout.cache_len, layout.num_commit
        b, r_max, c_max = rows.numel(), int(rows.max()), int(cache_len.max())
        self.shape = (b, r_max, c_max)
        r, c = torch.arange(r_max), torch.arange(c_max)
        starts = torch.cumsum(rows, 0) - rows
        row_ok = r < rows[:, None]  # (B, R)
        # padded row index -> flat row (padding reads row 0: finite values whose outputs are dropped)
        self.row_index = torch.where(row_ok, starts[:, None] + r, 0).flatten()
        self.out_index = row_ok.flatten().nonzero().flatten()  # flat row -> its padded position
        self.identity = bool(row_ok.all())  # all requests the same length: padding is a plain view
        self.cached_slots = torch.where(c < cache_len[:, None], layout.slots(c.expand(b, c_max)), 0).flatten()
        j = torch.arange(int(commit.max()))
        writes = j < commit[:, None]
        self.commit_rows = (starts[:, None] + j)[writes]
        self.commit_slots = layout.slots(cache_len[:, None] + j)[writes]
        commit_row = r < commit[:, None]  # query rows that will be cached: clean keys only
        step_keys = row_ok[:, None, :] & (~commit_row[:, :, None] | commit_row[:, None, :])
        mask = torch.cat([(c < cache_len[:, None])[:, None, :].expand(b, r_max, c_max), step_keys], dim=-1)
        mask |= ~row_ok[:, :, None]  # a padded query row sees everything (no all-masked row, no NaN)
        self.mask = None if bool(mask.all()) else mask.unsqueeze(1)
        device = pool[0].device  # built on the host from the layout, used where the pool lives
        for name in ("row_index", "out_index", "cached_slots", "commit_rows", "commit_slots", "mask"):
            value = getattr(self, name)
            setattr(self, name, value.to(device) if value is not None else None)

    def _pad(self, x: Tensor) -> Tensor:
        b, r_max, _ = self.shape
        x = x if self.identity else x.index_select(0, self.row_index)
        return x.view(b, r_max, *x.shape[1:])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, (b, r_max, c_max) = self.pool[layer], self.shape
        keys, values = self._pad(k), self._pad(v)
        if c_max:
            cached_k = cache[0].index_select(0, self.cached_slots).view(b, c_max, *k.shape[1:])
            cached_v = cache[1].index_select(0, self.cached_slots).view(b, c_max, *v.shape[1:])
            keys, values = torch.cat([cached_k, keys], dim=1), torch.cat([cached_v, values], dim=1)
        if self.commit_rows.numel():  # only C_{k-1} (or the prompt) reaches the pool; masks and registers never do
            cache[0].index_copy_(0, self.commit_slots, k.index_select(0, self.commit_rows))
            cache[1].index_copy_(0, self.commit_slots, v.index_select(0, self.commit_rows))
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (B, kv_heads, keys, d)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(self._pad(q).transpose(1, 2), keys, values, attn_mask=self.mask)
        out = out.transpose(1, 2).reshape(b * r_max, *q.shape[1:])
        return out if self.identity else out.index_select(0, self.out_index)
