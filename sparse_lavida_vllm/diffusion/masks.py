"""Step-causal attention masks: Algorithm 1 (training) and the one-step inference mask.

Every mask here has two forms: a dense boolean matrix (for tests and small SDPA calls) and a
compact *span* form, a (rows, 2, 2) integer tensor holding two half-open key intervals per query
row. A row may attend to key j iff start0 <= j < end0 or start1 <= j < end1. Spans let a kernel
apply the mask without materialising a (L+S)^2 matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


def step_causal_mask(blocks: Tensor, num_clean_blocks: int, num_masked_blocks: int) -> Tensor:
    """Algorithm 1 of the paper: the training-time step-causal mask from block assignments.

    `blocks[i]` is the block number of token i: 0 for the prompt, 1..M for clean tokens,
    M+1..M+N for masked tokens and their register copies. Returns bool (T, T), True = may attend.
    """
    m, n = num_clean_blocks, num_masked_blocks
    if m < 0 or n < 0:
        raise ValueError(f"num_clean_blocks and num_masked_blocks must be >= 0, got {m}, {n}")
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) > m + n):
        raise ValueError(f"blocks must lie in [0, {m + n}], got [{int(blocks.min())}, {int(blocks.max())}]")
    qb = blocks.view(-1, 1)
    kb = blocks.view(1, -1)
    prompt_q = (qb == 0) & (kb <= 0)
    clean_q = (qb >= 1) & (qb <= m) & (kb <= qb)
    masked_q = (qb > m) & ((kb <= m) | (kb == qb))
    return prompt_q | clean_q | masked_q


def step_causal_spans(blocks: Tensor, num_clean_blocks: int) -> Tensor:
    """The Algorithm 1 mask in span form; `blocks` must be sorted ascending.

    Sorting loses nothing: tokens carry explicit RoPE position ids, so their order in the packed
    sequence is free. A prompt/clean row sees the prefix up to the end of its block; a masked row
    sees the prompt + clean prefix and its own block.
    """
    if blocks.numel() > 1 and bool((blocks[1:] < blocks[:-1]).any()):
        raise ValueError("blocks must be sorted ascending for the span form")
    m = num_clean_blocks
    block_end = torch.searchsorted(blocks, blocks, right=True)
    block_start = torch.searchsorted(blocks, blocks, right=False)
    clean_end = torch.searchsorted(blocks, torch.tensor(m, dtype=blocks.dtype), right=True)
    spans = torch.zeros(blocks.numel(), 2, 2, dtype=torch.long)
    is_masked = blocks > m
    spans[:, 0, 1] = torch.where(is_masked, clean_end, block_end)
    spans[:, 1, 0] = torch.where(is_masked, block_start, 0)
    spans[:, 1, 1] = torch.where(is_masked, block_end, 0)
    return spans


def inference_step_spans(cache_len: int, num_rows: int, num_commit: int, num_clean: int | None = None) -> Tensor:
    """Span form of one sparse decoding step for one request.

    Keys are laid out as [cache (cache_len) | this step's rows (num_rows)]. Rows are ordered
    [commit C_{k-1} | other clean rows | decode C_k | registers]. Commit rows will be cached, so
    they see only clean keys (cache + the first `num_clean` rows); every other row sees all keys.
    `num_clean` defaults to `num_commit` (all clean context is cached).
    """
    clean = num_commit if num_clean is None else num_clean
    if not 0 <= num_commit <= clean <= num_rows:
        raise ValueError(f"need 0 <= num_commit ({num_commit}) <= num_clean ({clean}) <= num_rows ({num_rows})")
    spans = torch.zeros(num_rows, 2, 2, dtype=torch.long)
    spans[:, 0, 1] = cache_len + num_rows
    spans[:num_commit, 0, 1] = cache_len + clean
    return spans


def spans_to_mask(spans: Tensor, num_keys: int) -> Tensor:
    """Materialise a span description as a bool (rows, num_keys) mask."""
    j = torch.arange(num_keys, device=spans.device).view(1, -1)
    first = (j >= spans[:, 0, 0:1]) & (j < spans[:, 0, 1:2])
    second = (j >= spans[:, 1, 0:1]) & (j < spans[:, 1, 1:2])
    return first | second


def build_step_causal_sequence(prompt_ids: Tensor, response_ids: Tensor, clean_blocks: list[Tensor],
                               masked_blocks: list[Tensor], num_registers: int, mask_token_id: int,
                               register_token_id: int) -> dict[str, Tensor | list[Tensor]]:
    """Pack one Algorithm 1 training/oracle sequence, sorted by block number.

    prompt (block 0, positions 0..P-1) | clean block i (i = 1..M, response positions with their
    true tokens) | masked block M+j (mask tokens) followed by its `num_registers` register copies
    (positions P+L .. P+L+m-1). Returns ids, positions, blocks, spans and, per masked block, the
    row indices of its mask tokens (where the logits are read).
    """
    if num_registers < 0:
        raise ValueError(f"num_registers must be >= 0, got {num_registers}")
    p, length = prompt_ids.numel(), response_ids.numel()
    device = prompt_ids.device
    ids = [prompt_ids]
    positions = [torch.arange(p, device=device)]
    blocks = [torch.zeros(p, dtype=torch.long, device=device)]
    for i, pos in enumerate(clean_blocks, start=1):
        ids.append(response_ids[pos])
        positions.append(p + pos)
        blocks.append(torch.full((pos.numel(),), i, dtype=torch.long, device=device))
    m = len(clean_blocks)
    register_pos = torch.arange(p + length, p + length + num_registers, device=device)
    masked_rows = []
    row = sum(x.numel() for x in ids)
    for j, pos in enumerate(masked_blocks, start=m + 1):
        ids.append(torch.full((pos.numel(),), mask_token_id, dtype=torch.long, device=device))
        ids.append(torch.full((num_registers,), register_token_id, dtype=torch.long, device=device))
        positions += [p + pos, register_pos]
        blocks.append(torch.full((pos.numel() + num_registers,), j, dtype=torch.long, device=device))
        masked_rows.append(torch.arange(row, row + pos.numel(), device=device))
        row += pos.numel() + num_registers
    block_ids = torch.cat(blocks)
    return {
        "ids": torch.cat(ids),
        "positions": torch.cat(positions),
        "blocks": block_ids,
        "spans": step_causal_spans(block_ids.cpu(), m),
        "num_clean_blocks": m,
        "masked_rows": masked_rows,
    }
