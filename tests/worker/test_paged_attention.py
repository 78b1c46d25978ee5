"""The paged backend computes exactly what the reference contiguous cache computes, and writes only commit rows."""

import pytest
import torch

from sparse_lavida_vllm.diffusion.masks import inference_step_spans
from sparse_lavida_vllm.model_executor.attention import (
    KEY_BLOCK,
    MIN_BLOCK_ROWS,
    ROW_BLOCK,
    KVCache,
    SpanAttention,
    _padded,
    _short_blocks_exact,
    _tail_padding_exact,
    attend_blocks,
    entry_rows,
    entry_sizes,
    key_bucket,
)
from sparse_lavida_vllm.model_executor.weights import random_model
from sparse_lavida_vllm.worker.paged_attention import (
    BatchedPagedAttention,
    PagedSpanAttention,
    Segment,
    StepLayout,
    request_slots,
    slot_ranges,
)
from tests.serving_helpers import TINY

BLOCK = 4
EMPTY = torch.empty(0, dtype=torch.long)


def test_request_slots_follow_the_block_table():
    assert request_slots([7, 2, 5], 2, 9, BLOCK).tolist() == [30, 31, 8, 9, 10, 11, 20]


def test_slot_ranges_equal_request_slots_of_each_request():
    """The runner maps every request's cache and commit slots in one call (slot_ranges), empty ranges included."""
    tables = [[7, 2, 5], [], [1], [4, 0, 3, 6]]
    start, end = torch.tensor([2, 0, 1, 5]), torch.tensor([9, 0, 1, 15])
    got = slot_ranges(tables, start, end, BLOCK)
    assert [g.tolist() for g in got] == [request_slots(t, int(a), int(b), BLOCK).tolist()
                                        for t, a, b in zip(tables, start, end, strict=True)]
    # cut at `cut`: the runner's cached slots and commit slots of every request from one call
    cut = torch.tensor([4, 0, 1, 12])
    halves = slot_ranges(tables, start, end, BLOCK, cut=cut)
    assert [g.tolist() for g in halves] == [request_slots(t, *r, BLOCK).tolist() for t, a, c, b in
                                           zip(tables, start.tolist(), cut.tolist(), end.tolist(), strict=True)
                                           for r in ((a, c), (c, b))]


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


@torch.no_grad()  # the served path runs without autograd (plain GEMMs under autograd vary with the row count)
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
        assert torch.equal(out, alone)


