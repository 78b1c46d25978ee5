"""The `vllm.general_plugins` entry point: our config, architectures, engine classes, request validation, metrics."""

from __future__ import annotations

import functools

SCHEDULER_CLS = "sparse_lavida_vllm.scheduler.scheduler.DiffusionScheduler"
WORKER_CLS = "sparse_lavida_vllm.worker.worker.DiffusionWorker"

_registered = False


class DiffusionEngineConfig:
    """A vLLM per-architecture config hook: our checkpoints get the diffusion scheduler and worker."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        global _serving
        from sparse_lavida_vllm.scheduler.params import Limits

        Limits.from_config(vllm_config.additional_config)  # a bad cap stops the server at startup
        _serving = True
        _patch_request_path()
        scheduler_config, parallel_config = vllm_config.scheduler_config, vllm_config.parallel_config
        if scheduler_config.scheduler_cls is None:
            scheduler_config.scheduler_cls = SCHEDULER_CLS
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = WORKER_CLS
        # One step in flight: the next step's commit set is the result of this one.
        scheduler_config.async_scheduling = False
        # Cache blocks hold K/V of committed response tokens in decode order, not a token prefix.
        vllm_config.cache_config.enable_prefix_caching = False

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return


# Set in every process whose vLLM config serves one of our architectures (the API server included).
_serving = False


def _check_request(vllm_config, prompt_len: int, params) -> None:
    """Validate a request for our architectures: the knobs, the standard fields and the operator's caps.

    A DiffusionParamError becomes a VLLMValidationError, which vLLM answers with HTTP 400 naming the field.
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from sparse_lavida_vllm.scheduler.params import DiffusionParamError, Limits, parse_params
    from sparse_lavida_vllm.worker.vllm_model import ARCHITECTURES

    model_config = vllm_config.model_config
    if not isinstance(params, SamplingParams) or model_config.architecture not in ARCHITECTURES:
        return
    try:
        parse_params(params, prompt_len, model_config.max_model_len,
                     int(getattr(model_config.hf_config, "num_registers", 0)),
                     limits=Limits.from_config(vllm_config.additional_config))
    except DiffusionParamError as e:
        raise VLLMValidationError(str(e), parameter=e.field, value=e.value) from None


def _prompt_len(prompt) -> int | None:
    """The token count of a rendered prompt (what the OpenAI routes hand the engine), None if not known yet."""
    token_ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids",
                                                                                         None)
    return None if token_ids is None else len(token_ids)


def _validate_diffusion_request(process_inputs):
    """Wrap InputProcessor.process_inputs: bad knobs become a VLLMValidationError (HTTP 400) naming the field."""

    @functools.wraps(process_inputs)
    def wrapper(self, request_id, prompt, params, *args, **kwargs):
        _check_request(self.vllm_config, _prompt_len(prompt) or 0, params)
        return process_inputs(self, request_id, prompt, params, *args, **kwargs)

    wrapper.__sparse_lavida__ = True
    return wrapper


def _validate_before_streaming(generate):
    """Wrap AsyncLLM.generate (an async generator, run only when the response is already streaming).

    The OpenAI routes call generate() before they return the StreamingResponse; checking here, synchronously,
    raises the VLLMValidationError out of the route, so a bad streamed request is an HTTP 400, not a 200 followed
    by an error event.
    """

    @functools.wraps(generate)
    def wrapper(self, prompt, sampling_params, request_id, *args, **kwargs):
        prompt_len = _prompt_len(prompt)
        if prompt_len is not None:
            _check_request(self.vllm_config, prompt_len, sampling_params)
        return generate(self, prompt, sampling_params, request_id, *args, **kwargs)

    wrapper.__sparse_lavida__ = True
    return wrapper


def _name_the_extra_arg(verify_extra_args):
    """Wrap SamplingParams._verify_extra_args: an integer too large for the engine's transport names its key."""

    @functools.wraps(verify_extra_args)
    def wrapper(self) -> None:
        from vllm.exceptions import VLLMValidationError

        for key, value in (self.extra_args or {}).items():
            if isinstance(value, int) and not -(2**63) <= value < 2**64:
                raise VLLMValidationError(f"{key} is out of range: integers must be between -2**63 and 2**64 - 1",
                                          parameter=key)
        verify_extra_args(self)

    wrapper.__sparse_lavida__ = True
    return wrapper


def _refuse_best_of(to_sampling_params):
    """Wrap a request's to_sampling_params: `best_of` > 1 (ranking by log-probabilities) is refused, not ignored."""

    @functools.wraps(to_sampling_params)
    def wrapper(self, *args, **kwargs):
        from vllm.exceptions import VLLMValidationError

        best_of = (self.model_extra or {}).get("best_of", getattr(self, "best_of", None))
        if _serving and best_of is not None and not (type(best_of) is int and best_of == 1):
            raise VLLMValidationError("best_of is not supported by the diffusion engine (it ranks candidates by "
                                      "log-probabilities); use n", parameter="best_of", value=best_of)
        return to_sampling_params(self, *args, **kwargs)

    wrapper.__sparse_lavida__ = True
    return wrapper


def _keep_booleans(request_json):
    """Wrap starlette's Request.json: booleans in `vllm_xargs` reach the knobs as "true" / "false".

    vLLM types vllm_xargs as str | int | float | list, so pydantic turns `"steps": true` into 1 and the request
    would run; as strings, integer knobs refuse them (HTTP 400 naming the knob) and boolean knobs accept them.
    """

    @functools.wraps(request_json)
    async def wrapper(self):
        body = await request_json(self)
        xargs = body.get("vllm_xargs") if _serving and isinstance(body, dict) else None
        if isinstance(xargs, dict):
            for key, value in xargs.items():
                if isinstance(value, bool):
                    xargs[key] = "true" if value else "false"
        return body

    wrapper.__sparse_lavida__ = True
    return wrapper


def _patch(owner, name: str, wrap) -> None:
    if not getattr(getattr(owner, name), "__sparse_lavida__", False):
        setattr(owner, name, wrap(getattr(owner, name)))


def _patch_request_path() -> None:
    """The API-server side hooks, installed once a process's config serves one of our architectures."""
    from starlette.requests import Request
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.engine.async_llm import AsyncLLM

    _patch(AsyncLLM, "generate", _validate_before_streaming)
    _patch(CompletionRequest, "to_sampling_params", _refuse_best_of)
    _patch(ChatCompletionRequest, "to_sampling_params", _refuse_best_of)
    _patch(Request, "json", _keep_booleans)


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.sampling_params import SamplingParams
    from vllm.transformers_utils.config import _CONFIG_REGISTRY
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    from sparse_lavida_vllm.entrypoints.metrics import count_diffusion_metrics
    from sparse_lavida_vllm.worker.vllm_model import ARCHITECTURES, LLaDAHFConfig, SparseLLaDAForVLLM

    _CONFIG_REGISTRY[LLaDAHFConfig.model_type] = LLaDAHFConfig
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, SparseLLaDAForVLLM)
        MODELS_CONFIG_MAP[arch] = DiffusionEngineConfig
    _patch(InputProcessor, "process_inputs", _validate_diffusion_request)
    _patch(OutputProcessor, "process_outputs", count_diffusion_metrics)
    _patch(SamplingParams, "_verify_extra_args", _name_the_extra_arg)
