"""Token sampling for decode rows: top-k/top-p, Gumbel-max temperature, CFG, per-step seeded noise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_lavida_vllm.diffusion.planners import POLICIES


@dataclass(frozen=True)
class SamplingConfig:
    """Per-request sampling knobs (validated here once)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    cfg_scale: float = 0.0  # 0 = no classifier-free guidance
    remasking: str = "low_confidence"
    confidence_threshold: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.remasking not in POLICIES:
            raise ValueError(f"remasking must be one of {POLICIES}, got {self.remasking!r}")
        if not 0 <= self.confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise source of one request at one step.

    Seeding per (seed, step) rather than per request makes the draw independent of batch
    composition, of preemption and recomputation, and of which rank samples.
    """
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus top-p set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        drop_unsorted = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop_unsorted, float("-inf"))
    return logits


def constrain_logits(logits: Tensor, allowed_token_ids: Sequence[int] = (),
                     logit_bias: Mapping[int, float] | None = None, min_p: float = 0.0,
                     temperature: float = 0.0) -> Tensor:
    """The OpenAI/vLLM token constraints, in vLLM's order: allowed ids, logit bias, then min_p.

    min_p keeps the tokens whose probability at this temperature is >= min_p x the top one's, i.e.
    logit >= max logit + temperature * log(min_p); it cannot change a greedy (T = 0) choice.
    """
    if allowed_token_ids:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[list(allowed_token_ids)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if logit_bias:
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()), dtype=logits.dtype)
        logits = logits + bias
    if min_p > 0 and temperature > 0:
        floor = logits.amax(-1, keepdim=True) + temperature * math.log(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance as LaViDa-O applies it: (1 + g) * cond - g * uncond."""
    return (1 + scale) * cond - scale * uncond


def sample_tokens(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Sample one token per row; returns (tokens, confidence = probability of the sampled token).

    Temperature uses Gumbel-max in float64 as LLaDA does: argmax(exp(l) / (-log u)^T), which
    is greedy at T = 0.
    """
    logits = filter_logits(logits.float(), config.top_k, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    if config.temperature > 0:
        noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        shifted = logits.double() - logits.double().amax(-1, keepdim=True)  # exp cannot overflow
        scores = shifted.exp() / (-torch.log(noise)) ** config.temperature
        tokens = scores.max(-1).indices  # == argmax (first maximum, NaN wins), ~3x faster on CPU for wide rows
    else:
        tokens = logits.max(-1).indices
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