def test_batched_backend_equals_each_request_alone_and_writes_only_commit_rows():
    """The flat mode's one-SDPA-per-layer backend: three unequal requests padded into one call.

    A: new request, its prompt folded in as commit rows (cache empty) + 2 masks + 1 register;
    B: mid-generation, 6 cached tokens, 2 commit rows + 3 masks + 2 registers;
    C: no cache, no commit rows (full attention over its 4 rows, as a dense request).
    """
    model = random_model(TINY, seed=3, std=0.3)
    cfg = model.config
    mask, reg = cfg.mask_token_id, cfg.register_token_id
    kv = [torch.zeros(2, 8 * BLOCK, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layers)]
    b_prompt = torch.tensor([7, 8, 9, 10, 11, 12])
    b_blocks = [5, 0, 3]
    model(b_prompt, torch.arange(6), PagedSpanAttention(kv, [Segment(0, 6, EMPTY, request_slots(b_blocks, 0, 6, BLOCK),
                                                                     None)]), EMPTY)
    kv_before = [t.clone() for t in kv]
    a_ids, a_pos = torch.tensor([4, 5, 6, mask, mask, reg]), torch.tensor([0, 1, 2, 3, 4, 9])
    b_ids, b_pos = torch.tensor([30, 31, mask, mask, mask, reg, reg]), torch.tensor([8, 6, 7, 9, 10, 14, 15])
    c_ids, c_pos = torch.tensor([1, 2, mask, mask]), torch.arange(4)
    layout = StepLayout(rows=torch.tensor([6, 7, 4]), cache_len=torch.tensor([0, 6, 0]),
                        num_commit=torch.tensor([3, 2, 0]), block_table=torch.tensor([[2, 0, 0], b_blocks, [0, 0, 0]]),
                        block_size=BLOCK)
    rows = torch.tensor([3, 4, 8, 9, 10, 15, 16])  # the decode rows of A, B, C
    both = model(torch.cat([a_ids, b_ids, c_ids]), torch.cat([a_pos, b_pos, c_pos]),
                 BatchedPagedAttention(kv, layout), rows)

    # each request alone through the reference cache (A: prefill then step; B: its prompt cached first)
    cache_a = KVCache(cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim)
    model(a_ids[:3], a_pos[:3], SpanAttention(None, cache_a, 3), EMPTY)
    cache_a.advance(3)
    alone_a = model(a_ids[3:], a_pos[3:], SpanAttention(inference_step_spans(3, 3, 0, 0), cache_a, 0),
                    torch.arange(2))
    cache_b = KVCache(cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim)
    model(b_prompt, torch.arange(6), SpanAttention(None, cache_b, 6), EMPTY)
    cache_b.advance(6)
    alone_b = model(b_ids, b_pos, SpanAttention(inference_step_spans(6, 7, 2, 2), cache_b, 2), torch.arange(2, 5))
    cache_b.advance(2)
    alone_c = model(c_ids, c_pos, SpanAttention(None), torch.arange(2, 4))
    assert torch.allclose(both, torch.cat([alone_a, alone_b, alone_c]), atol=1e-5)

    # the pool gains exactly A's prompt (slots of block 2) and B's two commit rows, with the reference's K/V
    a_slots, b_slots = request_slots([2], 0, 3, BLOCK), request_slots(b_blocks, 6, 8, BLOCK)
    for layer in range(cfg.n_layers):
        changed = (kv[layer] != kv_before[layer]).flatten(2).any(-1).any(0).nonzero().flatten()
        assert changed.tolist() == sorted(torch.cat([a_slots, b_slots]).tolist())  # I1: no mask or register
        for plane, ref in ((0, cache_a.k), (1, cache_a.v)):
            assert torch.allclose(kv[layer][plane, a_slots], ref[layer, :, :3].transpose(0, 1), atol=1e-5)
        for plane, ref in ((0, cache_b.k), (1, cache_b.v)):
            assert torch.allclose(kv[layer][plane, b_slots], ref[layer, :, 6:8].transpose(0, 1), atol=1e-5)


def test_batched_backend_one_request_equals_the_reference():
    """Batch of one (the flat mode at concurrency 1): same logits as the reference sampler's step, to rounding."""
    model = random_model(TINY, seed=4, std=0.3)
    cfg = model.config
    kv = [torch.zeros(2, 4 * BLOCK, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layers)]
    prompt = torch.tensor([5, 9, 11, 3, 8])
    ids = torch.cat([prompt, torch.full((3,), cfg.mask_token_id), torch.full((2,), cfg.register_token_id)])
    positions = torch.tensor([0, 1, 2, 3, 4, 6, 5, 7, 8, 9])
    layout = StepLayout(torch.tensor([10]), torch.tensor([0]), torch.tensor([5]), torch.tensor([[3, 1]]), BLOCK)
    flat = model(ids, positions, BatchedPagedAttention(kv, layout), torch.arange(5, 8))
    cache = KVCache(cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim)
    model(prompt, torch.arange(5), SpanAttention(None, cache, 5), EMPTY)
    cache.advance(5)
    ref = model(ids[5:], positions[5:], SpanAttention(inference_step_spans(5, 5, 0, 0), cache, 0), torch.arange(3))
    assert torch.allclose(flat, ref, atol=1e-5)


def _bucket_widths() -> list[int]:
    """Every key bucket up to three key blocks (the buckets a step can pad a request to)."""
    return sorted({key_bucket(n) for n in range(1, 3 * KEY_BLOCK + 1)})


