"""A real `sparse-lavida serve` on 127.0.0.1 and the official openai client: I4, streaming, 400s, batching, I5."""

import threading
import time

import pytest

from tests.serving_helpers import Server, make_checkpoint, reference_tokens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("served"))
    srv = Server(folder)
    yield srv, folder
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0].base_url + "/v1", api_key="unused", max_retries=0)


def complete(client, folder, prompt, knobs, **kw):
    knobs = dict(knobs)
    standard = {k: knobs.pop(k) for k in ("temperature", "top_p", "seed") if k in knobs}
    return client.completions.create(
        model=str(folder), prompt=prompt, max_tokens=knobs["gen_length"], temperature=standard.get("temperature", 0),
        top_p=standard.get("top_p", 1.0), seed=standard.get("seed", 0),
        extra_body={"vllm_xargs": knobs, "ignore_eos": True, "return_token_ids": True}, **kw)


def expected(folder, prompt_ids, knobs):
    knobs = dict(knobs)
    sampling = {k: knobs.pop(k) for k in ("temperature", "top_p", "seed", "sparse", "remasking") if k in knobs}
    return reference_tokens(folder, prompt_ids, knobs["gen_length"], knobs["block_length"], knobs["steps"],
                            knobs["num_registers"], **sampling)


@pytest.mark.parametrize("knobs", [
    dict(gen_length=16, block_length=8, steps=8, num_registers=4),
    dict(gen_length=16, block_length=4, steps=8, num_registers=0),
    dict(gen_length=16, block_length=8, steps=8, num_registers=0, sparse=False),
    dict(gen_length=12, block_length=4, steps=6, num_registers=2, temperature=0.8, seed=5),
], ids=["registers", "no_registers", "dense", "sampled"])
def test_completions_match_reference(server, client, knobs):
    _, folder = server
    r = complete(client, folder, "The cat sat", knobs)
    choice = r.choices[0]
    assert choice.token_ids == expected(folder, choice.prompt_token_ids, knobs)
    assert r.usage.completion_tokens == knobs["gen_length"]
    assert r.usage.prompt_tokens == len(choice.prompt_token_ids)


def test_chat_streams_one_chunk_per_block_in_order(server, client):
    _, folder = server
    knobs = dict(gen_length=24, block_length=8, steps=12, num_registers=2)
    messages = [{"role": "user", "content": "hi there"}]
    full = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=24, temperature=0,
                                          extra_body={"vllm_xargs": knobs, "ignore_eos": True,
                                                      "return_token_ids": True})
    stream = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"vllm_xargs": knobs, "ignore_eos": True})
    pieces, usage, reason = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            reason = choice.finish_reason or reason
    assert len(pieces) >= 2  # blocks arrive as they complete (the server may merge chunks a slow reader missed)
    assert "".join(pieces) == full.choices[0].message.content
    assert usage.completion_tokens == 24 and reason == "length"
    # the chat template was applied: the prompt holds the role markers
    assert full.usage.prompt_tokens == len("<user>hi there\n<assistant>")


def test_completion_stream_chunks_are_whole_blocks_in_order(server):
    import json

    import httpx

    srv, folder = server
    knobs = dict(gen_length=32, block_length=8, steps=32, num_registers=2)
    chunks = []
    with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=120, json={
            "model": str(folder), "prompt": "stream me", "max_tokens": 32, "stream": True, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "vllm_xargs": knobs}) as response:
        prompt_ids = None
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                prompt_ids = choice.get("prompt_token_ids") or prompt_ids
                if choice.get("token_ids"):
                    chunks.append(choice["token_ids"])
    assert len(chunks) >= 2 and all(len(c) % 8 == 0 for c in chunks)  # whole blocks only
    assert sum(chunks, []) == expected(folder, prompt_ids, knobs)  # in position order


