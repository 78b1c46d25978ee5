"""The LLaDA-architecture masked diffusion transformer with the [reg] token (one model file)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lavida_vllm.model_executor.attention import AttentionBackend, SpanAttention
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.parallel import SingleRank, TensorParallel

# Megatron-style split of a block's linears over tensor-parallel ranks (weights are (out, in)):
# column-parallel layers keep a slice of their outputs (dim 0), row-parallel layers a slice of
# their inputs (dim 1) and are followed by an all-reduce. Everything else is replicated.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj")
ROW_PARALLEL = ("attn_out", "ff_out")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (rows, 1, head_dim) for explicit position ids (GPT-NeoX half rotation, as LLaDA)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# Inference GEMMs run in tiles of this many rows: every call then has one shape, so the BLAS picks one kernel and one
# thread split for all of them and a row's result does not depend on how many rows share the pass (measured: with
# one call over all rows, results change below ~16 rows and, with 2 threads, for some K between 64 and 128 rows).
# Larger tiles cost less per row (one weight packing per call; fewer calls) but pad more rows; per 768 rows on one
# CPU thread, 32-row tiles took 1.4-2x a plain GEMM, 64-row tiles 1.2-1.5x and 128-row tiles 1.1-1.2x (K, N from
# 256 to 4096); in the serving benchmark 128-row tiles served one request 1.4x slower than 64-row ones (a pass of
# 36-66 rows) and 8-32 requests no faster.
ROW_TILE = 64
# Below this many rows a plain GEMM takes other kernels (measured: rows differ from their tile's up to 15 rows)
PLAIN_MIN_ROWS = 16


@dataclass(frozen=True)
class RowTiles:
    """How an inference GEMM splits its rows: fixed tiles of `size` rows, the bits every row must get.

    `plain_up_to` >= 2 x PLAIN_MIN_ROWS says a plain GEMM over n rows (PLAIN_MIN_ROWS <= n <= plain_up_to) was checked
    on this machine to give every row exactly its tile's bits (`plain_rows_verified`). Passes of PLAIN_MIN_ROWS rows or
    more then run one plain GEMM, or above plain_up_to rows one per equal chunk (each half to all of plain_up_to),
    instead of the tiles and their padding, and a row gets the same bits either way (batch invariance). Passes under
    PLAIN_MIN_ROWS rows keep the tiles.
    """

    size: int = ROW_TILE
    plain_up_to: int = 0


def tiled(layer: nn.Linear, x: Tensor, tile: RowTiles | None) -> Tensor:
    """layer(x) with every row getting the bits of its `tile.size`-row tile; plain layer(x) when tile is None.

    Tiles: one GEMM call of shape (tile, in) x (in, out) per tile writing its slice of the output in place (full tiles
    read x where it lies, a fresh activation, so every tile starts 64-byte aligned, as the padded last tile does).
    One batched call over the tiles (bmm) is not used: for a batch of one tile torch calls MKL's threaded GEMM and
    for more it calls MKL's batched GEMM, which runs each tile on one thread, so with 2 threads a row's bits
    depended on the tile count (measured for K, N >= 1024); over 2+ tiles it was no faster than this loop.
    Verified plain GEMMs (`tile.plain_up_to`): the pass is cut into equal chunks of at most plain_up_to rows, each
    at least plain_up_to / 2 >= PLAIN_MIN_ROWS, so every chunk is a row count the check covered.
    """
    n = x.shape[0]
    if tile is None or n == 0:
        return layer(x)
    weight = layer.weight.t()
    chunk = tile.plain_up_to
    if chunk >= 2 * PLAIN_MIN_ROWS and n >= PLAIN_MIN_ROWS:
        if n <= chunk:
            out = torch.mm(x, weight)
        else:
            parts = -(-n // chunk)
            bounds = [n * i // parts for i in range(parts + 1)]
            out = x.new_empty(n, weight.shape[1])
            for start, end in zip(bounds[:-1], bounds[1:]):
                torch.mm(x[start:end], weight, out=out[start:end])
        return out if layer.bias is None else out + layer.bias
    size = tile.size
    full = n - n % size
    out = x.new_empty(full + (size if full < n else 0), weight.shape[1])
    for start in range(0, full, size):
        torch.mm(x[start:start + size], weight, out=out[start:start + size])
    if full < n:
        last = x.new_zeros(size, x.shape[1])
        last[:n - full] = x[full:]
        torch.mm(last, weight, out=out[full:])
    return out[:n] if layer.bias is None else out[:n] + layer.bias


def plain_rows_verified(model: nn.Module, max_rows: int = 512, tile: int = ROW_TILE,
                        flop_budget: float = 4e11, seed: int = 0) -> int:
    """The largest row count up to which plain GEMMs give every row its `tile`-row tile's bits, for every weight shape
    of `model`'s linear layers at this process's dtype and torch thread count; 0 when they do not.

    It runs both on seeded random inputs: every row count from PLAIN_MIN_ROWS to 2 x tile, every 16th above, up to
    `max_rows` (lowered a tile at a time until the probe fits `flop_budget`: up to ~4 s on one CPU thread, never
    below two tiles), and a chunked pass of 2 x the count + PLAIN_MIN_ROWS rows as `tiled` runs it. A BLAS picks its
    kernel and thread split from the shape alone, so one input per shape shows whether the two agree. Larger passes
    run in chunks of at most the returned count (`tiled`), so a few hundred rows is all the speed needs.
    """
    shapes = sorted({(m.in_features, m.out_features, m.weight.dtype, m.weight.device)
                     for m in model.modules() if isinstance(m, nn.Linear)}, key=str)
    if not shapes:
        return 0
    per_row = sum(2 * k * n for k, n, _, _ in shapes)

    def cost(top: int) -> float:
        return per_row * (sum(_probe_counts(top, tile)) + 2 * (2 * top + PLAIN_MIN_ROWS))

    top = max_rows
    while top > 2 * tile and cost(top) > flop_budget:
        top -= tile
    counts = _probe_counts(top, tile)
    if not counts or top < 2 * PLAIN_MIN_ROWS or cost(top) > flop_budget:
        return 0
    top = counts[-1]
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for k, n, dtype, device in shapes:
            layer = nn.Linear(k, n, bias=False, dtype=dtype, device=device)
            layer.weight.copy_(torch.randn(n, k, generator=gen))
            x = torch.randn(2 * top + PLAIN_MIN_ROWS, k, generator=gen).to(dtype=dtype, device=device)
            reference = tiled(layer, x, RowTiles(tile))
            weight = layer.weight.t()
            for count in counts:
                if not torch.equal(torch.mm(x[:count], weight), reference[:count]):
                    return 0
            if not torch.equal(tiled(layer, x, RowTiles(tile, top)), reference):
                return 0
    return top


def _probe_counts(top: int, tile: int) -> list[int]:
    """The row counts plain_rows_verified checks, up to `top`."""
    return [*range(PLAIN_MIN_ROWS, min(top, 2 * tile) + 1), *range(2 * tile + 16, top + 1, 16)]


def check_divisible(config: MDMConfig, world_size: int) -> None:
    """A ValueError naming the field when the heads or the MLP width do not split evenly over the ranks."""
    for name in ("n_heads", "n_kv_heads", "mlp_hidden_size"):
        if getattr(config, name) % world_size:
            raise ValueError(f"{name} ({getattr(config, name)}) must be divisible by the tensor-parallel "
                             f"world size ({world_size})")


def shard_dim(name: str) -> int | None:
    """The dim a parameter is split along over tensor-parallel ranks, or None when every rank holds all of it."""
    parts = name.split(".")
    if "blocks" not in parts or len(parts) < 2:  # wte, ln_f and the LM head (transformer.ff_out) are replicated
        return None
    if parts[-2] in COLUMN_PARALLEL:
        return 0
    if parts[-2] in ROW_PARALLEL:
        return 1
    return None


def shard_weight(name: str, full: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's slice of the full checkpoint tensor `name` (a view; the full tensor itself when replicated).

    Contiguous slices keep GQA intact: rank r holds query heads [r*H/W, (r+1)*H/W) and K/V heads
    [r*K/W, (r+1)*K/W), which are exactly the K/V heads those query heads read.
    """
    return narrow_shard(name, full, shard_dim(name), rank, world_size)


