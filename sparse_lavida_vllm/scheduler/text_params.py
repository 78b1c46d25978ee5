"""Text request knobs: validated once from SamplingParams (+ extra_args) into a frozen DiffusionParams."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sparse_lavida_vllm.diffusion.planners import POLICIES, UnmaskPlan, text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.scheduler.knobs import DiffusionParamError, check_registers, read_bool, read_int

# The keys a client may put in `vllm_xargs` / `extra_body["vllm_xargs"]` / SamplingParams.extra_args.
KNOBS = ("steps", "block_length", "gen_length", "num_registers", "sparse", "remasking", "confidence_threshold")
DEFAULT_BLOCK_LENGTH = 32


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


def _number(value: Any, name: str, low: float, high: float) -> float:
    """A finite real number in [low, high] (booleans refused), for knobs and standard fields alike."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise DiffusionParamError(name, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", value)
    return float(value)


def parse_text_params(sampling_params: Any, extra: dict, prompt_len: int, max_model_len: int,
                      default_num_registers: int, default_sparse: bool, has_register_token: bool) -> DiffusionParams:
    """Validate a text request (extra_args without its kind); a bad value raises naming the field. The defaults are
    `params.parse_params`'s."""
    unknown = sorted(set(extra) - set(KNOBS))
    if unknown:
        raise DiffusionParamError(unknown[0], f"unknown diffusion knob {unknown[0]!r}; known: {', '.join(KNOBS)}")

    gen_length = read_int(extra, "gen_length", getattr(sampling_params, "max_tokens", None))
    if gen_length is None or gen_length < 1:
        raise DiffusionParamError("gen_length", f"gen_length must be >= 1, got {gen_length}", gen_length)
    if prompt_len + gen_length > max_model_len:
        raise DiffusionParamError("gen_length", f"gen_length ({gen_length}) plus the prompt ({prompt_len} tokens) "
                                  f"exceeds max_model_len ({max_model_len})", gen_length)
    default_block = DEFAULT_BLOCK_LENGTH if gen_length % DEFAULT_BLOCK_LENGTH == 0 else gen_length
    block_length = read_int(extra, "block_length", default_block)
    if block_length < 1 or gen_length % block_length:
        raise DiffusionParamError("block_length", f"block_length ({block_length}) must be >= 1 and divide "
                                  f"gen_length ({gen_length})", block_length)
    num_blocks = gen_length // block_length
    default_steps = gen_length // 2 if block_length % 2 == 0 else gen_length
    steps = read_int(extra, "steps", default_steps)
    if steps < 1:
        raise DiffusionParamError("steps", f"steps must be >= 1, got {steps}", steps)
    if steps > gen_length:
        raise DiffusionParamError("steps", f"steps ({steps}) must be <= gen_length ({gen_length})", steps)
    if steps % num_blocks:
        raise DiffusionParamError("steps", f"steps ({steps}) must be a multiple of the number of blocks "
                                  f"({num_blocks} = gen_length / block_length)", steps)
    num_registers = read_int(extra, "num_registers", default_num_registers)
    if num_registers < 0:
        raise DiffusionParamError("num_registers", f"num_registers must be >= 0, got {num_registers}", num_registers)
    if num_registers > max_model_len:  # every register is a row of every step: unbounded, one request stalls all
        raise DiffusionParamError("num_registers", f"num_registers ({num_registers}) must be <= max_model_len "
                                  f"({max_model_len})", num_registers)
    sparse = read_bool(extra, "sparse", default_sparse)
    check_registers(sparse, num_registers, has_register_token)
    remasking = extra.get("remasking", "low_confidence")
    if remasking not in POLICIES:
        raise DiffusionParamError("remasking", f"remasking must be one of {', '.join(POLICIES)}, got {remasking!r}",
                                  remasking)
    threshold = _number(extra.get("confidence_threshold", 0.9), "confidence_threshold", 0, 1)

    min_tokens = read_int({"min_tokens": getattr(sampling_params, "min_tokens", 0)}, "min_tokens", 0) or 0
    if not 0 <= min_tokens <= gen_length:
        raise DiffusionParamError("min_tokens", f"min_tokens ({min_tokens}) must be in [0, gen_length = {gen_length}]",
                                  min_tokens)

    min_p = _number(getattr(sampling_params, "min_p", 0.0) or 0.0, "min_p", 0, 1)
    allowed = tuple(int(t) for t in getattr(sampling_params, "allowed_token_ids", None) or ())
    bias = tuple((int(t), float(b)) for t, b in (getattr(sampling_params, "logit_bias", None) or {}).items())

    # vLLM bounds none of these; an integer past 64 bits would fail in the engine's transport (an empty HTTP 500)
    top_k = read_int({"top_k": getattr(sampling_params, "top_k", 0) or 0}, "top_k", 0)
    seed = read_int({"seed": getattr(sampling_params, "seed", None)}, "seed", None)
    stop_token_ids = frozenset(read_int({"stop_token_ids": t}, "stop_token_ids", None)
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
    return DiffusionParams(gen_length=gen_length, block_length=block_length, steps=steps,
                           num_registers=num_registers, sparse=sparse,
                           stop_at_eos=not bool(getattr(sampling_params, "ignore_eos", False)),
                           stop_token_ids=stop_token_ids,
                           min_tokens=min_tokens, allowed_token_ids=allowed, logit_bias=bias, min_p=float(min_p),
                           sampling=sampling)
