"""Batch invariance: one forward per engine step for every request, and each request's tokens equal its solo run."""

import pytest
import torch
from torch import Tensor

from sparse_lavida_vllm.model_executor.model import ROW_TILE, RowTiles, plain_rows_verified, tiled
from tests.serving_helpers import engine_scheduler, reference_tokens, set_vllm_env, shared_llm

set_vllm_env()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tile", [32, ROW_TILE])
def test_tiled_gemm_rows_do_not_depend_on_their_neighbours(threads, tile):
    """The model's inference GEMMs: a row gives the same bits alone, at any offset, in any batch size."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        # (1152, 384): plain GEMMs vary here; (1024, 2048): a batched GEMM over the tiles varies here with 2 threads
        for k, n in ((128, 384), (1152, 384), (384, 1152), (256, 2048), (1024, 2048)):
            layer = torch.nn.Linear(k, n, bias=False)
            x = torch.randn(700, k, generator=gen)
            with torch.no_grad():
                together = tiled(layer, x, RowTiles(tile))
                for start, rows in ((0, 1), (5, 3), (40, 17), (100, 64), (300, 129), (0, 700)):
                    part = tiled(layer, x[start:start + rows], RowTiles(tile))
                    assert torch.equal(part, together[start:start + rows])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
def test_plain_gemms_skip_the_tiles_only_where_they_give_every_row_its_tiles_bits(threads):
    """plain_rows_verified's promise: passes that run plain GEMMs (one call up to its row count, equal chunks above)
    give each row the bits of the tiled pass (checked here at other row counts than its own probe's, on other inputs
    and weights)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(1)
        for k, n in ((128, 384), (384, 128), (256, 2048)):
            model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
            # 128: passes above it run in plain chunks (2-5 here), 512: most passes are one plain GEMM
            for max_rows in (128, 512):
                plain = plain_rows_verified(model, max_rows=max_rows)
                assert plain == 0 or 2 * ROW_TILE <= plain <= max_rows
                layer, x = model[0], torch.randn(600, k, generator=gen)
                with torch.no_grad():
                    together = tiled(layer, x, RowTiles())
                    for rows in (16, 23, 77, 129, 201, 333, 511, 600):
                        part = tiled(layer, x[:rows], RowTiles(plain_up_to=plain))
                        assert torch.equal(part, together[:rows]), (k, n, rows, plain)
    finally:
        torch.set_num_threads(old)


def test_runner_switches_take_only_true_or_false():
    from sparse_lavida_vllm.worker.model_runner import config_flag

    assert config_flag({}, "plain_gemm", True) is True
    assert config_flag({"batch_invariant": False}, "batch_invariant", True) is False
    for bad in ("false", 0, None):
        with pytest.raises(ValueError, match="plain_gemm must be true or false"):
            config_flag({"plain_gemm": bad}, "plain_gemm", True)


def _params(gen_length, block_length, steps, num_registers, seed, sparse=True, temperature=1.0):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=gen_length, temperature=temperature, seed=seed, ignore_eos=True,
                          extra_args={"gen_length": gen_length, "block_length": block_length, "steps": steps,
                                      "num_registers": num_registers, "sparse": sparse})


# (prompt, gen_length, block_length, steps, registers, sparse): sampled at temperature 1, so a changed logit
# anywhere would change the draw
REQUESTS = [
    ([11, 12, 13], 16, 8, 8, 4, True), ([21] * 9, 8, 4, 4, 0, True), ([31, 32], 24, 8, 12, 2, True),
    ([41, 42, 43, 44], 16, 16, 4, 1, False), ([51, 52, 53, 54, 55], 12, 4, 6, 3, True),
    ([61] * 6, 32, 8, 16, 4, True), ([71, 72, 73], 8, 8, 8, 0, False), ([81, 82, 83], 20, 4, 10, 2, True),
]


