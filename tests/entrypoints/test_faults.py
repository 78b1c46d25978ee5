"""Fault injection: a request whose forward raises fails alone (500), its blocks come back, its batch mates finish."""

import concurrent.futures

import pytest

from sparse_lavida_vllm.worker.model_runner import FAULT_ENV
from tests.serving_helpers import Server, make_checkpoint, reference_tokens

pytestmark = pytest.mark.slow
FAULT_TOKEN = 250  # an ordinary id of the tiny checkpoint's vocabulary
KNOBS = {"steps": 8, "block_length": 8, "num_registers": 2}


def test_a_failing_request_fails_alone_and_the_engine_keeps_serving(tmp_path, monkeypatch):
    import requests

    monkeypatch.setenv(FAULT_ENV, str(FAULT_TOKEN))  # the engine core inherits it: test-only hook in the runner
    folder = make_checkpoint(tmp_path)
    srv = Server(folder, log_dir=tmp_path)

    def complete(prompt: list[int], seed: int) -> requests.Response:
        return requests.post(srv.base_url + "/v1/completions", timeout=120, json={
            "model": str(folder), "prompt": prompt, "max_tokens": 16, "temperature": 1.0, "seed": seed,
            "ignore_eos": True, "return_token_ids": True, "vllm_xargs": KNOBS})

    try:
        good = [[11, 12, 13], [21, 22, 23, 24]]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # sent together: they share engine steps
            futures = [pool.submit(complete, p, i) for i, p in enumerate(good)]
            futures.append(pool.submit(complete, [31, FAULT_TOKEN, 33], 9))
            replies = [f.result() for f in futures]
        assert replies[2].status_code == 500, replies[2].text
        for i, (prompt, reply) in enumerate(zip(good, replies)):
            assert reply.status_code == 200, reply.text
            tokens = reply.json()["choices"][0]["token_ids"]
            assert tokens == reference_tokens(folder, prompt, 16, 8, 8, 2, temperature=1.0, seed=i)
        assert srv.metric("vllm:num_requests_running") == 0
        assert srv.metric("vllm:kv_cache_usage_perc") == 0  # the failed request's blocks came back too (I5)
        assert complete([41, 42], 5).status_code == 200  # and the engine is still serving
        assert "failed in the model runner" in srv.log.read_text()
    finally:
        srv.stop()
