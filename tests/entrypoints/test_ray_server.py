"""A TP=2 `sparse-lavida serve` on vLLM's Ray executor that stops (SIGTERM, or kill -9 of the API server) leaves no
process and no /dev/shm segment: its API server, engine core and both Ray worker actors go, the cluster stays.

The Ray cluster is the user's, as docs/serving.md ("Ray") starts it: `ray start --head --num-gpus 2` on loopback,
token authentication with a token of the test's own (RAY_AUTH_TOKEN: nothing written to ~/.ray). It is stopped
(`ray stop`) at the end, and `module_leaves_nothing` checks that nothing at all is left then.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparse_lavida_vllm.entrypoints.ray_platform import ENV_VAR
from tests.entrypoints.test_reliability import _alive, _descendants, _shm_segments, _wait_gone
from tests.serving_helpers import Server, free_port, make_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("module_leaves_nothing")]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A one-node Ray cluster with 2 "GPU" slots on 127.0.0.1; yields the env a client needs to join it."""
    pytest.importorskip("ray")
    ray_dir = tempfile.mkdtemp(prefix="slr")  # Ray's unix sockets must stay short (107 bytes)
    port = free_port()
    # RAY_worker_niceness: Ray renices its workers (the TP ranks here) to 15 by default; on a busy shared CPU they
    # then starve while importing vLLM and the server misses its start timeout
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0"}
    # every port its own (the defaults 8265 and 10001 would clash with another cluster on the machine); its own
    # session, so that its daemons keep `ray start`'s process group however they are reparented
    client_port = free_port()
    start = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                              "--num-gpus=2", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                              f"--ray-client-server-port={client_port}", f"--temp-dir={ray_dir}",
                              f"--object-store-memory={80 * 1024**2}", "--disable-usage-stats"],
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = start.communicate(timeout=180)
        assert start.returncode == 0, stdout[-3000:] + stderr[-3000:]
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "SPARSE_LAVIDA_TEST_RAY_DIR": ray_dir}
    finally:
        # not `ray stop`: it stops every Ray cluster of this user on the machine, other jobs' too
        for sig in (signal.SIGTERM, signal.SIGKILL):
            cluster = _cluster_pids(ray_dir, f"--port={client_port}")
            try:
                os.killpg(start.pid, sig)
            except ProcessLookupError:
                pass
            for pid in cluster:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 15
            while any(_alive(p) for p in cluster) and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cluster_pids(*marks: str) -> list[int]:
    """The cluster's daemons (their command lines name its session folder, or the client server's port) and what
    they started (workers)."""
    daemons = [int(e.name) for e in os.scandir("/proc")
               if e.name.isdigit() and any(mark.encode() in _cmdline(int(e.name)) for mark in marks)]
    return sorted({*daemons, *(child for pid in daemons for child in _descendants(pid))})


def _ray_workers(ray_dir: str) -> list[int]:
    """vLLM's Ray worker actors in this cluster (Ray titles an actor's process by its class and running method:
    `ray::RayWorkerProc.run` in vLLM 0.32)."""
    return [pid for pid in _cluster_pids(ray_dir) if _cmdline(pid).startswith(b"ray::RayWorker")]


@pytest.mark.parametrize("stop", ["sigterm", "kill -9 of the API server"])
def test_ray_tp2_server_that_stops_leaves_no_process_and_no_shared_memory(ray_cluster, tmp_path, stop, monkeypatch):
    from openai import OpenAI

    for key, value in {**ray_cluster, ENV_VAR: "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}.items():
        monkeypatch.setenv(key, value)
    ray_dir = ray_cluster["SPARSE_LAVIDA_TEST_RAY_DIR"]
    folder = make_checkpoint(tmp_path / "ck")
    srv = Server(folder, ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"], log_dir=tmp_path,
                 timeout=360.0)
    try:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=str(folder), prompt="ray", max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens > 0
        workers = _ray_workers(ray_dir)
        assert len(workers) == 2, [_cmdline(p)[:40] for p in _cluster_pids(ray_dir)]  # one actor per TP rank
        pids = [srv.proc.pid, *_descendants(srv.proc.pid), *workers]
        segments = _shm_segments(pids)
        cpushm = [s for s in segments if s.endswith(("-cpushm_0", "-cpushm_1"))]
        assert len(cpushm) == 2, segments  # each rank's segment of vLLM's CPU collectives
        # while serving, every segment is mapped and already unlinked (once all its users mapped it)
        assert not [s for s in segments if not s.startswith("sem.") and os.path.exists(f"/dev/shm/{s}")]
        if stop == "sigterm":
            srv.proc.send_signal(signal.SIGTERM)
        else:
            srv.proc.kill()
        srv.proc.wait(60)
        took = _wait_gone(pids, segments, timeout=60)
        left = [f"{p} {_cmdline(p)[:80]!r}" for p in pids if _alive(p)]
        assert not left, f"left running {took:.0f}s after the stop: {left}\n{srv.log.read_text()[-3000:]}"
        assert not [s for s in segments if os.path.exists(f"/dev/shm/{s}")]
        assert not _ray_workers(ray_dir)  # and the cluster released the actors (it is still up: the user's)
        assert subprocess.run([RAY, "status"], capture_output=True, timeout=60).returncode == 0
    finally:
        srv.stop()
        for pid in _ray_workers(ray_dir):  # nothing left, unless the test failed
            os.kill(pid, signal.SIGKILL)
