"""A real `sparse-lavida serve` under hostile input and shutdowns: 400s before streaming, caps, metrics, no orphans."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving_helpers import Server, make_checkpoint

# module_leaves_nothing: the module's servers too leave no process and no /dev/shm segment once stopped
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("module_leaves_nothing")]

# Small caps, so that requests over them are cheap to send.
CAPS = {"max_steps": 64, "max_num_registers": 16, "max_step_rows": 160, "max_request_rows": 6000}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("reliability"))


def start(folder: Path, args: list[str], log_dir: Path | None = None, timeout: float = 180.0) -> Server:
    srv = Server(folder, args, log_dir=log_dir, timeout=timeout)
    srv.model = str(folder)
    return srv


@pytest.fixture(scope="module")
def server(folder):
    srv = start(folder, ["--additional-config", json.dumps(CAPS)])
    yield srv
    srv.stop()


def post(srv: Server, route: str, body: dict, stream: bool = False, timeout: float = 60) -> httpx.Response:
    """POST a raw JSON body (json.dumps writes Infinity / NaN / true / huge integers as they are)."""
    body = {"model": srv.model, **body, "stream": stream}
    if route == "chat/completions":
        body["messages"] = [{"role": "user", "content": body.pop("prompt", "x")}]
    return httpx.post(f"{srv.base_url}/v1/{route}", content=json.dumps(body), timeout=timeout,
                      headers={"content-type": "application/json"})


GOOD = dict(gen_length=8, block_length=8, steps=4, num_registers=1)

BAD = [  # (request fields, the field the 400 must name)
    ({"vllm_xargs": {"steps": math.inf}}, "steps"),
    ({"vllm_xargs": {"steps": -math.inf}}, "steps"),
    ({"vllm_xargs": {"steps": math.nan}}, "steps"),
    ({"vllm_xargs": {"steps": True}}, "steps"),
    ({"vllm_xargs": {"steps": 10**30}}, "steps"),
    ({"vllm_xargs": {"steps": 0}}, "steps"),
    ({"vllm_xargs": {"steps": "abc"}}, "steps"),
    ({"vllm_xargs": {"block_length": math.inf}}, "block_length"),
    ({"vllm_xargs": {"block_length": True}}, "block_length"),
    ({"vllm_xargs": {"block_length": 10**30}}, "block_length"),
    ({"vllm_xargs": {"gen_length": math.inf}}, "gen_length"),
    ({"vllm_xargs": {"gen_length": False}}, "gen_length"),
    ({"vllm_xargs": {"gen_length": 10**30}}, "gen_length"),
    ({"vllm_xargs": {"gen_length": 1e300}}, "gen_length"),
    ({"vllm_xargs": {"num_registers": math.inf}}, "num_registers"),
    ({"vllm_xargs": {"num_registers": True}}, "num_registers"),
    ({"vllm_xargs": {"num_registers": 10**30}}, "num_registers"),
    ({"vllm_xargs": {"num_registers": -1}}, "num_registers"),
    ({"vllm_xargs": {"sparse": 2}}, "sparse"),
    ({"vllm_xargs": {"sparse": math.nan}}, "sparse"),
    ({"vllm_xargs": {"remasking": True}}, "remasking"),
    ({"vllm_xargs": {"confidence_threshold": math.nan}}, "confidence_threshold"),
    ({"vllm_xargs": {"confidence_threshold": math.inf}}, "confidence_threshold"),
    ({"vllm_xargs": {"confidence_threshold": True}}, "confidence_threshold"),
    ({"vllm_xargs": {"no_such_knob": 1}}, "no_such_knob"),
    ({"best_of": 3}, "best_of"),
    ({"min_p": math.nan}, "min_p"),
    ({"temperature": math.inf}, "temperature"),
    ({"logprobs": 2}, "logprobs"),
    ({"vllm_xargs": {"steps": 128, "gen_length": 128, "block_length": 128}}, "max_steps"),
    ({"vllm_xargs": {"num_registers": 17}}, "max_num_registers"),
    ({"vllm_xargs": {"gen_length": 160, "block_length": 160, "steps": 32, "num_registers": 4}}, "max_step_rows"),
    ({"vllm_xargs": {"gen_length": 128, "block_length": 128, "steps": 64, "num_registers": 16}}, "max_request_rows"),
    ({"vllm_xargs": {"gen_length": 128, "steps": 64, "sparse": False}}, "max_request_rows"),
]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
@pytest.mark.parametrize("fields, name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field_streamed_or_not(server, route, fields, name):
    body = {"prompt": "x", "max_tokens": 16, **fields}
    if route == "chat/completions" and "logprobs" in fields:
        body["logprobs"], body["top_logprobs"] = True, 2
    for stream in (False, True):
        r = post(server, route, body, stream=stream)
        # a streamed bad request is refused before the stream starts: no 200, no event stream
        assert r.status_code == 400, (stream, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json")
        error = r.json()["error"]
        assert error["code"] == 400 and name in error["message"] + str(error.get("param")), error


def test_requests_within_the_caps_run_and_booleans_still_work_for_boolean_knobs(server):
    r = post(server, "completions", {"prompt": "x", "max_tokens": 32, "ignore_eos": True,
                                      "vllm_xargs": dict(gen_length=32, block_length=32, steps=16,
                                                         num_registers=16, sparse=True)})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32
    r = post(server, "completions", {"prompt": "x", "max_tokens": 8, "ignore_eos": True,
                                      "vllm_xargs": {**GOOD, "sparse": False}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def _metrics(srv: Server) -> dict[str, float]:
    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
             "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
             "vllm:time_to_first_token_seconds_count", "vllm:request_prompt_tokens_sum",
             "vllm:request_generation_tokens_sum")
    return {name: srv.metric(name) for name in names}


def test_vllm_standard_metrics_move_by_the_requests_numbers(server):
    before = _metrics(server)
    prompts, generated = 0, 0
    for i, (gen, stream) in enumerate([(8, False), (16, False), (8, True)]):
        body = {"prompt": "metrics " * (i + 1), "max_tokens": gen, "ignore_eos": True, "return_token_ids": True,
                "vllm_xargs": dict(gen_length=gen, block_length=8, steps=gen // 2, num_registers=2)}
        r = post(server, "completions", body, stream=stream)
        assert r.status_code == 200
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            prompts += len(next(c["choices"][0]["prompt_token_ids"] for c in chunks
                                if c["choices"] and c["choices"][0].get("prompt_token_ids")))
        else:
            prompts += r.json()["usage"]["prompt_tokens"]
        generated += gen
    expected = {"vllm:prompt_tokens_total": prompts, "vllm:generation_tokens_total": generated,
                "vllm:request_success_total": 3, "vllm:e2e_request_latency_seconds_count": 3,
                "vllm:request_queue_time_seconds_count": 3, "vllm:time_to_first_token_seconds_count": 3,
                "vllm:request_prompt_tokens_sum": prompts, "vllm:request_generation_tokens_sum": generated}
    deadline = time.time() + 10  # the API server records a step's stats right after handing out its outputs
    while True:
        moved = {k: v - before[k] for k, v in _metrics(server).items()}
        if moved == expected or time.time() > deadline:
            break
        time.sleep(0.2)
    assert moved == expected  # vllm:prompt_tokens_total once stayed 0 with the diffusion scheduler


# Values a client can put in a JSON body, the hostile ones included.
VALUES = [None, True, False, 0, 1, -1, 2, 7, 8, 2**63, 10**30, -(10**30), math.inf, -math.inf, math.nan, 0.5,
          1e308, -0.0, "", "abc", "7", "true", [], [1], [1, "x"], {}, {"a": 1}]
STANDARD = ("temperature", "top_p", "top_k", "seed", "max_tokens", "n", "min_tokens", "min_p", "stop",
            "stop_token_ids", "ignore_eos", "best_of", "logit_bias", "allowed_token_ids", "echo")
KNOBS = ("steps", "block_length", "gen_length", "num_registers", "sparse", "remasking", "confidence_threshold")


_EXAMPLES = {"count": 0}
_JSON_VALUES = st.one_of(st.sampled_from(VALUES), st.integers(), st.floats(), st.text(max_size=6),
                         st.lists(st.integers(-3, 300), max_size=3))
_MUTATIONS = st.lists(st.one_of(st.tuples(st.just("knob"), st.sampled_from(KNOBS), _JSON_VALUES),
                                st.tuples(st.just("std"), st.sampled_from(STANDARD), _JSON_VALUES)),
                      min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(mutations=_MUTATIONS, stream=st.booleans(), route=st.sampled_from(["completions", "chat/completions"]))
def test_random_values_at_every_field_never_5xx_never_hang_and_the_server_keeps_serving(server, mutations, stream,
                                                                                     route):
    """Property (hypothesis): any JSON values at the knobs and standard fields, streamed or not, on completions and
    chat: never a 5xx, never a hang, a stream that starts ends cleanly, and the next good request still works."""
    body = {"prompt": "p", "max_tokens": 8, "vllm_xargs": dict(GOOD)}
    for where, name, value in mutations:
        if where == "knob":
            body["vllm_xargs"][name] = value
        else:
            body[name] = value
    r = post(server, route, body, stream=stream, timeout=60)  # a hang is a ReadTimeout
    assert r.status_code < 500, (body, stream, route, r.status_code, r.text[:300])
    if r.status_code == 200 and stream:
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in r.text, (body, r.text[-300:])
    _EXAMPLES["count"] += 1
    if _EXAMPLES["count"] % 10 == 0:
        good = post(server, "completions", {"prompt": "ok", "max_tokens": 8, "ignore_eos": True, "vllm_xargs": GOOD})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 8


def test_a_reduced_soak_leaks_nothing_and_seeded_requests_keep_their_tokens(server):
    """benchmarks/soak.py for 20 s at 6 clients: mixed good, seeded, abandoned and bad requests."""
    from benchmarks.soak import soak

    result = soak(server.base_url, server.model, server.proc.pid, duration=20, concurrency=6, seed=3)
    assert result["requests"] >= 20 and result["aborted"] and result["bad"] and result["seeded"], result
    assert result["server_errors_5xx"] == 0 and result["unexpected"] == 0, result["outcomes"]
    assert result["seeded_mismatches"] == 0  # batch-invariant: the same tokens as alone
    assert result["end_running"] == result["end_waiting"] == result["end_kv_cache_usage"] == 0  # I5
    assert result["rss_after_mb"] <= result["rss_before_mb"] * 1.25 + 100, result


# ---- shutdown and orphans (a server of their own each) --------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _shm_segments(pids: list[int]) -> set[str]:
    """The /dev/shm files these processes have mapped (vLLM's message queues)."""
    names = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/")[1].split()[0])
        except OSError:
            pass
    return names


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], segments: set[str], timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if not any(_alive(p) for p in pids) and not any(os.path.exists(f"/dev/shm/{s}") for s in segments):
            break
        time.sleep(0.05)
    return time.time() - start