def test_eight_requests_joining_at_different_steps_equal_their_solo_runs_in_one_forward_per_step():
    from vllm.inputs import TokensPrompt

    llm, folder = shared_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    model = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        finished, forwards_per_step = {}, []
        for i, (prompt, *knobs) in enumerate(REQUESTS):
            engine.add_request(f"b{i}", TokensPrompt(prompt_token_ids=prompt), _params(*knobs[:4], seed=i,
                                                                                        sparse=knobs[4]))
            for _ in range(i % 3):  # the next request joins one, two or three engine steps later
                calls.clear()
                for out in engine.step():
                    finished[out.request_id] = out
                forwards_per_step.append(len(calls))
        while engine.has_unfinished_requests():
            calls.clear()
            for out in engine.step():
                finished[out.request_id] = out
            forwards_per_step.append(len(calls))
    finally:
        hook.remove()
    assert max(sched.batch_sizes[-len(forwards_per_step):]) >= 5  # many requests really shared steps
    assert set(forwards_per_step) <= {0, 1}  # one model call per engine step (0: every request still queued)
    for i, (prompt, gen_length, block_length, steps, registers, sparse) in enumerate(REQUESTS):
        together = list(finished[f"b{i}"].outputs[0].token_ids)
        alone = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                             [_params(gen_length, block_length, steps, registers, seed=i, sparse=sparse)],
                             use_tqdm=False)[0]
        assert together == list(alone.outputs[0].token_ids), f"b{i}"
        assert together == reference_tokens(folder, prompt, gen_length, block_length, steps, registers, sparse=sparse,
                                             temperature=1.0, seed=i), f"b{i}"
    assert sched.num_free_blocks() == sched.num_blocks_total


def test_text_and_guided_image_requests_joining_at_different_steps_equal_the_reference():
    """Eight requests of mixed kinds, joining at once or one engine step apart: text (sparse and dense, other
    lengths) and images with CFG companions (sparse and dense guidance, a three-way edit). Every engine step is one
    forward with one attention call per layer, and each request's tokens equal the reference sampler's alone."""
    from vllm.inputs import TokensPrompt

    import sparse_lavida_vllm.worker.paged_attention as paged
    from tests.scheduler.test_images import CASES, PROMPT, params, reference

    llm, folder = shared_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    images = dict(CASES)
    mixed = [("text", REQUESTS[0]), ("image", "cfg"), ("text", REQUESTS[3]), ("image", "cfg_dense"),
             ("text", REQUESTS[5]), ("image", "edit_3way"), ("text", REQUESTS[2]), ("image", "plain")]
    calls: list[int] = []
    one_call = paged.attend_blocks
    paged.attend_blocks = lambda *args: calls.append(1) or one_call(*args)
    try:
        finished, calls_per_step = {}, []

        def step() -> None:
            calls.clear()
            for out in engine.step():
                finished[out.request_id] = out
            calls_per_step.append(len(calls))

        for i, (kind, request) in enumerate(mixed):
            if kind == "text":
                prompt, gen_length, block_length, steps, registers, sparse = request
                engine.add_request(f"m{i}", TokensPrompt(prompt_token_ids=prompt),
                                   _params(gen_length, block_length, steps, registers, seed=i, sparse=sparse))
            else:
                engine.add_request(f"m{i}", TokensPrompt(prompt_token_ids=PROMPT), params(images[request], seed=i))
            for _ in range(i % 2):  # the next request joins at once or one engine step later
                step()
        while engine.has_unfinished_requests():
            step()
    finally:
        paged.attend_blocks = one_call
    assert max(sched.batch_sizes[-len(calls_per_step):]) >= 6  # requests and companions really shared steps
    assert set(calls_per_step) <= {0, runner.model.config.n_layers}  # one call per layer per engine step
    for i, (kind, request) in enumerate(mixed):
        tokens = list(finished[f"m{i}"].outputs[0].token_ids)
        if kind == "text":
            prompt, gen_length, block_length, steps, registers, sparse = request
            expected = reference_tokens(folder, prompt, gen_length, block_length, steps, registers, sparse=sparse,
                                        temperature=1.0, seed=i)
        else:
            expected = reference(folder, images[request], i)
        assert tokens == expected, (i, kind, request)
    assert sched.num_free_blocks() == sched.num_blocks_total