@pytest.mark.parametrize("threads", [1, 2])
def test_padding_a_request_s_keys_to_any_larger_bucket_changes_no_bit(threads):
    """The fact PagedSpanAttention's one call rests on: a request's canonical call (its keys padded to its own
    key_bucket) gives the same bits with its keys padded to any larger bucket (what a step pads to when another
    request has more keys), for every real key count, mask density, head count and head size tried, GQA included."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _tail_padding_exact("cpu", threads)  # the measured rule holds here: no fallback to whole blocks
        widths = _bucket_widths()
        gen = torch.Generator().manual_seed(0)
        for num_keys in [*range(1, 3 * KEY_BLOCK, 89), 192, 193, 383, 384, 512, 513, 1024]:
            heads, kv_heads, dim = ((4, 4, 32), (6, 3, 64), (2, 2, 128))[num_keys % 3]
            q = torch.randn(1, ROW_BLOCK, heads, dim, generator=gen)
            k, v = (torch.randn(1, num_keys, kv_heads, dim, generator=gen) for _ in range(2))
            allowed = torch.rand(ROW_BLOCK, num_keys, generator=gen) < (0.3, 0.9)[num_keys % 2]
            allowed[:, 0] = True
            own = attend_blocks(*_padded(q, k, v, allowed, key_bucket(num_keys)))
            larger = [w for w in widths if w > key_bucket(num_keys)]
            for width in larger[:4] + larger[4::5]:  # the next few buckets, then a sample up to three blocks
                assert torch.equal(attend_blocks(*_padded(q, k, v, allowed, width)), own), (num_keys, width)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_request_s_rows_give_the_same_bits_in_entries_of_any_allowed_size(threads):
    """The other half: a step cuts every request into entries of one size that entry_rows picks for the step's row
    counts, the reference by its own; every allowed size (4 to 160 rows, a tail block of 0 or at least 4 rows past
    each 32) gives a request's rows the same bits, with rows past the request zero-padded. (Blocks of 1-3 rows did
    not when measured: MKL takes another path for them, so no entry leaves such a tail.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _short_blocks_exact("cpu", threads)  # the measured rule holds here: no fallback to multiples of 32
        sizes = entry_sizes()
        assert ROW_BLOCK in sizes and MIN_BLOCK_ROWS in sizes and MIN_BLOCK_ROWS - 1 not in sizes
        assert all(n % ROW_BLOCK == 0 or n % ROW_BLOCK >= MIN_BLOCK_ROWS for n in sizes)
        gen = torch.Generator().manual_seed(2)
        for rows, num_keys in ((150, 300), (33, 40), (7, 700), (161, 200)):
            q = torch.randn(1, rows, 4, 32, generator=gen)
            k, v = (torch.randn(1, num_keys, 2, 32, generator=gen) for _ in range(2))
            allowed = torch.rand(rows, num_keys, generator=gen) < 0.6
            allowed[:, 0] = True
            width = key_bucket(num_keys)
            outs = {per_entry: attend_blocks(*_padded(q, k, v, allowed, width, per_entry)).flatten(0, 1)[:rows]
                    for per_entry in [ROW_BLOCK, *sizes[::3], *sizes[-8:]]}
            assert all(torch.equal(out, outs[ROW_BLOCK]) for out in outs.values()), (rows, num_keys)
    finally:
        torch.set_num_threads(old)


def test_entry_rows_picks_the_cheapest_allowed_size():
    """Equal requests fill their entries exactly (no padded query row); a long request takes several entries."""
    assert entry_rows([12] * 32) == 12
    assert entry_rows([42] * 8) == 42
    assert entry_rows([1]) == MIN_BLOCK_ROWS
    assert entry_rows([1000]) == 143  # 7 entries, one padded row
    for rows in ([12, 26, 40], [3, 160, 7], [33], [500, 20]):
        assert entry_rows(rows) in entry_sizes()


def test_key_buckets_are_closed_under_max_and_avoid_the_split_window():
    widths = _bucket_widths()
    for width in widths:
        assert key_bucket(width) == width  # a step pads to the largest bucket: itself a bucket
        tail = (width - 1) % KEY_BLOCK + 1
        assert tail % 16 == 0 and not 192 < tail < 384
    assert key_bucket(1) == 16 and key_bucket(200) == 384 and key_bucket(600) == KEY_BLOCK + 96