def narrow_shard(name: str, full: Tensor, dim: int | None, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s contiguous 1/world_size slice of `full` along `dim` (all of it when dim is None)."""
    if dim is None or world_size == 1:
        return full
    size = full.shape[dim]
    if size % world_size:
        raise ValueError(f"{name}: dim {dim} of size {size} does not split over {world_size} ranks")
    part = size // world_size
    return full.narrow(dim, rank * part, part)


class LLaDABlock(nn.Module):
    """Pre-norm block; parameter names match LLaDA's checkpoints (q_proj, attn_out, ff_proj, up_proj, ff_out).

    Under tensor parallelism the block holds n_heads/W query heads, n_kv_heads/W K/V heads and
    mlp_hidden_size/W MLP columns; attn_out and ff_out produce partial sums that `tp.all_reduce` adds up.
    """

    def __init__(self, config: MDMConfig, tp: TensorParallel) -> None:
        super().__init__()
        d, hd, w = config.d_model, config.head_dim, tp.world_size
        self.tp = tp
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads // w, config.n_kv_heads // w, hd
        mlp = config.mlp_hidden_size // w
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(self.n_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, mlp, bias=False)
        self.up_proj = nn.Linear(d, mlp, bias=False)
        self.ff_out = nn.Linear(mlp, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, attention: AttentionBackend,
                tile: RowTiles | None = None) -> Tensor:
        rows = x.shape[0]
        h = self.attn_norm(x)
        q = apply_rope(tiled(self.q_proj, h, tile).view(rows, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(tiled(self.k_proj, h, tile).view(rows, self.n_kv_heads, self.head_dim), cos, sin)
        v = tiled(self.v_proj, h, tile).view(rows, self.n_kv_heads, self.head_dim)
        x = x + self.tp.all_reduce(tiled(self.attn_out, attention.attend(layer, q, k, v).reshape(rows, -1), tile))
        h = self.ff_norm(x)
        gated = F.silu(tiled(self.ff_proj, h, tile)) * tiled(self.up_proj, h, tile)
        return x + self.tp.all_reduce(tiled(self.ff_out, gated, tile))


class LLaDAMDM(nn.Module):
    """Masked diffusion transformer over a flat list of rows with explicit positions.

    forward() takes the rows of one pass (any mix of prompt, committed, masked and register
    tokens), an attention backend that knows the step mask and the cache, and the indices of the
    rows whose logits are wanted; the LM head runs only on those rows.

    `tp` shards the blocks Megatron-style over tensor-parallel ranks (see LLaDABlock); the
    embedding, the final norm and the LM head are replicated, so every rank returns the full
    logits. `config` stays the whole model's; `local_kv_heads` is what this rank's KV cache holds.

    Batch invariance: without autograd (every sampler and the served path) the GEMMs run in fixed tiles of
    `row_tile` rows, so a row's logits are the same alone or in any batch; training (autograd on) keeps plain
    GEMMs for speed. `row_tile = None` switches tiling off.
    """

    row_tile: int | None = ROW_TILE
    plain_rows: int = 0  # passes of up to this many rows skip the tiles (verified equal: plain_rows_verified)

    def __init__(self, config: MDMConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        tp = tp if tp is not None else SingleRank()
        check_divisible(config, tp.world_size)
        self.config = config
        self.tp = tp
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config, tp) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
            "ff_out": nn.Linear(config.d_model, config.vocab_size, bias=False),
        })

    @property
    def local_kv_heads(self) -> int:
        """K/V heads this rank computes and caches (n_kv_heads // world_size)."""
        return self.config.n_kv_heads // self.tp.world_size

    def load_shard(self, name: str, full: Tensor) -> Tensor:
        """This rank's slice of the full checkpoint tensor `name`."""
        return shard_weight(name, full, self.tp.rank, self.tp.world_size)

    @property
    def tile(self) -> RowTiles | None:
        """The GEMM row tiles of this call: tiles for inference, plain GEMMs under autograd (training)."""
        if torch.is_grad_enabled() or self.row_tile is None:
            return None
        return RowTiles(self.row_tile, self.plain_rows)

    def hidden_states(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend) -> Tensor:
        t = self.model.transformer
        x = t["wte"](input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        tile = self.tile
        for i, block in enumerate(t["blocks"]):
            x = block(x, cos, sin, i, attention, tile)
        return x

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend | None = None,
                logits_rows: Tensor | None = None) -> Tensor:
        """Returns logits (len(logits_rows), vocab), or for every row when logits_rows is None."""
        x = self.hidden_states(input_ids, positions, attention or SpanAttention(None))
        if logits_rows is not None:
            x = x[logits_rows]
        t = self.model.transformer
        return tiled(t["ff_out"], t["ln_f"](x), self.tile)
