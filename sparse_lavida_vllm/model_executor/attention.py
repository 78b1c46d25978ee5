"""The attention seam: one call that every backend (reference SDPA, vLLM paged cache, GPU kernel) implements."""

from __future__ import annotations

import functools
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


# The canonical attention call. A batch-invariant step attends for every request in ONE SDPA call, and a request's
# bits must not depend on what shares that call. The CPU flash kernel
# (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp) runs one task per (batch entry, head, block of query rows); a
# task walks the keys in blocks of min(512, keys) with an online softmax (two GEMMs per block, a vectorised exp-sum
# whose scalar tail is rounded differently).
# Two rules make a request's tasks the same computation alone and in any batch:
#  * query rows: every batch entry holds rows of one request (cut from its row 0, zero-padded), at most 160 of them:
#    below 192 rows the kernel cuts an entry into query blocks of 32 rows and a tail. A row's bits do not depend on
#    which block holds it or on the block's length, provided the block has at least 4 rows (measured: MKL's sgemm
#    takes another path for 1-3 rows), so an entry of any length whose tail block is empty or at least 4 rows gives
#    every row the bits a 32-row block gives it; _short_blocks_exact re-checks that on the machine at hand and falls
#    back to multiples of 32;
#  * keys: a request's keys are zero-padded to key_bucket(keys) (masked); the batch pads every request further, to
#    the largest bucket. A padded key whose mask is -inf contributes exp(-inf) = 0 to the sum and 0 * 0 to P @ V, so
#    appending masked keys changes no value provided the kernel's arithmetic on the real ones stays the same:
#    whole masked key blocks past a request's own are exact no-ops (max unchanged, rescale by exp(0) = 1), and a
#    block's length is kept a multiple of 16 (no scalar exp tail) and out of (192, 384), where MKL's sgemm splits its
#    reduction at a point that moves with the length (measured; tests/worker/test_paged_attention.py checks every
#    bucket pair). _tail_padding_exact re-checks that on the machine at hand and falls back to whole 512-key blocks.
ROW_BLOCK = 32  # the kernel's query block for entries of fewer than 192 rows
MAX_ENTRY_ROWS = 160  # the most rows of one entry that keep that block
MIN_BLOCK_ROWS = 4  # the shortest query block whose rows get a 32-row block's bits
ENTRY_KEY_COST = 8  # an entry's key copy costs about as much as attending this many query rows (picks entry sizes)
KEY_BLOCK = 512  # the flash kernel's key block for any call with at least this many keys
KEY_ALIGN = 16  # the widest float vector (AVX-512): a multiple of it leaves no scalar tail in the exp-sum
SPLIT_WINDOW = (192, 384)  # block lengths strictly inside: MKL splits the P @ V reduction where the length says