BAD = [
    (dict(steps=0), "steps"),
    (dict(steps=32, gen_length=16), "steps"),
    (dict(block_length=5, gen_length=16), "block_length"),
    (dict(num_registers=-1), "num_registers"),
    (dict(remasking="greedy"), "remasking"),
    (dict(gen_length=400), "gen_length"),
    (dict(num_registers=100_000), "num_registers"),  # would stall every other request for minutes
    (dict(steps="abc"), "steps"),
]


@pytest.mark.parametrize("knobs, field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_knobs_are_400_and_the_server_keeps_serving(server, client, knobs, field):
    from openai import BadRequestError

    _, folder = server
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model=str(folder), prompt="x", max_tokens=16, extra_body={"vllm_xargs": knobs})
    assert info.value.status_code == 400
    assert field in str(info.value)
    good = complete(client, folder, "x", dict(gen_length=4, block_length=4, steps=2, num_registers=1))
    assert len(good.choices[0].token_ids) == 4


def test_logprobs_request_is_400_not_a_crash(server, client):
    from openai import BadRequestError

    _, folder = server
    with pytest.raises(BadRequestError) as info:  # once "list index out of range", HTTP 500
        client.completions.create(model=str(folder), prompt="x", max_tokens=4, logprobs=2)
    assert info.value.status_code == 400 and "logprobs" in str(info.value)
    good = complete(client, folder, "x", dict(gen_length=4, block_length=4, steps=2, num_registers=1))
    assert len(good.choices[0].token_ids) == 4


@pytest.mark.parametrize("fields, name", [
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(extra_body={"repetition_penalty": 1.3}), "repetition_penalty"),
    (dict(extra_body={"response_format": {"type": "json_object"}}), "structured_outputs"),
])
def test_left_to_right_only_fields_are_400_naming_the_field(server, client, fields, name):
    from openai import BadRequestError

    _, folder = server
    with pytest.raises(BadRequestError) as info:  # once silently ignored
        client.completions.create(model=str(folder), prompt="x", max_tokens=4, **fields)
    assert info.value.status_code == 400 and name in str(info.value)


def test_per_request_metrics_in_the_response_and_on_metrics_route(server, client):
    srv, folder = server
    before = {mode: _metric_or_zero(srv, "sparse_lavida:steps_total", mode) for mode in ("sparse", "dense")}
    tokens_before = _metric_or_zero(srv, "sparse_lavida:forward_tokens_total", "sparse")
    r = complete(client, folder, "metrics", dict(gen_length=16, block_length=8, steps=8, num_registers=4))
    metrics = r.model_extra["kv_transfer_params"]["sparse_lavida_metrics"]
    prompt_len = len(r.choices[0].prompt_token_ids)
    assert metrics["mode"] == "sparse" and metrics["steps"] == 8 and metrics["num_registers"] == 4
    # prefill + 8 steps x (4 registers + the block's remaining masks) + the 14 commit rows of steps 2..8
    assert metrics["forward_tokens"] == prompt_len + 8 * 4 + (8 + 6 + 4 + 2) * 2 + 14
    assert metrics["dense_forward_tokens"] == 8 * (prompt_len + 16)
    complete(client, folder, "metrics", dict(gen_length=8, block_length=8, steps=4, num_registers=0, sparse=False))
    assert _metric_or_zero(srv, "sparse_lavida:steps_total", "sparse") - before["sparse"] == 8
    assert _metric_or_zero(srv, "sparse_lavida:steps_total", "dense") - before["dense"] == 4
    assert (_metric_or_zero(srv, "sparse_lavida:forward_tokens_total", "sparse") - tokens_before
            == metrics["forward_tokens"])


def _metric_or_zero(srv, name, mode):
    try:
        return srv.metric(f'{name}{{mode="{mode}"}}')
    except KeyError:
        return 0.0