SHUTDOWN_TIMEOUT = 8


def test_sigterm_drains_in_flight_requests_and_the_process_group_exits_within_the_timeout(folder, tmp_path):
    srv = start(folder, ["--max-model-len", "512", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], tmp_path)
    try:
        pids = [srv.proc.pid, *_descendants(srv.proc.pid)]
        segments = _shm_segments(pids)
        assert len(pids) >= 3  # API server, engine core, worker
        # short requests finish during the drain; 496-step ones most likely cannot and end with a clean 503
        short = dict(gen_length=32, block_length=8, steps=32, num_registers=2)
        long = dict(gen_length=496, block_length=8, steps=496, num_registers=16)
        results: dict[int, tuple] = {}

        def send(i: int, knobs: dict, stream: bool) -> None:
            r = post(srv, "completions", {"prompt": f"drain {i}", "max_tokens": knobs["gen_length"],
                                          "ignore_eos": True, "vllm_xargs": knobs}, stream=stream, timeout=60)
            results[i] = (knobs["gen_length"], stream, r.status_code, r.text)

        jobs = [(0, long, True), (1, long, False), (2, short, True), (3, short, False)]
        threads = [threading.Thread(target=send, args=job) for job in jobs]
        for t in threads[:2]:
            t.start()
        time.sleep(1.0)
        for t in threads[2:]:
            t.start()
        deadline = time.time() + 10  # all four admitted (or already done) before the signal
        while (srv.metric("vllm:num_requests_running") + srv.metric("vllm:num_requests_waiting")
               + sum(not t.is_alive() for t in threads)) < 4:
            assert time.time() < deadline
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        signalled = time.time()
        time.sleep(0.5)
        try:  # admission is closed: 503 naming the shutdown (or the port is already closed)
            late = post(srv, "completions", {"prompt": "late", "max_tokens": 8}, timeout=10)
            assert late.status_code == 503 and "shutting down" in late.text
        except httpx.TransportError:
            pass
        _wait_gone(pids, segments, timeout=SHUTDOWN_TIMEOUT + 20)
        elapsed = time.time() - signalled
        for t in threads:
            t.join(30)
        assert elapsed <= SHUTDOWN_TIMEOUT + 0.5, elapsed
        assert not any(_alive(p) for p in pids)
        assert not any(os.path.exists(f"/dev/shm/{s}") for s in segments)
        for i, (gen, stream, status, text) in results.items():
            if status == 200 and not stream:
                assert json.loads(text)["usage"]["completion_tokens"] == gen, i
            elif status == 200:  # streamed: the whole canvas, or a clean 503 error event, then [DONE]
                assert text.rstrip().endswith("data: [DONE]"), i
                events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
                errors = [e["error"] for e in events if "error" in e]
                if errors:
                    assert errors == [errors[0]] and errors[0]["code"] == 503, errors
                    assert "shut down before this request finished" in errors[0]["message"]
                else:
                    assert sum(len(e["choices"][0]["text"]) > 0 for e in events if e.get("choices")) > 0
            else:
                assert status == 503 and "shut down before this request finished" in text, (i, status, text)
        assert len(results) == 4
        assert results[2][2] == results[3][2] == 200  # the short ones finished
        assert json.loads(results[3][3])["usage"]["completion_tokens"] == 32
        log = srv.log.read_text()
        stop_log = log[log.index("shutdown triggered"):]
        assert "Traceback" not in stop_log and "EngineDeadError" not in stop_log, stop_log[-3000:]
    finally:
        srv.stop()


