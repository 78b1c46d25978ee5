"""The performance paths equal the plain ones: SpanAttention's in-cache keys == the materialised span mask."""

from __future__ import annotations

import torch

from sparse_lavida_vllm.diffusion.masks import inference_step_spans, spans_to_mask
from sparse_lavida_vllm.model_executor.attention import KVCache, SpanAttention, sdpa_with_mask


def test_span_attention_fast_path_equals_the_masked_path():
    gen = torch.Generator().manual_seed(0)
    layers, heads, dim, cache_len, rows, commit, clean = 2, 4, 16, 9, 11, 3, 5
    for layer in range(layers):
        cache = KVCache(layers, cache_len + rows + 4, heads, dim)
        cache.k[:, :, :cache_len] = torch.randn(layers, heads, cache_len, dim, generator=gen)
        cache.v[:, :, :cache_len] = torch.randn(layers, heads, cache_len, dim, generator=gen)
        cache.advance(cache_len)
        q, k, v = (torch.randn(rows, heads, dim, generator=gen) for _ in range(3))
        spans = inference_step_spans(cache_len, rows, commit, clean)
        fast = SpanAttention(spans, cache, commit).attend(layer, q, k, v)
        keys = torch.cat([cache.k[layer, :, :cache_len], k.transpose(0, 1)], dim=1)
        values = torch.cat([cache.v[layer, :, :cache_len], v.transpose(0, 1)], dim=1)
        masked = sdpa_with_mask(q.transpose(0, 1), keys, values, spans_to_mask(spans, cache_len + rows))
        assert (fast - masked.transpose(0, 1)).abs().max().item() <= 1e-6
        # the commit rows landed in the cache right after the cached prefix
        assert torch.equal(cache.k[layer, :, cache_len:cache_len + commit], k[:commit].transpose(0, 1))


def test_full_cache_falls_back_to_copying_keys():
    cache = KVCache(1, 6, 1, 4)
    cache.advance(4)
    q = k = v = torch.randn(3, 1, 4)
    spans = inference_step_spans(4, 3, 1)
    out = SpanAttention(spans, cache, 1).attend(0, q, k, v)  # 4 + 3 > 6: no room for scratch rows
    assert out.shape == (3, 1, 4) and torch.isfinite(out).all()
    assert torch.equal(cache.k[0, :, 4:5], k[:1].transpose(0, 1))
