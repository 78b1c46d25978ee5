"""Per-request diffusion knobs: parsed and validated once from SamplingParams (+ extra_args) into a frozen object."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparse_lavida_vllm.diffusion.planners import POLICIES, UnmaskPlan, text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig

if TYPE_CHECKING:
    from sparse_lavida_vllm.scheduler.image_params import ImageParams

# The keys a client may put in `vllm_xargs` / `extra_body["vllm_xargs"]` / SamplingParams.extra_args.
KNOBS = ("steps", "block_length", "gen_length", "num_registers", "sparse", "remasking", "confidence_threshold")
DEFAULT_BLOCK_LENGTH = 32
# Standard fields the diffusion engine refuses when set (with their neutral values): log-probabilities (the
# runner samples tokens only), penalties over "tokens generated so far" (an autoregressive notion: a canvas
# has no order of generation to penalise), multi-token constraints and structured output (they need a
# left-to-right decoder).
UNSUPPORTED = (("logprobs", None), ("prompt_logprobs", None), ("logprob_token_ids", None),
               ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
               ("bad_words", None), ("structured_outputs", None), ("thinking_token_budget", None),
               ("repetition_detection", None), ("watermarking", None))


class DiffusionParamError(ValueError):
    """A bad request knob; `field` names it (the API server answers 400 with it)."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


@dataclass(frozen=True)
class DiffusionParams:
    gen_length: int
    block_length: int
    steps: int
    num_registers: int
    sparse: bool
    stop_at_eos: bool
    stop_token_ids: frozenset[int]
    min_tokens: int  # EOS / stop tokens are banned at response positions below this
    allowed_token_ids: tuple[int, ...]  # empty: every token
    logit_bias: tuple[tuple[int, float], ...]  # (token id, bias) pairs, already clamped by vLLM
    min_p: float
    sampling: SamplingConfig

    kind = "text"

    def plan(self) -> UnmaskPlan:
        return text_plan(self.gen_length, self.block_length, self.steps)

    def branch_prompts(self, prompt: list[int], mask_id: int) -> list[list[int]]:
        return [prompt]  # text requests run no guidance branches


def _int(extra: dict, name: str, default: int | None) -> int | None:
    """An integer knob: ints, integral floats and numeric strings; booleans, NaN and infinities are refused."""
    value = extra.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DiffusionParamError(name, f"{name} must be an integer, got {value!r}", value)
    try:
        as_int = int(value)
    except (ValueError, OverflowError):  # int('x'), int(nan): ValueError; int(inf): OverflowError
        raise DiffusionParamError(name, f"{name} must be an integer, got {value!r}", value) from None
    if isinstance(value, float) and value != as_int:
        raise DiffusionParamError(name, f"{name} must be an integer, got {value!r}", value)
    if not -(2**63) <= as_int < 2**63:  # no knob is meaningful out here; keeps messages short
        raise DiffusionParamError(name, f"{name} is out of range, got {str(value)[:24]}...", value)
    return as_int


