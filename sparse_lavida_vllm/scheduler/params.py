"""Per-request diffusion knobs: the request's kind picks its frozen params (text_params / image_params), then the
standard fields the engine refuses and the operator's caps (`Limits`) apply to both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparse_lavida_vllm.scheduler.image_params import ImageParams, parse_image_params
from sparse_lavida_vllm.scheduler.knobs import DiffusionParamError, check_registers
from sparse_lavida_vllm.scheduler.text_params import DEFAULT_BLOCK_LENGTH, KNOBS, DiffusionParams, parse_text_params

# Importers read these here too: the request kinds' params and the error that names a bad knob.
__all__ = ["DEFAULT_BLOCK_LENGTH", "KNOBS", "UNSUPPORTED", "DiffusionParamError", "DiffusionParams", "ImageParams",
           "LIMIT_KEYS", "Limits", "check_limits", "parse_params"]

# Standard fields the diffusion engine refuses when set (with their neutral values): log-probabilities (the
# runner samples tokens only), penalties over "tokens generated so far" (an autoregressive notion: a canvas
# has no order of generation to penalise), multi-token constraints and structured output (they need a
# left-to-right decoder).
UNSUPPORTED = (("logprobs", None), ("prompt_logprobs", None), ("logprob_token_ids", None),
               ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
               ("bad_words", None), ("structured_outputs", None), ("thinking_token_budget", None),
               ("repetition_detection", None), ("watermarking", None))


@dataclass(frozen=True)
class Limits:
    """Server-side caps on the work of one request (operator flags: `--additional-config '{"max_steps": 256}'`).

    Step rows are what one request adds to every engine step: block_length + num_registers when sparse (the
    decode set and the registers), prompt + gen_length when dense. Request rows bound its whole forward work:
    steps x step rows + prompt + gen_length (prefill and commits). A request over a cap is refused (HTTP 400)
    instead of slowing every other request down for minutes.
    """

    max_steps: int = 1024
    max_num_registers: int = 256
    max_step_rows: int = 4096
    max_request_rows: int = 262_144

    @classmethod
    def from_config(cls, additional_config: dict | None) -> Limits:
        """The caps set in vLLM's additional_config (a bad value is a ValueError naming the key, at startup)."""
        config = additional_config or {}
        values = {}
        for name in LIMIT_KEYS:
            if name in config:
                value = config[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"additional_config {name} must be an integer >= 1, got {value!r}")
                values[name] = value
        return cls(**values)


LIMIT_KEYS = ("max_steps", "max_num_registers", "max_step_rows", "max_request_rows")


def _over(name: str, value: int, cap: str, limit: int, what: str = "") -> DiffusionParamError:
    return DiffusionParamError(name, f"{name} ({value}{what}) exceeds the server limit {cap} = {limit} (an "
                               f"operator sets it with --additional-config '{{\"{cap}\": N}}')", value)


def check_limits(params: DiffusionParams | ImageParams, prompt_len: int, limits: Limits) -> None:
    """Refuse a request over one of the operator's caps; the error names the knob and the cap."""
    if params.steps > limits.max_steps:
        raise _over("steps", params.steps, "max_steps", limits.max_steps)
    if params.sparse and params.num_registers > limits.max_num_registers:
        raise _over("num_registers", params.num_registers, "max_num_registers", limits.max_num_registers)
    if params.kind != "text":  # an image step decodes a share of a canvas its grid already bounds
        return
    if params.sparse:
        name, step_rows = "block_length", params.block_length + params.num_registers
        what = f"; + num_registers = {step_rows} rows per step"
    else:
        name, step_rows = "gen_length", prompt_len + params.gen_length
        what = f"; + the prompt = {step_rows} rows per dense step"
    if step_rows > limits.max_step_rows:
        raise _over(name, getattr(params, name), "max_step_rows", limits.max_step_rows, what)
    request_rows = params.steps * step_rows + prompt_len + params.gen_length
    if request_rows > limits.max_request_rows:
        raise _over("steps", params.steps, "max_request_rows", limits.max_request_rows,
                    f"; x {step_rows} rows per step = about {request_rows} rows in all")


def parse_params(sampling_params: Any, prompt_len: int, max_model_len: int, default_num_registers: int, *,
                 default_sparse: bool = True, has_register_token: bool = True,
                 limits: Limits | None = None) -> DiffusionParams | ImageParams:
    """Read the standard fields (temperature, top_p, top_k, seed, max_tokens, ignore_eos) and the knobs.

    Defaults: gen_length = max_tokens, block_length = 32 when it divides gen_length (else
    gen_length), steps = half the tokens (else one per token), num_registers from the checkpoint, sparse
    sampling when the checkpoint was trained for it (`default_sparse`: its config's block_causal),
    seed drawn at random (as vLLM does for unseeded sampling, so n > 1 choices differ; greedy
    low-confidence decoding draws no noise and stays deterministic). With `limits`, the operator's caps apply too.
    """
    for name, default in UNSUPPORTED:  # refused, not silently ignored
        value = getattr(sampling_params, name, default)
        if value is None or value is False or value == default or (isinstance(value, list | dict) and not value):
            continue
        what = "structured_outputs (response_format, guided decoding)" if name == "structured_outputs" else name
        raise DiffusionParamError(name, f"{what} is not supported by the diffusion engine", value)
    extra = dict(getattr(sampling_params, "extra_args", None) or {})
    kind = extra.pop("kind", "text")
    if kind == "image":  # one frozen params type per request kind
        params = parse_image_params(sampling_params, {**extra, "kind": kind}, prompt_len, max_model_len,
                                    default_num_registers, default_sparse)
        check_registers(params.sparse, params.num_registers, has_register_token)
        if limits is not None:
            check_limits(params, prompt_len, limits)
        return params
    if kind != "text":
        raise DiffusionParamError("kind", f"kind must be text or image, got {kind!r}", kind)
    params = parse_text_params(sampling_params, extra, prompt_len, max_model_len, default_num_registers,
                               default_sparse, has_register_token)
    if limits is not None:
        check_limits(params, prompt_len, limits)
    return params
