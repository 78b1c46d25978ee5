"""I4 under Ray: vllm.LLM(tensor_parallel_size=2, distributed_executor_backend="ray") on CPU via our platform plugin.

The engine runs in a child process (`python -m tests.worker.test_ray FOLDER`) that starts a local, loopback-only
Ray cluster, builds the TP=2 engine, prints one JSON line and shuts Ray down. The child runs in its own session so
that the test can end it and every Ray daemon it started by process group if it overruns.

The platform plugin is found the way an installed package's would be: the test writes a dist-info folder whose
entry_points.txt declares the `vllm.platform_plugins` entry and puts it on PYTHONPATH (with this checkout), so
importlib.metadata finds it in the child and in the Ray workers without reinstalling the package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sparse_lavida_vllm.entrypoints.ray_platform import ENV_VAR, PLATFORM_QUALNAME, RayCpuPlatform, activate
from tests.serving_helpers import VLLM_ENV, make_checkpoint
from tests.worker.test_tensor_parallel import CASES, PROMPT, STANDARD, _worker_view, check_tp2_result

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINT = "sparse_lavida_ray_cpu"
# The names `sparse-lavida serve` puts in VLLM_PLUGINS, plus the platform plugin (docs/serving.md, "Ray").
PLUGINS = "sparse_lavida,sparse_lavida_images," + ENTRY_POINT


def test_activate_only_when_asked(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert activate() is None  # default installs keep the platform vLLM detects
    monkeypatch.setenv(ENV_VAR, "0")
    assert activate() is None
    monkeypatch.setenv(ENV_VAR, "1")
    assert activate() == PLATFORM_QUALNAME


def test_platform_is_vllms_cpu_platform_with_a_ray_key():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert resolve_obj_by_qualname(PLATFORM_QUALNAME) is RayCpuPlatform
    platform = RayCpuPlatform()
    assert isinstance(platform, CpuPlatform) and platform.is_cpu() and platform.device_type == "cpu"
    assert platform.dist_backend == "gloo" and CpuPlatform.ray_device_key == ""  # what refuses Ray in vLLM
    assert platform.ray_device_key == "GPU" and ENV_VAR in platform.ray_noset_device_env_vars


def test_ray_refuses_cpu_as_a_worker_resource():
    """Why the key is not "CPU": vLLM's Ray executor asks for resources={key: 1} for any key but "GPU"."""
    ray = pytest.importorskip("ray")

    with pytest.raises(ValueError, match="num_cpus"):
        ray.remote(num_cpus=0, num_gpus=0, resources={"CPU": 1.0})(object)


RESOLVE = """
import os
from vllm.platforms import resolve_current_platform_cls_qualname as resolve
print(resolve())
os.environ["SPARSE_LAVIDA_RAY_CPU"] = "1"
print(resolve())
"""