@pytest.mark.parametrize("tp", [1, 2])
def test_kill_9_of_the_api_server_leaves_no_engine_process_and_no_shared_memory(folder, tmp_path, tp, monkeypatch,
                                                                                leaves_nothing):
    """TP=2: two workers, each also owning a segment of vLLM's CPU collectives (`...-cpushm_<rank>`)."""
    if tp == 2:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (DESIGN.md, "Facts about vLLM")
    srv = start(folder, ["--tensor-parallel-size", str(tp)], tmp_path, timeout=180.0 * tp)  # TP=2 starts slower
    engine = _descendants(srv.proc.pid)
    try:
        segments = _shm_segments([srv.proc.pid, *engine])
        assert len(engine) >= 1 + tp and segments  # engine core + workers (+ resource tracker); message queues
        cpushm = [s for s in segments if s.endswith(tuple(f"-cpushm_{rank}" for rank in range(tp)))]
        assert len(cpushm) == (tp if tp > 1 else 0)
        # while serving, every segment is mapped and already unlinked (once all its users mapped it): nothing to leak
        assert not [s for s in segments if not s.startswith("sem.") and os.path.exists(f"/dev/shm/{s}")]
        srv.proc.kill()
        srv.proc.wait()
        took = _wait_gone(engine, segments, timeout=20)
        assert not [p for p in engine if _alive(p)], f"orphans after {took:.1f}s"
        assert not [s for s in segments if os.path.exists(f"/dev/shm/{s}")]
    finally:
        srv.stop()
        for pid in engine:  # nothing left, unless the test failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
