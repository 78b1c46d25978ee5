"""Step-causal attention for a whole flat batch in one fused kernel: FlexAttention with a block mask from the layout."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from sparse_lavida_vllm.model_executor.attention import AttentionBackend
from sparse_lavida_vllm.worker.paged_attention import StepLayout

BACKENDS = ("auto", "sdpa", "flex")
_compiled: Any = None


def flex_kernel(device: torch.device) -> Any:
    """The fused kernel on CUDA (flex_attention through torch.compile, built once); eager elsewhere (tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def choose_backend(requested: str, device: torch.device, batch_invariant: bool) -> str:
    """The attention backend of the unconstrained runner: FlexAttention on CUDA by default, SDPA elsewhere.

    The batch-invariant runner keeps its canonical SDPA call (paged_attention.PagedSpanAttention: one call per layer
    whose per-request reductions do not depend on the batch, bit-identical to the reference samplers); FlexAttention
    packs requests without that guarantee, so "flex" there is a configuration error rather than a silent switch.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "flex" and batch_invariant:
        raise ValueError("attention_backend 'flex' needs batch_invariant: false (a fused kernel over the packed "
                         "batch reduces in an order that depends on the batch)")
    if requested == "auto":
        return "flex" if device.type == "cuda" and not batch_invariant else "sdpa"
    return requested


class FlexPagedAttention(AttentionBackend):
    """Every request of a flat batch in one FlexAttention call per layer, packed without padding.

    Keys are packed per request as [its cached K/V gathered from the pool | its rows]; the block mask keeps
    each query on its own request's keys and applies the step-causal rule (commit rows see the cache and the
    commit rows; every other row sees all of its request's keys), so blocks of other requests are skipped
    by the kernel instead of being computed and masked. Commit rows are written to their pool slots.
    """

    def __init__(self, pool: list[Tensor], layout: StepLayout) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        self.pool = pool
        rows, cache_len, commit = layout.rows, layout.cache_len, layout.num_commit
        device = pool[0].device
        b = rows.numel()
        keys_per = cache_len + rows
        key_start = torch.cumsum(keys_per, 0) - keys_per
        row_start = torch.cumsum(rows, 0) - rows
        total_rows, total_keys = int(rows.sum()), int(keys_per.sum())
        q_req = torch.repeat_interleave(torch.arange(b), rows)
        q_local = torch.arange(total_rows) - row_start[q_req]
        k_req = torch.repeat_interleave(torch.arange(b), keys_per)
        k_local = torch.arange(total_keys) - key_start[k_req]
        k_cached = k_local < cache_len[k_req]
        k_row = k_local - cache_len[k_req]  # index among the request's rows (negative for cached keys)
        # where each packed key comes from: a pool slot (cached) or a row of this pass
        self.cache_keys = k_cached.nonzero().flatten().to(device)
        c = k_local[k_cached]  # cache index of each cached key within its request -> its pool slot
        table = layout.block_table[k_req[k_cached]] if c.numel() else torch.zeros(0, 1, dtype=torch.long)
        self.cache_slots = (table.gather(1, (c // layout.block_size).unsqueeze(1)).squeeze(1) * layout.block_size
                            + c % layout.block_size).to(device)
        self.row_keys = (~k_cached).nonzero().flatten().to(device)
        self.total_keys = total_keys
        j = torch.arange(int(commit.max()) if b else 0)
        writes = j < commit[:, None]
        self.commit_rows = (row_start[:, None] + j)[writes].to(device)
        self.commit_slots = layout.slots(cache_len[:, None] + j)[writes].to(device)

        q_req_d, k_req_d = q_req.to(device), k_req.to(device)
        q_commit = (q_local < commit[q_req]).to(device)
        k_clean = (k_cached | (k_row < commit[k_req])).to(device)  # cached, or a commit row of this pass

        def step_causal(batch: Any, head: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            same = q_req_d[q_idx] == k_req_d[kv_idx]
            return same & (k_clean[kv_idx] | ~q_commit[q_idx])

        self.block_mask = create_block_mask(step_causal, None, None, total_rows, total_keys, device=device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache = self.pool[layer]
        keys = k.new_empty(self.total_keys, *k.shape[1:])
        values = v.new_empty(self.total_keys, *v.shape[1:])
        if self.cache_keys.numel():
            keys[self.cache_keys] = cache[0].index_select(0, self.cache_slots)
            values[self.cache_keys] = cache[1].index_select(0, self.cache_slots)
        keys[self.row_keys] = k
        values[self.row_keys] = v
        if self.commit_rows.numel():  # only C_{k-1} (or the prompt) reaches the pool; masks and registers never do
            cache[0].index_copy_(0, self.commit_slots, k.index_select(0, self.commit_rows))
            cache[1].index_copy_(0, self.commit_slots, v.index_select(0, self.commit_rows))
        with warnings.catch_warnings():  # off CUDA the eager (unfused) path is intended: correctness, not speed
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_kernel(q.device)(q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                                        values.transpose(0, 1).unsqueeze(0), block_mask=self.block_mask,
                                        enable_gqa=q.shape[1] != k.shape[1])
        return out.squeeze(0).transpose(0, 1)