def test_vllm_resolves_our_platform_only_when_asked(tmp_path):
    """vLLM's own resolution, with the entry point installed: its CpuPlatform by default, ours with the env var."""
    _write_entry_point(tmp_path / "ep")
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "VLLM_PLUGINS", "VLLM_TARGET_DEVICE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path / "ep")])
    proc = subprocess.run([sys.executable, "-c", RESOLVE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["vllm.platforms.cpu.CpuPlatform", PLATFORM_QUALNAME]


def _ray_view(worker) -> dict:
    """Where one TP worker runs: inside a Ray actor, on which platform, with the env var it got from vLLM."""
    import ray
    from vllm.platforms import current_platform

    return {"platform": type(current_platform).__qualname__, "env": os.environ.get(ENV_VAR),
            "actor": ray.get_runtime_context().get_actor_id() is not None, "pid": os.getpid()}


def main(folder: str) -> None:
    """Start a local Ray cluster, build a TP=2 Ray engine over `folder`, run every case, print one JSON line."""
    import ray

    # Loopback only: Ray's node address is then 127.0.0.1, which is also VLLM_HOST_IP, so vLLM's placement group
    # (pinned to "node:<VLLM_HOST_IP>") lands on this node. address="local": never join a cluster found on the box.
    # num_gpus: Ray resources are logical; each TP rank takes one "GPU" slot (see RayCpuPlatform).
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=80 * 1024**2,
             _temp_dir=os.environ["SPARSE_LAVIDA_TEST_RAY_DIR"])
    try:
        # Set after the cluster started: the raylet (so each worker's inherited env) lacks it, as on a node started
        # by `ray start` without it. The workers must get it from the platform through vLLM's actor runtime env.
        os.environ[ENV_VAR] = "1"
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0, block_size=16,
                  num_gpu_blocks_override=24, tensor_parallel_size=2, distributed_executor_backend="ray")
        tokens, seconds = {}, {}
        for name, knobs in CASES.items():
            knobs = dict(knobs)
            std = {k: knobs.pop(k) for k in STANDARD if k in knobs}
            params = SamplingParams(max_tokens=knobs["gen_length"], ignore_eos=True,
                                    temperature=std.get("temperature", 0), top_k=std.get("top_k", 0),
                                    seed=std.get("seed", 0), extra_args=knobs)
            start = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)[0].outputs[0]
            seconds[name] = round(time.perf_counter() - start, 2)
            tokens[name] = list(out.token_ids)
        result = {"tokens": tokens, "seconds": seconds, "driver_platform": type(current_platform).__qualname__,
                  "executor": type(llm.llm_engine.model_executor).__qualname__,
                  "workers": llm.collective_rpc(_worker_view), "ray": llm.collective_rpc(_ray_view)}
        print("RESULT " + json.dumps(result), flush=True)
        # the executor's teardown (compiled graph, actors) must run while the cluster is still up
        llm.llm_engine.engine_core.shutdown()
    finally:
        ray.shutdown()


def _write_entry_point(folder: Path) -> None:
    """A dist-info with our platform entry point, as `pip install` writes it from pyproject.toml."""
    dist = folder / "sparse_lavida_ray_platform_test-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sparse-lavida-ray-platform-test\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        f"[vllm.platform_plugins]\n{ENTRY_POINT} = sparse_lavida_vllm.entrypoints.ray_platform:activate\n")


# vLLM 0.32 has two Ray executors: RayExecutorV2 (the default: vLLM's message queues, our worker's execute_model)
# and RayDistributedExecutor (a Ray compiled graph carries the scheduler output to runner.execute_model).
EXECUTORS = {"1": "RayExecutorV2", "0": "RayDistributedExecutor"}


@pytest.mark.slow
@pytest.mark.parametrize("v2", list(EXECUTORS))
def test_ray_tp2_llm_matches_the_reference(tmp_path, v2, leaves_nothing):
    pytest.importorskip("ray")
    folder = make_checkpoint(tmp_path / "ck")
    _write_entry_point(tmp_path / "ep")
    # Ray's unix sockets live under the temp dir and must stay short (107 bytes): not pytest's deep tmp_path.
    ray_dir = tempfile.mkdtemp(prefix="slr")
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a single-node Ray on the loopback address (see main()).
    env = dict(os.environ, **VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND="0|1", OMP_NUM_THREADS="1", VLLM_PLUGINS=PLUGINS,
               PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path / "ep")]), SPARSE_LAVIDA_TEST_RAY_DIR=ray_dir,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", VLLM_USE_RAY_V2_EXECUTOR_BACKEND=v2)
    env.pop(ENV_VAR, None)  # the child sets it once Ray is up
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "tests.worker.test_ray", str(folder)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        # Ray's daemons (GCS, raylet, workers) stay in the child's process group: end what is left of it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-6000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))

    assert result["driver_platform"] == "RayCpuPlatform" and result["executor"] == EXECUTORS[v2]
    assert len({w["pid"] for w in result["ray"]}) == 2
    for w in result["ray"]:  # two Ray actors, each on our platform, with the env var from the actor runtime env
        assert w == dict(w, platform="RayCpuPlatform", env="1", actor=True)
    check_tp2_result(result, folder)  # the same shards and reference tokens as TP=2 without Ray


if __name__ == "__main__":  # vLLM's engine must start under this guard
    main(sys.argv[1])
