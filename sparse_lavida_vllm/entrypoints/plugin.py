"""The `vllm.general_plugins` entry point: config, architectures, engine classes, request and chat validation."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from sparse_lavida_vllm.entrypoints.shm import unlink_once_joined, unlink_once_ready
from sparse_lavida_vllm.entrypoints.shutdown import (
    SHUTTING_DOWN,
    QuietOrderlyStop,
    die_with_parent,
    is_draining,
    mark_draining,
    shutting_down,
)

if TYPE_CHECKING:
    from sparse_lavida_vllm.multimodal.request_rules import RequestRules

SCHEDULER_CLS = "sparse_lavida_vllm.scheduler.scheduler.DiffusionScheduler"
WORKER_CLS = "sparse_lavida_vllm.worker.worker.DiffusionWorker"  # on CPU; DiffusionGPUWorker on CUDA

_registered = False
# Set in every process whose vLLM config serves one of our architectures (the API server included).
_serving = False


def _check_checkpoint_files(model: str) -> None:
    """A local checkpoint's broken .safetensors file stops the server at startup with a message naming it."""
    from pathlib import Path

    from sparse_lavida_vllm.model_executor.weights import check_safetensors

    folder = Path(model)
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            check_safetensors(path)


class DiffusionEngineConfig:
    """A vLLM per-architecture config hook: our checkpoints get the diffusion scheduler and worker."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        global _serving
        from sparse_lavida_vllm.scheduler.params import Limits

        Limits.from_config(vllm_config.additional_config)  # a bad cap stops the server at startup
        _check_checkpoint_files(vllm_config.model_config.model)
        _serving = True
        _patch_request_path()
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
    num_registers, default_sparse, has_register_token = _checkpoint_defaults(model_config.hf_config)
    rules = _request_rules(model_config)
    if (params.extra_args or {}).get("kind") == "image" and rules.image_registers is not None:
        num_registers, has_register_token = rules.image_registers  # LaViDa-O's image registers, as the scheduler's
    try:
        parsed = parse_params(params, prompt_len, model_config.max_model_len, num_registers,
                              default_sparse=default_sparse, has_register_token=has_register_token,
                              limits=Limits.from_config(vllm_config.additional_config))
    except DiffusionParamError as e:
        raise VLLMValidationError(str(e), parameter=e.field, value=e.value) from None
    if getattr(parsed, "per_code", False) and (why := rules.per_code_refusal()) is not None:
        raise VLLMValidationError(why, parameter="per_code", value=True)


_rules: dict[tuple[str, str], RequestRules] = {}


def _request_rules(model_config) -> RequestRules:
    """The served checkpoint's request rules (multimodal/request_rules.py, as the scheduler has them), read once."""
    key = (model_config.architecture, str(model_config.model))
    if key not in _rules:
        from sparse_lavida_vllm.multimodal.request_rules import request_rules

        _rules[key] = request_rules(*key)
    return _rules[key]


_defaults: dict[int, tuple[int, bool, bool]] = {}


def _checkpoint_defaults(hf_config) -> tuple[int, bool, bool]:
    """(num_registers, sparse by default, has a register token): what the scheduler reads from the checkpoint."""
    if id(hf_config) not in _defaults:
        mdm = hf_config.to_mdm_config()
        _defaults[id(hf_config)] = (mdm.num_registers, mdm.block_causal, mdm.register_token_id is not None)
    return _defaults[id(hf_config)]


_LAVIDA_O = "LlavaLladaForMaskedDiffusion"  # lavida_o.ARCHITECTURE (not imported here: this module loads light)


def _prompt_len(prompt) -> int | None:
    """The token count of a rendered prompt (what the OpenAI routes hand the engine), None if not known yet."""
    if isinstance(prompt, dict):
        token_ids = prompt.get("prompt_token_ids")
    else:
        token_ids = getattr(prompt, "prompt_token_ids", None)
    return None if token_ids is None else len(token_ids)


def _unexpanded_edit(prompt, params) -> bool:
    """An image request whose token ids come with raw images (a LaViDa-O edit's SigLIP copy of its source): vLLM's
    multimodal processor has yet to expand its `<image>` into the image's rows, so the prompt's length (and the
    source span inside it) is not known here. The images route validated the expanded prompt, and the scheduler
    checks the request again once expanded."""
    extra = getattr(params, "extra_args", None) or {}
    return isinstance(prompt, dict) and "multi_modal_data" in prompt and extra.get("kind") == "image"


