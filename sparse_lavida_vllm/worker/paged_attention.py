"""Step-causal attention over vLLM's paged KV cache: per-request spans, commit rows written through a slot mapping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lavida_vllm.diffusion.masks import spans_to_mask
from sparse_lavida_vllm.model_executor.attention import (
    AttentionBackend,
    additive_mask,
    attend_blocks,
    entry_rows,
    key_bucket,
)


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


def slot_ranges(tables: list[list[int]], start: Tensor, end: Tensor, block_size: int,
                cut: Tensor | None = None) -> list[Tensor]:
    """request_slots of many requests in a few tensor ops: request b's slots of its token indices [start[b], end[b]);
    with `cut`, two ranges per request, [start[b], cut[b]) then [cut[b], end[b]) (2B tensors, request by request)."""
    lengths = end - start
    width = max(max((len(t) for t in tables), default=0), 1)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(len(tables), width)
    req = torch.repeat_interleave(torch.arange(len(tables)), lengths)
    idx = torch.arange(int(lengths.sum())) - (torch.cumsum(lengths, 0) - lengths)[req] + start[req]
    pieces = lengths if cut is None else torch.stack([cut - start, end - cut], 1).flatten()
    return list(torch.split(table[req, idx // block_size] * block_size + idx % block_size, pieces.tolist()))


class PagedSpanAttention(AttentionBackend):
    """A flat batch of requests in ONE attention call per layer, each request with the reference's bits.

    pool[layer] is (2, num_slots, kv_heads, head_dim): the K and V planes of vLLM's block pool seen as flat
    slots. Per layer, one index_select gathers every request's cached K/V (in write order, so a request's keys
    come in the reference KVCache's order), one index_copy writes every request's commit rows to the pool, and one
    SDPA call attends for every request: sdpa_with_mask's canonical call (model_executor/attention.py), made for all
    of them at once. Each request's rows are cut into entries of entry_rows(the step's row counts) rows from its row 0
    (zero-padded; any allowed entry size gives a row the bits the reference's entries give it), and each entry's keys
    are its request's [cache | rows], zero-padded to the widest key_bucket of the step under a mask built once per
    pass from the spans. The kernel computes each (entry, head) alone, and the
    padding past a request's own bucket is provably inert (the notes in attention.py), so every request gets the
    bits the reference sampler gets for it alone: batch invariance with no loop over requests in the forward.
    Requests own disjoint slots, so gathering before any commit row is written reads what request-by-request would.
    """

    def __init__(self, pool: list[Tensor], segments: list[Segment], slot_is_image: Tensor | None = None) -> None:
        self.pool = pool
        self.segments = segments
        self.slot_is_image = slot_is_image  # the runner's per-slot modality flags (LaViDa-O), beside the pool
        device = pool[0].device
        rows_n = [seg.end - seg.start for seg in segments]
        keys_n = [seg.cached_slots.numel() + n for seg, n in zip(segments, rows_n, strict=True)]
        rows, keys = torch.tensor(rows_n), torch.tensor(keys_n)
        cached = keys - rows
        row_start = torch.tensor([seg.start for seg in segments])
        cached_start = torch.cumsum(cached, 0) - cached
        total_cached, total_rows = sum(keys_n) - sum(rows_n), sum(rows_n)
        width = key_bucket(max(keys_n), device)  # buckets grow with the key count: the largest request's
        per_entry = entry_rows(rows_n, device)
        blocks = -(-rows // per_entry)
        entry_req = torch.repeat_interleave(torch.arange(len(segments)), blocks)  # (entries,) -> its request
        self.entries, self.per_entry, self.width = entry_req.numel(), per_entry, width
        self.total_rows, self.lone = total_rows, self.entries == 1 and segments[0].start == 0
        # each entry's keys as rows of [all cached K/V (gathered) | this pass's K/V | one zero row]
        j = torch.arange(width)
        c, n = cached[:, None], keys[:, None]
        key_src = torch.where(j < c, cached_start[:, None] + j,
                              torch.where(j < n, total_cached + row_start[:, None] + j - c, total_cached + total_rows))
        self.key_index = key_src[entry_req].flatten().to(device)
        # which keys each row sees (rows in flat order), then laid out as the entries hold them
        allowed = _row_keys_seen(segments, rows, keys, j)
        # every request fills its entries and the requests lie back to back: the queries are q itself
        self.identity = bool((rows % per_entry == 0).all()) and torch.equal(row_start, torch.cumsum(rows, 0) - rows)
        if self.identity:
            self.allowed = allowed
        else:  # each entry's query rows as rows of [this pass's q | one zero row]
            entry_block = torch.arange(self.entries) - (torch.cumsum(blocks, 0) - blocks)[entry_req]
            local = entry_block[:, None] * per_entry + torch.arange(per_entry)  # (entries, per_entry) row in request
            real = local < rows[entry_req, None]
            self.query_index = torch.where(real, row_start[entry_req, None] + local, total_rows).flatten().to(device)
            self.out_index = real.flatten().nonzero().flatten()  # entry rows that are real, in flat row order
            self.allowed = torch.zeros(self.entries * per_entry, width, dtype=torch.bool)
            self.allowed[self.out_index] = allowed
            self.out_index = self.out_index.to(device)
        self.mask = additive_mask(self.allowed.to(device), pool[0].dtype).view(self.entries, per_entry, width)
        self.cached_slots = torch.cat([seg.cached_slots for seg in segments]).to(device)
        self.commit_slots = torch.cat([seg.commit_slots for seg in segments]).to(device)
        # the first len(commit_slots) rows of each request, in flat row order
        commits = torch.tensor([seg.commit_slots.numel() for seg in segments])
        first = torch.repeat_interleave(row_start - (torch.cumsum(commits, 0) - commits), commits)
        self.commit_rows = (first + torch.arange(first.numel())).to(device)

    def keys_values(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(entries, width, kv_heads, head_dim) K and V of every entry; writes the commit rows to the pool."""
        cache = self.pool[layer]
        out = []
        cached, end = self.cached_slots.numel(), self.cached_slots.numel() + k.shape[0]
        # one entry over all of this pass's rows: its keys are the source itself, [cached | this pass's | zeros]
        lone = self.lone and k.shape[0] == self.total_rows
        size = self.width if lone else end + 1
        for plane, rows in ((cache[0], k), (cache[1], v)):
            # [cached K/V | this pass's | a zero row], the cached part gathered straight into place (no second copy;
            # the pool is a cache, never differentiated through, so its gather may write to `out`)
            source = rows.new_empty(size, *rows.shape[1:])
            torch.index_select(plane.detach(), 0, self.cached_slots, out=source[:cached])
            source[cached:end] = rows
            source[end:] = 0
            keys = source if lone else source.index_select(0, self.key_index)
            out.append(keys.view(self.entries, self.width, *rows.shape[1:]))
        if self.commit_rows.numel():  # only C_{k-1} (or the prompt) reaches the pool; masks and registers never do (I1)
            cache[0].index_copy_(0, self.commit_slots, k.index_select(0, self.commit_rows))
            cache[1].index_copy_(0, self.commit_slots, v.index_select(0, self.commit_rows))
        return out[0], out[1]

    def to_entries(self, x: Tensor) -> Tensor:
        """x's rows (one per row of the pass) in the order the entries hold them, zeros where an entry is padded."""
        if self.identity:
            return x
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, self.query_index)

    def attend_masked(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        keys, values = self.keys_values(layer, k, v)
        out = attend_blocks(self.to_entries(q).view(self.entries, self.per_entry, *q.shape[1:]), keys, values, mask)
        return out.flatten(0, 1) if self.identity else out.flatten(0, 1).index_select(0, self.out_index)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend_masked(layer, q, k, v, self.mask)

    def with_modality(self, row_is_image: Tensor, first_split_layer: int) -> PagedModalityAttention:
        """This pass under LaViDa-O's per-modality layers (lavida_o.LaViDaOMDM.wrap_attention calls it)."""
        if self.slot_is_image is None:
            raise ValueError("per-modality layers need the per-slot modality flags of the pool (slot_is_image)")
        return PagedModalityAttention(self, row_is_image, first_split_layer)


def _row_keys_seen(segments: list[Segment], rows: Tensor, keys: Tensor, j: Tensor) -> Tensor:
    """(rows, len(j)) bool, the segments' rows in order: key j is one of the row's request's keys and within its
    spans (all of them without spans). Spans of one interval from key 0 (what the runner builds) take one comparison."""
    spans = torch.cat([seg.spans.cpu() if seg.spans is not None else
                       torch.tensor([[0, n], [0, 0]]).expand(seg.end - seg.start, 2, 2)
                       for seg, n in zip(segments, keys.tolist(), strict=True)])
    row_keys = torch.repeat_interleave(keys, rows)
    if not bool(spans[:, 0, 0].any()) and bool((spans[:, 1, 1] <= spans[:, 1, 0]).all()):  # each [0, end)
        return j < torch.minimum(spans[:, 0, 1], row_keys)[:, None]
    return spans_to_mask(spans, j.numel()) & (j < row_keys[:, None])


class PagedModalityAttention(AttentionBackend):
    """LaViDa-O's split layers over the paged pool: ModalityAttention's rule (the spans AND same-modality keys).

    Each cached key's modality is a per-slot flag beside the K/V pool (`slot_is_image`), written with the commit
    rows' K/V (the same slots), so a request's cached keys carry their modality like a ModalKVCache's rows. Split
    layers make the wrapped backend's one call with a second mask; for a request whose rows and keys all have one
    modality (a text request) that mask equals the joint one, which is ModalityAttention's joint arithmetic.
    """

    def __init__(self, inner: PagedSpanAttention, row_is_image: Tensor, first_split_layer: int) -> None:
        self.inner = inner
        self.first_split_layer = first_split_layer
        flags = inner.slot_is_image
        rows = row_is_image.to(flags.device)
        # the modality of every entry row and every entry key, as the joint call lays them out
        key_is_image = torch.cat([flags.index_select(0, inner.cached_slots), rows, rows.new_zeros(1)])
        key_is_image = key_is_image.index_select(0, inner.key_index).view(inner.entries, inner.width)
        row_of_entry = inner.to_entries(rows)
        shape = (inner.entries, inner.per_entry, inner.width)
        same = row_of_entry.view(*shape[:2], 1) == key_is_image.view(shape[0], 1, shape[2])
        allowed = inner.allowed.to(flags.device).view(shape) & same
        self.mask = additive_mask(allowed, inner.mask.dtype)
        if inner.commit_rows.numel():  # the commit rows' modality goes where their K/V go
            flags.index_copy_(0, inner.commit_slots, rows.index_select(0, inner.commit_rows))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer < self.first_split_layer:
            return self.inner.attend(layer, q, k, v)
        return self.inner.attend_masked(layer, q, k, v, self.mask)


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
