"""The paged backend computes exactly what the reference contiguous cache computes, and writes only commit rows."""

import torch

from sparse_lavida_vllm.diffusion.masks import inference_step_spans
from sparse_lavida_vllm.model_executor.attention import KVCache, SpanAttention
from sparse_lavida_vllm.model_executor.weights import random_model
from sparse_lavida_vllm.worker.paged_attention import PagedSpanAttention, Segment, request_slots
from tests.serving_helpers import TINY

BLOCK = 4
EMPTY = torch.empty(0, dtype=torch.long)


def test_request_slots_follow_the_block_table():
    assert request_slots([7, 2, 5], 2, 9, BLOCK).tolist() == [30, 31, 8, 9, 10, 11, 20]


def test_paged_equals_reference_bit_for_bit():
    model = random_model(TINY, seed=1, std=0.3)
    cfg = model.config
    prompt = torch.tensor([5, 9, 11, 3, 8, 14])
    # step: commit 3 tokens (C_{k-1}, in decode order), decode 5 masks, 2 registers
    ids = torch.cat([torch.tensor([20, 21, 22]), torch.full((5,), cfg.mask_token_id),
                     torch.full((2,), cfg.register_token_id)])
    positions = torch.tensor([10, 7, 13, 6, 8, 9, 11, 12, 14, 15])
    spans = inference_step_spans(6, ids.numel(), 3, 3)
    rows = torch.arange(3, 8)

    cache = KVCache(cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim)
    model(prompt, torch.arange(6), SpanAttention(None, cache, 6), EMPTY)
    cache.advance(6)
    ref = model(ids, positions, SpanAttention(spans, cache, 3), rows)
    cache.advance(3)

    kv = [torch.zeros(2, 8 * BLOCK, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layers)]
    blocks = [6, 1, 3]  # scattered and out of order, as the block pool hands them out
    model(prompt, torch.arange(6), PagedSpanAttention(kv, [Segment(0, 6, EMPTY, request_slots(blocks, 0, 6, BLOCK),
                                                                   None)]), EMPTY)
    seg = Segment(0, ids.numel(), request_slots(blocks, 0, 6, BLOCK), request_slots(blocks, 6, 9, BLOCK), spans)
    paged = model(ids, positions, PagedSpanAttention(kv, [seg]), rows)

    assert torch.equal(paged, ref)
    slots = request_slots(blocks, 0, 9, BLOCK)
    for layer in range(cfg.n_layers):
        assert torch.equal(kv[layer][0, slots], cache.k[layer, :, :9].transpose(0, 1))
        assert torch.equal(kv[layer][1, slots], cache.v[layer, :, :9].transpose(0, 1))
    # I1: masks and registers never reach the pool: only prompt + commit slots hold data
    written = (kv[0][0].abs().sum((1, 2)) != 0).nonzero().flatten().tolist()
    assert written == sorted(slots.tolist())


def test_two_requests_in_one_flat_batch_attend_only_to_their_own_cache():
    model = random_model(TINY, seed=2, std=0.3)
    cfg = model.config
    kv = [torch.zeros(2, 8 * BLOCK, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layers)]
    a, b = torch.tensor([4, 5, 6]), torch.tensor([7, 8, 9, 10, 11])
    segs = [Segment(0, 3, EMPTY, request_slots([2], 0, 3, BLOCK), None),
            Segment(3, 8, EMPTY, request_slots([5, 0], 0, 5, BLOCK), None)]
    model(torch.cat([a, b]), torch.cat([torch.arange(3), torch.arange(5)]), PagedSpanAttention(kv, segs), EMPTY)
    masks = torch.full((2,), cfg.mask_token_id)
    step = [Segment(0, 2, request_slots([2], 0, 3, BLOCK), EMPTY, inference_step_spans(3, 2, 0, 0)),
            Segment(2, 4, request_slots([5, 0], 0, 5, BLOCK), EMPTY, inference_step_spans(5, 2, 0, 0))]
    both = model(torch.cat([masks, masks]), torch.tensor([3, 4, 5, 6]), PagedSpanAttention(kv, step),
                 torch.arange(4))
    # each request alone, through the reference cache
    for prompt, out in ((a, both[:2]), (b, both[2:])):
        cache = KVCache(cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim)
        model(prompt, torch.arange(len(prompt)), SpanAttention(None, cache, len(prompt)), EMPTY)
        cache.advance(len(prompt))
        alone = model(masks, torch.arange(len(prompt), len(prompt) + 2),
                      SpanAttention(inference_step_spans(len(prompt), 2, 0, 0), cache, 0), torch.arange(2))
        assert torch.allclose(out, alone, atol=1e-5)