def _bucket(num_keys: int, whole_blocks: bool) -> int:
    full, tail = divmod(num_keys, KEY_BLOCK)
    if tail == 0:
        return num_keys
    if whole_blocks:
        return (full + 1) * KEY_BLOCK
    tail = -(-tail // KEY_ALIGN) * KEY_ALIGN
    if SPLIT_WINDOW[0] < tail < SPLIT_WINDOW[1]:
        tail = SPLIT_WINDOW[1]
    return full * KEY_BLOCK + tail


@functools.cache
def _tail_padding_exact(device_type: str, threads: int) -> bool:
    """Whether padding a key block with masked keys, from one bucket to a larger one, gives the same bits here.

    The rule is measured on MKL (AVX-512 and AVX2); another BLAS or kernel may split its sums elsewhere. A few
    dozen tiny SDPA calls decide it once per process (per device type and thread count); the answer is the same in
    every process on one machine, so the reference sampler and the server agree on it.
    """
    gen = torch.Generator().manual_seed(0)
    for num_keys in (5, 100, 190, 200, 383, 500, 530, 700, 1000):
        q = torch.randn(1, ROW_BLOCK, 2, 32, generator=gen).to(device_type)
        k, v = (torch.randn(1, num_keys, 2, 32, generator=gen).to(device_type) for _ in range(2))
        allowed = torch.rand(ROW_BLOCK, num_keys, generator=gen).to(device_type) < 0.7
        allowed[:, 0] = True
        own = _bucket(num_keys, False)
        outputs = [attend_blocks(*_padded(q, k, v, allowed, width, ROW_BLOCK)) for width in
                   (own, _bucket(own + 1, False), _bucket(own + KEY_BLOCK // 2, False), own + 2 * KEY_BLOCK)]
        if not all(torch.equal(outputs[0], out) for out in outputs[1:]):
            return False
    return True


def key_bucket(num_keys: int, device: torch.device | str = "cpu") -> int:
    """The key count a request's attention call is padded to (masked zeros); see the notes above."""
    device_type = torch.device(device).type
    return _bucket(num_keys, not _tail_padding_exact(device_type, torch.get_num_threads()))


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask SDPA adds to the scores: 0 where allowed, -inf elsewhere (built once, passed to every layer), in the
    queries' dtype as SDPA makes one from a bool mask (the CPU kernel mishandles a float mask with float64 queries)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@functools.cache
def _short_blocks_exact(device_type: str, threads: int) -> bool:
    """Whether entries of any length from MIN_BLOCK_ROWS to MAX_ENTRY_ROWS (a tail block of 0 or at least
    MIN_BLOCK_ROWS rows) give every row the bits of 32-row entries here. Measured on MKL; checked once per process
    (per device type and thread count) with a few small calls, as _tail_padding_exact is."""
    gen = torch.Generator().manual_seed(1)
    rows = 2 * ROW_BLOCK + 2 * MIN_BLOCK_ROWS + 1
    for num_keys, dim in ((9, 32), (100, 64), (530, 64)):
        width = key_bucket(num_keys, device_type)
        q = torch.randn(1, rows, 2, dim, generator=gen).to(device_type)
        k, v = (torch.randn(1, num_keys, 2, dim, generator=gen).to(device_type) for _ in range(2))
        allowed = torch.rand(rows, num_keys, generator=gen).to(device_type) < 0.7
        allowed[:, 0] = True
        outs = [attend_blocks(*_padded(q, k, v, allowed, width, size)).flatten(0, 1)[:rows]
                for size in (ROW_BLOCK, MIN_BLOCK_ROWS, 7, 21, ROW_BLOCK + MIN_BLOCK_ROWS, 2 * ROW_BLOCK + 5)]
        if not all(torch.equal(outs[0], out) for out in outs[1:]):
            return False
    return True


def entry_sizes(device: torch.device | str = "cpu") -> list[int]:
    """The entry lengths that give a request's rows the same bits (see the notes above), largest first."""
    return _entry_sizes(torch.device(device).type, torch.get_num_threads()).tolist()


@functools.cache
def _entry_sizes(device_type: str, threads: int) -> Tensor:
    if not _short_blocks_exact(device_type, threads):
        return torch.arange(MAX_ENTRY_ROWS, 0, -ROW_BLOCK)
    sizes = torch.arange(MAX_ENTRY_ROWS, MIN_BLOCK_ROWS - 1, -1)
    tail = sizes % ROW_BLOCK
    return sizes[(tail == 0) | (tail >= MIN_BLOCK_ROWS)]


def entry_rows(rows: list[int], device: torch.device | str = "cpu") -> int:
    """Rows per batch entry for requests of these row counts: of entry_sizes, the one that costs least, counting
    each entry's rows (padding included) and its copy of its request's keys (a request longer than an entry takes
    several), the larger one on a tie. Any of them gives every request the same bits; this only picks the fastest."""
    sizes = _entry_sizes(torch.device(device).type, torch.get_num_threads())
    entries = (-(-torch.tensor(rows)[None, :] // sizes[:, None])).sum(1)
    return int(sizes[torch.argmin(entries * (sizes + ENTRY_KEY_COST))])  # argmin: the first (largest) of a tie


def _padded(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, width: int,
            per_entry: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One request's entries: q (1, rows, heads, dim), k/v (1, keys, kv_heads, dim), allowed (rows, keys)
    -> q (entries, per_entry, heads, dim), k/v (entries, width, kv_heads, dim), mask (entries, per_entry, width)."""
    rows, num_keys = q.shape[1], k.shape[1]
    per_entry = per_entry or entry_rows([rows], q.device)
    entries = -(-rows // per_entry)
    qp = q.new_zeros(entries * per_entry, *q.shape[2:])
    qp[:rows] = q[0]
    kp, vp = k.new_zeros(width, *k.shape[2:]), v.new_zeros(width, *v.shape[2:])
    kp[:num_keys], vp[:num_keys] = k[0], v[0]
    mask = torch.zeros(entries * per_entry, width, dtype=torch.bool, device=q.device)
    mask[:rows, :num_keys] = allowed
    return (qp.view(entries, per_entry, *q.shape[2:]), kp.expand(entries, *kp.shape),
            vp.expand(entries, *vp.shape), additive_mask(mask.view(entries, per_entry, width), q.dtype))


def attend_blocks(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """The canonical call: q (entries, rows, heads, dim); k, v (entries, keys, kv_heads, dim); mask (entries, rows,
    keys) additive; rows one of entry_sizes(). Returns (entries, rows, heads, dim). K/V are
    laid out key-major and contiguous per entry here, whoever built them, so every caller hands the kernel the same
    strides."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2) if groups > 1 else k.contiguous()
    v = v.repeat_interleave(groups, dim=2) if groups > 1 else v.contiguous()
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask.unsqueeze(1))
    return out.transpose(1, 2)


def sdpa_with_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q: ([batch,] heads, rows, dim); k, v: ([batch,] kv_heads, keys, dim); mask: bool (rows, keys) or None (full).

    Every request's attention in the reference samplers: the canonical call (attend_blocks over the request's rows in
    entries of entry_rows(rows), keys padded to key_bucket), whose bits worker/paged_attention.py reproduces with
    all requests of an engine step in one call.
    """
    batched = q.dim() == 4
    if not batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    rows, num_keys = q.shape[2], k.shape[2]
    allowed = torch.ones(rows, num_keys, dtype=torch.bool, device=q.device) if mask is None else mask
    width = key_bucket(num_keys, q.device)
    outs = []
    for b in range(q.shape[0]):
        qb, kb, vb, mb = _padded(q[b:b + 1].transpose(1, 2), k[b:b + 1].transpose(1, 2), v[b:b + 1].transpose(1, 2),
                                 allowed, width)
        outs.append(attend_blocks(qb, kb, vb, mb).flatten(0, 1)[:rows].transpose(0, 1))
    out = torch.stack(outs)
    return out if batched else out.squeeze(0)


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

    def _mask_for(self, num_keys: int, device: torch.device) -> Tensor | None:
        if self.spans is None:
            return None
        if self._mask is None:  # same mask for every layer: build once per pass
            self._mask = spans_to_mask(self.spans.to(device), num_keys)
        return self._mask

    def keys_values(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(kv_heads, keys, dim) K and V over [cache | this pass]; writes the commit rows to the cache.

        (The paged vLLM backend, worker/paged_attention.py, gathers its keys itself and makes sdpa_with_mask's
        canonical call for every request of a step at once, which keeps its logits bit-identical to the reference:
        keep the two in step; the I4 tests compare them.)
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
        mask = self._mask_for(keys.shape[1], q.device)
        return sdpa_with_mask(q.transpose(0, 1), keys, values, mask).transpose(0, 1)