def test_a_request_s_logits_are_the_same_bits_alone_and_beside_others():
    """At the logits level, on a wider model (d 384, MLP 1152: shapes where one plain GEMM over all rows varies
    with the row count): request A alone == A packed after two other requests in one forward, and the prompt
    folded into A's first step == a separate prefill pass followed by the step (the reference's order)."""
    from sparse_lavida_vllm.diffusion.masks import inference_step_spans
    from sparse_lavida_vllm.model_executor.attention import KVCache, SpanAttention
    from sparse_lavida_vllm.model_executor.config import MDMConfig
    from sparse_lavida_vllm.model_executor.weights import random_model
    from sparse_lavida_vllm.worker.paged_attention import PagedSpanAttention, Segment, request_slots

    config = MDMConfig(vocab_size=512, d_model=384, n_layers=2, n_heads=6, n_kv_heads=6, mlp_hidden_size=1152,
                       mask_token_id=510, register_token_id=511)
    model = random_model(config, seed=3, std=0.05)
    empty = torch.empty(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)

    def request(p: int, n_decode: int, regs: int):
        prompt = torch.randint(5, 500, (p,), generator=gen)
        ids = torch.cat([prompt, torch.full((n_decode,), 510), torch.full((regs,), 511)])
        positions = torch.cat([torch.arange(p), p + torch.randperm(n_decode + 4, generator=gen)[:n_decode],
                               torch.arange(p + n_decode + 4, p + n_decode + 4 + regs)])
        return ids, positions, p, n_decode

    def pool():
        return [torch.zeros(2, 64 * 16, config.n_kv_heads, config.head_dim) for _ in range(config.n_layers)]

    a, b, c = request(7, 5, 3), request(20, 9, 8), request(3, 2, 0)
    with torch.inference_mode():
        # A after B and C in one forward, each a segment of its own (its own blocks), prompts folded in
        kv, ids, positions, segments, rows, start = pool(), [], [], [], [], 0
        for k, (r_ids, r_pos, p, n_decode) in enumerate((b, c, a)):
            n = r_ids.numel()
            blocks = [10 * k + j for j in range(4)]
            segments.append(Segment(start, start + n, empty, request_slots(blocks, 0, p, 16),
                                    inference_step_spans(0, n, p, p)))
            ids.append(r_ids)
            positions.append(r_pos)
            rows.append(torch.arange(start + p, start + p + n_decode))
            start += n
        batched = model(torch.cat(ids), torch.cat(positions), PagedSpanAttention(kv, segments), torch.cat(rows))
        a_batched = batched[-a[3]:]
        # A alone, prompt folded into the step
        r_ids, r_pos, p, n_decode = a
        alone = model(r_ids, r_pos, PagedSpanAttention(pool(), [Segment(0, r_ids.numel(), empty,
                                                                        request_slots([3, 4], 0, p, 16),
                                                                        inference_step_spans(0, r_ids.numel(), p, p))]),
                      torch.arange(p, p + n_decode))
        # A as the reference sampler runs it: a prefill pass into a contiguous cache, then the step
        cache = KVCache(config.n_layers, 64, config.n_kv_heads, config.head_dim)
        model(r_ids[:p], r_pos[:p], SpanAttention(None, cache, p), empty)
        cache.advance(p)
        step = r_ids[p:]
        reference = model(step, r_pos[p:], SpanAttention(inference_step_spans(p, step.numel(), 0, 0), cache, 0),
                          torch.arange(n_decode))
    assert torch.equal(a_batched, alone)
    assert torch.equal(alone, reference)


