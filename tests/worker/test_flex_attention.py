"""The fused FlexAttention backend equals per-request SDPA over the paged pool; backend selection rules."""

import pytest
import torch

from sparse_lavida_vllm.diffusion.masks import inference_step_spans
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import random_model
from sparse_lavida_vllm.worker.flex_attention import FlexPagedAttention, choose_backend
from sparse_lavida_vllm.worker.paged_attention import PagedSpanAttention, Segment, StepLayout, request_slots

BLOCK = 4
EMPTY = torch.empty(0, dtype=torch.long)
CONFIG = MDMConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                   mask_token_id=126, register_token_id=127)


def test_backend_selection():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_backend("auto", cuda, batch_invariant=False) == "flex"
    assert choose_backend("auto", cuda, batch_invariant=True) == "sdpa"  # invariance keeps per-request SDPA
    assert choose_backend("auto", cpu, batch_invariant=False) == "sdpa"
    assert choose_backend("flex", cpu, batch_invariant=False) == "flex"
    with pytest.raises(ValueError, match="batch_invariant"):
        choose_backend("flex", cuda, batch_invariant=True)
    with pytest.raises(ValueError, match="attention_backend"):
        choose_backend("xformers", cuda, batch_invariant=False)


def test_flex_equals_per_request_sdpa_and_writes_the_same_cache():
    """Three requests in one pass: one mid-generation (cache + commit rows), one new prompt + decode rows,
    one dense (full attention, nothing cached); GQA (4 query heads over 2 K/V heads)."""
    model = random_model(CONFIG, seed=4, std=0.2)
    gen = torch.Generator().manual_seed(1)
    pool_shape = (2, 16 * BLOCK, CONFIG.n_kv_heads, CONFIG.head_dim)
    pools = [[torch.zeros(pool_shape) for _ in range(CONFIG.n_layers)] for _ in range(2)]
    tables = [[3, 7, 1, 9], [0, 5, 11, 2], []]
    # request 0 already has 6 cached keys: fill them identically in both pools
    cached = request_slots(tables[0], 0, 6, BLOCK)
    for layer in range(CONFIG.n_layers):
        fill = torch.randn(2, 6, CONFIG.n_kv_heads, CONFIG.head_dim, generator=gen)
        for pool in pools:
            pool[layer][:, cached] = fill
    # (ids, positions, cache_len, num_commit)
    r0 = (torch.tensor([20, 21, 126, 126, 126, 127, 127]), torch.tensor([7, 9, 6, 8, 10, 12, 13]), 6, 2)
    r1 = (torch.tensor([30, 31, 32, 33, 126, 126, 127]), torch.tensor([0, 1, 2, 3, 4, 5, 6]), 0, 4)
    r2 = (torch.tensor([40, 41, 126, 126, 42]), torch.arange(5), 0, 0)
    requests = [r0, r1, r2]
    ids = torch.cat([r[0] for r in requests])
    positions = torch.cat([r[1] for r in requests])
    segments, start = [], 0
    for (rid, _, cache_len, n_commit), table in zip(requests, tables):
        n = rid.numel()
        spans = inference_step_spans(cache_len, n, n_commit, n_commit) if table else None
        segments.append(Segment(start, start + n, request_slots(table, 0, cache_len, BLOCK) if table else EMPTY,
                                request_slots(table, cache_len, cache_len + n_commit, BLOCK) if table else EMPTY,
                                spans))
        start += n
    layout = StepLayout(torch.tensor([7, 7, 5]), torch.tensor([6, 0, 0]), torch.tensor([2, 4, 0]),
                        torch.tensor([tables[0], tables[1], [0, 0, 0, 0]]), BLOCK)
    with torch.inference_mode():
        ref = model(ids, positions, PagedSpanAttention(pools[0], segments))
        flex = model(ids, positions, FlexPagedAttention(pools[1], layout))
    assert (flex - ref).abs().max().item() <= 1e-4  # logits of every row (fp32, different reduction order)
    for layer in range(CONFIG.n_layers):
        assert (pools[1][layer] - pools[0][layer]).abs().max().item() <= 1e-5  # same commit rows cached
        assert (pools[1][layer][0].abs().sum((1, 2)) != 0).sum() == 6 + 2 + 4  # only cache + commit slots