def test_eight_concurrent_requests_batch_and_match_alone(server, client):
    srv, folder = server
    jobs = [(f"prompt {i} " * (1 + i % 3), dict(gen_length=8 * (1 + i % 3), block_length=8, steps=4 * (1 + i % 3),
                                                 num_registers=i % 4)) for i in range(8)]
    results, batches = {}, {}
    start = threading.Barrier(8)  # sent together, so they overlap however fast one request runs

    def worker(i):
        prompt, knobs = jobs[i]
        start.wait()
        reply = complete(client, folder, prompt, knobs)
        results[i] = reply.choices[0]
        batches[i] = reply.model_extra["kv_transfer_params"]["sparse_lavida_metrics"]["max_batch"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (_, knobs) in enumerate(jobs):
        assert results[i].token_ids == expected(folder, results[i].prompt_token_ids, knobs), i
    # the scheduler ran several requests in the same engine steps (each reply says the most it shared a step with);
    # polling vllm:num_requests_running instead missed it once: the 8 finished before the first poll came back
    assert max(batches.values()) >= 2 and min(batches.values()) >= 1, batches


def test_aborted_streams_free_every_block(server, client):
    import httpx

    srv, folder = server
    knobs = dict(gen_length=64, block_length=8, steps=64, num_registers=2)
    for i in range(3):  # the client hangs up after the first block
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=60, json={
                "model": str(folder), "prompt": f"abort {i}", "max_tokens": 64, "stream": True, "temperature": 0,
                "ignore_eos": True, "vllm_xargs": knobs}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break
    finished = complete(client, folder, "after the aborts", dict(gen_length=8, block_length=8, steps=4,
                                                                  num_registers=1))
    assert len(finished.choices[0].token_ids) == 8
    deadline = time.time() + 20
    while time.time() < deadline and (srv.metric("vllm:num_requests_running") > 0
                                      or srv.metric("vllm:kv_cache_usage_perc") > 0):
        time.sleep(0.2)
    assert srv.metric("vllm:num_requests_running") == 0
    assert srv.metric("vllm:kv_cache_usage_perc") == 0.0  # I5
    log = srv.log.read_text()  # per-request diffusion metrics, including the aborted ones
    assert "FINISHED_ABORTED: {'mode': 'sparse'" in log and "'num_registers': 2" in log


def test_flood_of_good_bad_and_abandoned_requests_leaves_the_pool_empty(server, client):
    """48 requests at once: good ones, 400s, clients that hang up mid-stream; after it nothing runs or holds a block."""
    import httpx
    from openai import BadRequestError

    srv, folder = server
    good, bad, abandoned = {}, {}, []

    def send(i):
        kind = i % 3
        if kind == 0:
            knobs = dict(gen_length=16, block_length=8, steps=8, num_registers=i % 5)
            good[i] = (knobs, complete(client, folder, f"flood {i}", knobs).choices[0])
        elif kind == 1:
            try:
                client.completions.create(model=str(folder), prompt="x", max_tokens=16,
                                          extra_body={"vllm_xargs": {"steps": -i}})
            except BadRequestError as e:
                bad[i] = e.status_code
        else:
            with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=60, json={
                    "model": str(folder), "prompt": f"gone {i}", "max_tokens": 32, "stream": True,
                    "ignore_eos": True, "vllm_xargs": dict(gen_length=32, block_length=8, steps=32)}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        abandoned.append(i)
                        break

    threads = [threading.Thread(target=send, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(good) == 16 and len(abandoned) == 16 and list(bad.values()) == [400] * 16
    for knobs, choice in good.values():
        assert choice.token_ids == expected(folder, choice.prompt_token_ids, knobs)
    deadline = time.time() + 20
    while time.time() < deadline and (srv.metric("vllm:num_requests_running") > 0
                                      or srv.metric("vllm:kv_cache_usage_perc") > 0):
        time.sleep(0.2)
    assert srv.metric("vllm:num_requests_running") == 0
    assert srv.metric("vllm:num_requests_waiting") == 0
    assert srv.metric("vllm:kv_cache_usage_perc") == 0.0  # I5 under load
