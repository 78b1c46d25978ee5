"""The `vllm.general_plugins` entry point: our config, architectures, engine classes, request validation, metrics."""

from __future__ import annotations

import functools

SCHEDULER_CLS = "sparse_lavida_vllm.scheduler.scheduler.DiffusionScheduler"
WORKER_CLS = "sparse_lavida_vllm.worker.worker.DiffusionWorker"  # on CPU; DiffusionGPUWorker on CUDA

_registered = False


class DiffusionEngineConfig:
    """A vLLM per-architecture config hook: our checkpoints get the diffusion scheduler and worker."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        scheduler_config, parallel_config = vllm_config.scheduler_config, vllm_config.parallel_config
        if scheduler_config.scheduler_cls is None:
            scheduler_config.scheduler_cls = SCHEDULER_CLS
        if parallel_config.worker_cls == "auto":  # vLLM's CPU or GPU worker base, by platform
            from sparse_lavida_vllm.worker.worker import worker_class_path

            parallel_config.worker_cls = worker_class_path()
        # One step in flight: the next step's commit set is the result of this one.
        scheduler_config.async_scheduling = False
        # Cache blocks hold K/V of committed response tokens in decode order, not a token prefix.
        vllm_config.cache_config.enable_prefix_caching = False

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return


def _validate_diffusion_request(process_inputs):
    """Wrap InputProcessor.process_inputs: bad knobs become a VLLMValidationError (HTTP 400) naming the field."""

    @functools.wraps(process_inputs)
    def wrapper(self, request_id, prompt, params, *args, **kwargs):
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams

        from sparse_lavida_vllm.scheduler.params import DiffusionParamError, parse_params
        from sparse_lavida_vllm.worker.vllm_model import ARCHITECTURES

        if isinstance(params, SamplingParams) and self.model_config.architecture in ARCHITECTURES:
            token_ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
            try:
                parse_params(params, len(token_ids or ()), self.model_config.max_model_len,
                             int(getattr(self.model_config.hf_config, "num_registers", 0)))
            except DiffusionParamError as e:
                raise VLLMValidationError(str(e), parameter=e.field, value=e.value) from None
        return process_inputs(self, request_id, prompt, params, *args, **kwargs)

    wrapper.__sparse_lavida__ = True
    return wrapper


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import _CONFIG_REGISTRY
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    from sparse_lavida_vllm.entrypoints.metrics import count_diffusion_metrics
    from sparse_lavida_vllm.worker.vllm_model import ARCHITECTURES, LLaDAHFConfig, SparseLLaDAForVLLM

    _CONFIG_REGISTRY[LLaDAHFConfig.model_type] = LLaDAHFConfig
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, SparseLLaDAForVLLM)
        MODELS_CONFIG_MAP[arch] = DiffusionEngineConfig
    if not getattr(InputProcessor.process_inputs, "__sparse_lavida__", False):
        InputProcessor.process_inputs = _validate_diffusion_request(InputProcessor.process_inputs)
    if not getattr(OutputProcessor.process_outputs, "__sparse_lavida__", False):
        OutputProcessor.process_outputs = count_diffusion_metrics(OutputProcessor.process_outputs)
