"""vLLM platform plugin: vLLM's CPU platform plus a Ray device key, so the Ray executor runs on CPU nodes."""

from __future__ import annotations

import os

from vllm.platforms.cpu import CpuPlatform

ENV_VAR = "SPARSE_LAVIDA_RAY_CPU"
PLATFORM_QUALNAME = "sparse_lavida_vllm.entrypoints.ray_platform.RayCpuPlatform"


def activate() -> str | None:
    """vLLM calls this while resolving `current_platform`: our platform only when asked, else vLLM's own.

    Off by default so an ordinary install (CPU or GPU) keeps the platform vLLM detects; an activated
    out-of-tree platform wins over the built-in ones (vllm/platforms/__init__.py).
    """
    return PLATFORM_QUALNAME if os.environ.get(ENV_VAR, "") == "1" else None


class RayCpuPlatform(CpuPlatform):
    """vLLM's CpuPlatform (same enum, worker, attention, gloo) that vLLM's Ray executors accept.

    Why the key is "GPU": vLLM's Ray executors need a key Ray accepts in two places, and only "GPU"
    passes both on a CPU node.
    * `ray_executor.py:_init_workers_ray` creates each worker with `ray.remote(num_cpus=0, num_gpus=0,
      resources={key: 1})` for any key but "GPU"; Ray refuses "CPU" there ("Use the 'num_cpus' and
      'num_gpus' keyword instead of 'CPU' and 'GPU' in 'resources' keyword").
    * `ray_utils.py:RayWorkerWrapper.get_node_and_physical_gpu_ids` (and RayExecutorV2's) read
      `ray.get_runtime_context().get_accelerator_ids()[key]`, which holds only Ray's accelerator names
      (GPU, TPU, neuron_cores, ...): a custom resource such as "sparse_lavida_cpu" is a KeyError.
    Ray resources are logical, so a CPU node offers "GPU" slots when started with
    `ray start --num-gpus N` (or `ray.init(num_gpus=N)`): one slot per TP rank, nothing touches a GPU.
    """

    ray_device_key: str = "GPU"
    # vLLM's Ray executors set each of these to "1" in every worker actor's runtime env: the workers must resolve
    # this platform too (they read the key before vLLM copies the driver's env to them), on every node, whatever
    # env `ray start` ran with. RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES is deliberately not here: Ray's
    # compiled graph (the V0-style RayDistributedExecutor) looks the actor's "GPU" id up in CUDA_VISIBLE_DEVICES,
    # which Ray sets per actor unless told not to; CPU torch ignores it.
    ray_noset_device_env_vars: list[str] = [ENV_VAR]