def _validate_diffusion_request(process_inputs):
    """Wrap InputProcessor.process_inputs: bad knobs become a VLLMValidationError (HTTP 400) naming the field."""

    @functools.wraps(process_inputs)
    def wrapper(self, request_id, prompt, params, *args, **kwargs):
        if not _unexpanded_edit(prompt, params):
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
        if is_draining():
            raise shutting_down(SHUTTING_DOWN)
        prompt_len = _prompt_len(prompt)
        if prompt_len is not None and not _unexpanded_edit(prompt, sampling_params):
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


# Chat content parts that carry media. Only LaViDa-O with its vision tower takes images (image_url parts); every
# other architecture feeds token ids only.
MEDIA_PARTS = ("image_url", "input_image", "image_pil", "image_embeds", "audio_url", "input_audio", "audio_embeds",
               "video_url")
IMAGE_URL_SCHEMES = ("data", "http", "https")  # what an image_url may name (http(s) is fetched by vLLM)


def media_refusal(architecture: str, why: str | None = None) -> str:
    """Why chat messages with media are refused for `architecture` (an HTTP 400 message); `why`: LaViDa-O's reason."""
    from sparse_lavida_vllm.model_executor.lavida_o_config import ARCHITECTURE as LAVIDA_O

    if architecture == LAVIDA_O:
        return (f"{LAVIDA_O} (LaViDa-O / Sparse-LaViDa) takes image_url parts only when served whole with its vision "
                f"tower; here: {why or 'no image inputs'}. Send text-only messages")
    return f"{architecture} serves text only: chat messages cannot carry images, audio or video"


def _parts(messages):
    """(field path, part) of every dict content part of chat `messages` (dicts as the request model parsed them)."""
    for i, message in enumerate(messages or ()):
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict):
                yield f"messages[{i}].content[{j}]", part


def _part_kind(part: dict) -> str | None:
    kind = part.get("type")
    if kind in MEDIA_PARTS:
        return kind
    return next((key for key in MEDIA_PARTS if key in part), None)  # vLLM also accepts a part by its key


def _media_part(messages) -> str | None:
    """The type of the first media part in chat `messages`, else None."""
    return next((kind for _, part in _parts(messages) if (kind := _part_kind(part)) is not None), None)


def image_part_error(messages) -> tuple[str, str] | None:
    """(field, message) for the first media part a LaViDa-O server cannot take: not an image_url, a URL scheme
    other than data / http(s), or a data: URL that is not a decodable base64 image. None when all are fine. Checked
    before vLLM renders the chat, so a bad image is a 400 naming its field, not a failure deep in media loading."""
    import base64
    import binascii
    import io
    from urllib.parse import urlparse

    from PIL import Image, UnidentifiedImageError

    for path, part in _parts(messages):
        kind = _part_kind(part)
        if kind is None:
            continue
        if kind != "image_url":
            return path, f"{path}: {kind} parts are not supported (this model takes image_url parts)"
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        field = f"{path}.image_url.url"
        if not isinstance(url, str) or not url:
            return field, f"{field}: an image_url needs a url"
        scheme = urlparse(url).scheme.lower()
        if scheme not in IMAGE_URL_SCHEMES:
            return field, (f"{field}: URL scheme {scheme or '(none)'!r} is not supported; send a data: URL "
                           "(data:image/png;base64,...) or an http(s) URL")
        if scheme != "data":
            continue
        header, comma, payload = url[len("data:"):].partition(",")
        if not comma or not header.startswith("image/") or not header.endswith(";base64"):
            return field, f"{field}: a data: URL must be data:image/<format>;base64,<data>"
        try:
            with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
                image.load()
        except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as e:
            return field, f"{field}: not a decodable base64 image ({type(e).__name__}: {e})"
    return None


def _chat_media_error(serving, messages) -> tuple[str, str] | None:
    """(field, message) when the served model cannot take these chat media parts, else None."""
    from sparse_lavida_vllm.worker.vllm_model import ARCHITECTURES

    model_config = serving.model_config
    architecture = model_config.architecture
    kind = _media_part(messages) if architecture in ARCHITECTURES else None
    if kind is None:
        return None
    if architecture == _LAVIDA_O:
        from sparse_lavida_vllm.worker.lavida_o_processor import understanding_refusal

        why = understanding_refusal(model_config.model)
        if why is None:
            return image_part_error(messages)
        return "messages", f"messages: {kind} parts are not supported: {media_refusal(architecture, why)}"
    return "messages", f"messages: {kind} parts are not supported: {media_refusal(architecture)}"