@torch.no_grad()  # the served path runs without autograd
def test_per_slot_modality_equals_modality_attention_alone_and_batched():
    """LaViDa-O's split layers over the paged pool (PagedModalityAttention: a modality flag per slot, written with
    the commit rows' K/V) == ModalityAttention over a ModalKVCache, bit for bit; a text request batched with an image
    request keeps its own joint arithmetic."""
    from sparse_lavida_vllm.model_executor.lavida_o_model import ModalKVCache
    from sparse_lavida_vllm.model_executor.lavida_o_weights import random_lavida_o
    from tests.model_executor.test_lavida_o_model import tiny_config

    model = random_lavida_o(tiny_config(), seed=3, std=0.3)
    cfg = model.config
    assert cfg.first_split_layer < cfg.n_layers
    prompt = torch.tensor([5, 9, 11, 3, 8])
    g = torch.Generator().manual_seed(4)
    committed = torch.randint(0, 16, (3, 4), generator=g)  # C_{k-1}: three clean image positions
    codes = torch.cat([committed, torch.full((4, 4), cfg.mask_code), torch.full((3, 4), cfg.register_code)])
    positions = torch.tensor([5, 9, 13, 6, 7, 8, 10, 21, 22, 23])
    spans = inference_step_spans(5, 10, 3)
    rows = torch.arange(10)

    cache = ModalKVCache(cfg.n_layers, 20, cfg.n_kv_heads, cfg.head_dim)
    model(prompt, torch.arange(5), SpanAttention(None, cache, 5), EMPTY)
    cache.advance(5)
    ref = model.image_logits(torch.zeros_like(rows), positions, SpanAttention(spans, cache, 3), rows[3:7], rows, codes)
    cache.advance(3)

    slots = 8 * BLOCK
    kv = [torch.zeros(2, slots, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layers)]
    flags = torch.ones(slots, dtype=torch.bool)  # stale flags of a reused block must be overwritten
    blocks = [5, 2, 7]
    model(prompt, torch.arange(5), PagedSpanAttention(kv, [Segment(0, 5, EMPTY, request_slots(blocks, 0, 5, BLOCK),
                                                                   None)], flags), EMPTY)
    seg = Segment(0, 10, request_slots(blocks, 0, 5, BLOCK), request_slots(blocks, 5, 8, BLOCK), spans)
    paged = model.image_logits(torch.zeros_like(rows), positions, PagedSpanAttention(kv, [seg], flags), rows[3:7],
                               rows, codes)
    assert torch.equal(paged, ref)
    written = request_slots(blocks, 0, 8, BLOCK)
    assert torch.equal(flags[written], cache.is_image[:8])  # prompt text, then the three image commit rows
    for layer in range(cfg.n_layers):
        assert torch.equal(kv[layer][0, written], cache.k[layer, :, :8].transpose(0, 1))

    # the same image step batched after a text request's step (its own blocks): each equals itself alone
    text_prompt = torch.tensor([7, 8, 9, 10])
    text_cache = ModalKVCache(cfg.n_layers, 20, cfg.n_kv_heads, cfg.head_dim)
    model(text_prompt, torch.arange(4), SpanAttention(None, text_cache, 4), EMPTY)
    text_cache.advance(4)
    text_ids = torch.tensor([12, cfg.mask_token_id, cfg.mask_token_id])
    text_spans = inference_step_spans(4, 3, 1)
    text_alone = model(text_ids, torch.tensor([4, 5, 6]), SpanAttention(text_spans, text_cache, 1),
                       torch.tensor([1, 2]))

    kv = [torch.zeros(2, slots, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layers)]
    flags = torch.zeros(slots, dtype=torch.bool)
    image_blocks, text_blocks = [3, 6], [1, 0]
    model(torch.cat([text_prompt, prompt]), torch.cat([torch.arange(4), torch.arange(5)]), PagedSpanAttention(kv, [
        Segment(0, 4, EMPTY, request_slots(text_blocks, 0, 4, BLOCK), None),
        Segment(4, 9, EMPTY, request_slots(image_blocks, 0, 5, BLOCK), None)], flags), EMPTY)
    step = [Segment(0, 3, request_slots(text_blocks, 0, 4, BLOCK), request_slots(text_blocks, 4, 5, BLOCK),
                    text_spans),
            Segment(3, 13, request_slots(image_blocks, 0, 5, BLOCK), request_slots(image_blocks, 5, 8, BLOCK),
                    spans)]
    x_text, x_image, text_rows, _ = model.hidden_states(
        torch.cat([text_ids, torch.zeros(10, dtype=torch.long)]), torch.cat([torch.tensor([4, 5, 6]), positions]),
        PagedSpanAttention(kv, step, flags), 3 + rows, codes)
    assert torch.equal(model.text_head(x_text[1:3]), text_alone)
    assert torch.equal(model.image_head(x_image[3:7]), ref)