@pytest.mark.parametrize("threads", [1, 2])
def test_every_request_s_logits_and_cache_writes_are_the_same_bits_in_batches_of_any_size(threads, monkeypatch):
    """The invariant forward (tiled GEMMs; PagedSpanAttention's one gather and ONE SDPA call per layer for the whole
    pass): each request of a pass gives the logits and writes the pool values it gives alone, in batches of 2, 3 and
    8 requests (mixed cache lengths, commit rows, registers, dense requests, more than one query block, keys past
    one 512-key block, pairs of one shape), with 1 and 2 threads, on shapes where one plain GEMM over all rows
    varies with the row count."""
    import sparse_lavida_vllm.worker.paged_attention as paged
    from sparse_lavida_vllm.diffusion.masks import inference_step_spans
    from sparse_lavida_vllm.model_executor.config import MDMConfig
    from sparse_lavida_vllm.model_executor.weights import random_model
    from sparse_lavida_vllm.worker.paged_attention import PagedSpanAttention, Segment, request_slots

    config = MDMConfig(vocab_size=512, d_model=384, n_layers=2, n_heads=6, n_kv_heads=3, mlp_hidden_size=1152,
                       mask_token_id=510, register_token_id=511)
    model = random_model(config, seed=4, std=0.05)
    empty = torch.empty(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    # (cached prompt, commit rows, decode rows, registers); None: a dense request (full attention, nothing cached)
    shapes = [(7, 2, 5, 3), (20, 0, 9, 8), (3, 3, 2, 0), (12, 1, 30, 4), (540, 2, 17, 32), None, (7, 2, 5, 3), None]
    requests = []
    for k, shape in enumerate(shapes):
        if shape is None:
            requests.append((k, torch.randint(5, 500, (10,), generator=gen), None))
            continue
        p, n_commit, n_decode, regs = shape
        ids = torch.cat([torch.randint(5, 500, (p + n_commit,), generator=gen), torch.full((n_decode,), 510),
                         torch.full((regs,), 511)])
        requests.append((k, ids, shape))

    calls = []  # SDPA calls of each pass
    one_call = paged.attend_blocks
    monkeypatch.setattr(paged, "attend_blocks", lambda *args: calls.append(1) or one_call(*args))

    def run(order: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """One pass over the requests in `order` (prompts prefilled first); each one's logits and commit K."""
        pool = [torch.zeros(2, 320 * 16, config.n_kv_heads, config.head_dim) for _ in range(config.n_layers)]
        ids, positions, segments, wanted, start = [], [], [], [], 0
        for k, r_ids, shape in (requests[i] for i in order):
            blocks = [40 * k + j for j in range(40)]  # each request its own blocks
            if shape is None:
                segments.append(Segment(start, start + r_ids.numel(), empty, empty, None))
                ids.append(r_ids)
                positions.append(torch.arange(r_ids.numel()))
                wanted.append(torch.arange(start, start + r_ids.numel()))
                start += r_ids.numel()
                continue
            p, n_commit, n_decode, regs = shape
            model(r_ids[:p], torch.arange(p), PagedSpanAttention(pool, [Segment(
                0, p, empty, request_slots(blocks, 0, p, 16), None)]), empty)
            n = r_ids.numel() - p
            segments.append(Segment(start, start + n, request_slots(blocks, 0, p, 16),
                                    request_slots(blocks, p, p + n_commit, 16),
                                    inference_step_spans(p, n, n_commit, n_commit)))
            ids.append(r_ids[p:])
            positions.append(torch.arange(p, p + n))
            wanted.append(torch.arange(start + n_commit, start + n_commit + n_decode))
            start += n
        attention = PagedSpanAttention(pool, segments)
        calls.clear()
        logits = model(torch.cat(ids), torch.cat(positions), attention, torch.cat(wanted))
        out = {}
        assert len(calls) == config.n_layers  # one attention call per layer for every request of the pass
        for k, part, seg in zip(order, torch.split(logits, [w.numel() for w in wanted]), segments, strict=True):
            out[k] = (part, pool[-1][0, seg.commit_slots])
        return out

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            alone = {k: run([k])[k] for k in range(len(requests))}
            for order in ([0, 6], [5, 1, 7], [4, 2, 0, 6, 5, 7, 1, 3]):
                for k, (logits, written) in run(order).items():
                    assert torch.equal(logits, alone[k][0]), (order, k)
                    assert torch.equal(written, alone[k][1]), (order, k)
    finally:
        torch.set_num_threads(old)
