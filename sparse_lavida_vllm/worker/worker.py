"""The diffusion worker (`--worker-cls`): vLLM's CPU worker with the diffusion model runner in place of its runner."""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_worker import CPUWorker

from sparse_lavida_vllm.worker.model_runner import DiffusionModelRunner


class DiffusionWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()  # distributed env, thread binding, seeds (and a stock runner we replace)
        self.model_runner = DiffusionModelRunner(self.vllm_config, torch.device("cpu"))

    def determine_available_memory(self) -> int:
        # No profiling pass to run: the KV budget is VLLM_CPU_KVCACHE_SPACE (or --kv-cache-memory-bytes).
        explicit = self.cache_config.kv_cache_memory_bytes
        return explicit if explicit is not None else super().determine_available_memory()