def _number(value: Any, name: str, low: float, high: float) -> float:
    """A finite real number in [low, high] (booleans refused), for knobs and standard fields alike."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise DiffusionParamError(name, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", value)
    return float(value)


def _bool(extra: dict, name: str, default: bool) -> bool:
    value = extra.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):  # the OpenAI server's vllm_xargs turns false into 0
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise DiffusionParamError(name, f"{name} must be true or false, got {value!r}", value)


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


def _check_registers(sparse: bool, num_registers: int, has_register_token: bool) -> None:
    if sparse and num_registers and not has_register_token:
        raise DiffusionParamError("num_registers", f"num_registers ({num_registers}) needs a register token, and this "
                                  "checkpoint's config.json names none (register_token_id): use 0", num_registers)


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
        from sparse_lavida_vllm.scheduler.image_params import parse_image_params

        params = parse_image_params(sampling_params, {**extra, "kind": kind}, prompt_len, max_model_len,
                                    default_num_registers, default_sparse)
        _check_registers(params.sparse, params.num_registers, has_register_token)
        if limits is not None:
            check_limits(params, prompt_len, limits)
        return params
    if kind != "text":
        raise DiffusionParamError("kind", f"kind must be text or image, got {kind!r}", kind)
    unknown = sorted(set(extra) - set(KNOBS))
    if unknown:
        raise DiffusionParamError(unknown[0], f"unknown diffusion knob {unknown[0]!r}; known: {', '.join(KNOBS)}")

    gen_length = _int(extra, "gen_length", getattr(sampling_params, "max_tokens", None))
    if gen_length is None or gen_length < 1:
        raise DiffusionParamError("gen_length", f"gen_length must be >= 1, got {gen_length}", gen_length)
    if prompt_len + gen_length > max_model_len:
        raise DiffusionParamError("gen_length", f"gen_length ({gen_length}) plus the prompt ({prompt_len} tokens) "
                                  f"exceeds max_model_len ({max_model_len})", gen_length)
    default_block = DEFAULT_BLOCK_LENGTH if gen_length % DEFAULT_BLOCK_LENGTH == 0 else gen_length
    block_length = _int(extra, "block_length", default_block)
    if block_length < 1 or gen_length % block_length:
        raise DiffusionParamError("block_length", f"block_length ({block_length}) must be >= 1 and divide "
                                  f"gen_length ({gen_length})", block_length)
    num_blocks = gen_length // block_length
    default_steps = gen_length // 2 if block_length % 2 == 0 else gen_length
    steps = _int(extra, "steps", default_steps)
    if steps < 1:
        raise DiffusionParamError("steps", f"steps must be >= 1, got {steps}", steps)
    if steps > gen_length:
        raise DiffusionParamError("steps", f"steps ({steps}) must be <= gen_length ({gen_length})", steps)
    if steps % num_blocks:
        raise DiffusionParamError("steps", f"steps ({steps}) must be a multiple of the number of blocks "
                                  f"({num_blocks} = gen_length / block_length)", steps)
    num_registers = _int(extra, "num_registers", default_num_registers)
    if num_registers < 0:
        raise DiffusionParamError("num_registers", f"num_registers must be >= 0, got {num_registers}", num_registers)
    if num_registers > max_model_len:  # every register is a row of every step: unbounded, one request stalls all
        raise DiffusionParamError("num_registers", f"num_registers ({num_registers}) must be <= max_model_len "
                                  f"({max_model_len})", num_registers)
    sparse = _bool(extra, "sparse", default_sparse)
    _check_registers(sparse, num_registers, has_register_token)
    remasking = extra.get("remasking", "low_confidence")
    if remasking not in POLICIES:
        raise DiffusionParamError("remasking", f"remasking must be one of {', '.join(POLICIES)}, got {remasking!r}",
                                  remasking)
    threshold = _number(extra.get("confidence_threshold", 0.9), "confidence_threshold", 0, 1)

    min_tokens = _int({"min_tokens": getattr(sampling_params, "min_tokens", 0)}, "min_tokens", 0) or 0
    if not 0 <= min_tokens <= gen_length:
        raise DiffusionParamError("min_tokens", f"min_tokens ({min_tokens}) must be in [0, gen_length = {gen_length}]",
                                  min_tokens)

    min_p = _number(getattr(sampling_params, "min_p", 0.0) or 0.0, "min_p", 0, 1)
    allowed = tuple(int(t) for t in getattr(sampling_params, "allowed_token_ids", None) or ())
    bias = tuple((int(t), float(b)) for t, b in (getattr(sampling_params, "logit_bias", None) or {}).items())

    # vLLM bounds none of these; an integer past 64 bits would fail in the engine's transport (an empty HTTP 500)
    top_k = _int({"top_k": getattr(sampling_params, "top_k", 0) or 0}, "top_k", 0)
    seed = _int({"seed": getattr(sampling_params, "seed", None)}, "seed", None)
    stop_token_ids = frozenset(_int({"stop_token_ids": t}, "stop_token_ids", None)
                               for t in getattr(sampling_params, "stop_token_ids", None) or ())
    if seed is None:
        seed = secrets.randbits(62)
    try:
        sampling = SamplingConfig(temperature=float(getattr(sampling_params, "temperature", 0.0)),
                                  top_k=max(top_k, 0), top_p=float(getattr(sampling_params, "top_p", 1.0)),
                                  remasking=remasking, confidence_threshold=float(threshold),
                                  seed=int(seed))
    except ValueError as e:  # SamplingConfig's messages start with the field name
        raise DiffusionParamError(str(e).split()[0], str(e)) from None
    params = DiffusionParams(gen_length=gen_length, block_length=block_length, steps=steps,
                           num_registers=num_registers, sparse=sparse,
                           stop_at_eos=not bool(getattr(sampling_params, "ignore_eos", False)),
                           stop_token_ids=stop_token_ids,
                           min_tokens=min_tokens, allowed_token_ids=allowed, logit_bias=bias, min_p=float(min_p),
                           sampling=sampling)
    if limits is not None:
        check_limits(params, prompt_len, limits)
    return params