def publishers_system_turn(serving, request):
    """A LaViDa-O chat as the publishers run it (llava/conversation.py `conv_templates["llada"]`): their system turn
    first when the client sends none, unless a chat template was given (`--chat-template`, or the request's own)."""
    if (serving.model_config.architecture != _LAVIDA_O or getattr(serving, "chat_template", None) is not None
            or getattr(request, "chat_template", None) is not None):
        return request
    messages = list(request.messages)
    if any((m.get("role") if isinstance(m, dict) else getattr(m, "role", None)) == "system" for m in messages):
        return request
    from sparse_lavida_vllm.multimodal.lavida_o_layout import SYSTEM_PROMPT

    return request.model_copy(update={"messages": [{"role": "system", "content": SYSTEM_PROMPT}, *messages]})


def _refuse_chat_media(render_chat_request):
    """Wrap OpenAIServingChat.render_chat_request: chat media a model cannot take (any media on LLaDA and the demo;
    LaViDa-O without its tower; a bad image) is a clear HTTP 400 naming the field, before vLLM fetches media or
    looks for a multimodal processor. A LaViDa-O chat gets the publishers' system turn (publishers_system_turn)."""

    @functools.wraps(render_chat_request)
    async def wrapper(self, request, *args, **kwargs):
        error = _chat_media_error(self, request.messages)
        if error is not None:
            return self.create_error_response(error[1], param=error[0])
        return await render_chat_request(self, publishers_system_turn(self, request), *args, **kwargs)

    wrapper.__sparse_lavida__ = True
    return wrapper


def _publishers_image_tokens(tokenize_prompt):
    """Wrap BaseRenderer._tokenize_prompt (text -> ids, for chats and text prompts, online and offline): a LaViDa-O
    prompt with images is tokenized as the publishers' tokenizer_image_token does (lavida_o_processor.
    publishers_prompt_ids), not whole; every other prompt as vLLM does."""

    @functools.wraps(tokenize_prompt)
    def wrapper(self, prompt, params):
        if self.model_config.architecture == _LAVIDA_O:
            from sparse_lavida_vllm.worker.lavida_o_processor import publishers_prompt_ids

            ids = publishers_prompt_ids(self.get_tokenizer(), prompt, params.add_special_tokens)
            if ids is not None:
                return self._build_tokens_prompt(ids, prompt)
        return tokenize_prompt(self, prompt, params)

    wrapper.__sparse_lavida__ = True
    return wrapper


def _keep_booleans(request_json):
    """Wrap starlette's Request.json: booleans in `vllm_xargs` reach the knobs as "true" / "false"; 503 when draining.

    vLLM types vllm_xargs as str | int | float | list, so pydantic turns `"steps": true` into 1 and the request
    would run; as strings, integer knobs refuse them (HTTP 400 naming the knob) and boolean knobs accept them.
    """

    @functools.wraps(request_json)
    async def wrapper(self):
        if is_draining():  # the earliest hook of every JSON route: before rendering, whose executor is gone by now
            from fastapi import HTTPException

            raise HTTPException(status_code=503, detail=SHUTTING_DOWN)
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
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.engine.async_llm import AsyncLLM

    _patch(AsyncLLM, "generate", _validate_before_streaming)
    _patch(AsyncLLM, "shutdown", mark_draining)
    async_llm_logger = logging.getLogger(AsyncLLM.__module__)
    if not any(isinstance(f, QuietOrderlyStop) for f in async_llm_logger.filters):
        async_llm_logger.addFilter(QuietOrderlyStop())
    _patch(CompletionRequest, "to_sampling_params", _refuse_best_of)
    _patch(ChatCompletionRequest, "to_sampling_params", _refuse_best_of)
    _patch(OpenAIServingChat, "render_chat_request", _refuse_chat_media)
    _patch(Request, "json", _keep_booleans)


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.renderers.base import BaseRenderer
    from vllm.sampling_params import SamplingParams
    from vllm.transformers_utils.config import _CONFIG_REGISTRY
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    from sparse_lavida_vllm.entrypoints.metrics import count_diffusion_metrics
    from sparse_lavida_vllm.worker.vllm_model import HF_CONFIGS, MODEL_CLASSES

    for config_class in HF_CONFIGS:
        _CONFIG_REGISTRY[config_class.model_type] = config_class
    for arch, model_class in MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, model_class)
        MODELS_CONFIG_MAP[arch] = DiffusionEngineConfig
    _patch(InputProcessor, "process_inputs", _validate_diffusion_request)
    _patch(BaseRenderer, "_tokenize_prompt", _publishers_image_tokens)  # before any renderer binds its async twin
    _patch(OutputProcessor, "process_outputs", count_diffusion_metrics)
    _patch(SamplingParams, "_verify_extra_args", _name_the_extra_arg)
    _patch(_CPUSHMDistributed, "_init_cpu_shm", unlink_once_joined)
    _patch(MessageQueue, "wait_until_ready", unlink_once_ready)
    die_with_parent()
