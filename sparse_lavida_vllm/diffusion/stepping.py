"""One denoising step's bookkeeping, shared by the reference drivers and the engine: walk the plan, sample, choose."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sparse_lavida_vllm.diffusion.planners import UnmaskPlan, choose_tokens
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig, sample_tokens, step_generator


def sample_and_choose(logits: Tensor, decode: Tensor, count: int | None, sampling: SamplingConfig,
                      step: int) -> tuple[Tensor, Tensor]:
    """Sample the decode rows with the (seed, step) noise, then let the policy keep some: (kept indices, tokens).

    Shared by the reference samplers and the vLLM runner so both draw exactly the same numbers (I4).
    """
    gen = step_generator(sampling.seed, step, logits.device)
    tokens, confidence = sample_tokens(logits, sampling, gen)
    if count is not None and count >= decode.numel():
        keep = torch.arange(decode.numel(), device=decode.device)
    else:
        keep = choose_tokens(sampling.remasking, confidence, count or decode.numel(),
                             sampling.confidence_threshold, gen)
    return keep, tokens[keep]


class PlanWalker:
    """Walks the plan: holds the response canvas and the still-masked positions of the current stage.

    The vLLM scheduler walks requests with this same class, so decode sets and counts match the reference.
    """

    def __init__(self, plan: UnmaskPlan, sampling: SamplingConfig, response: Tensor) -> None:
        self.plan = plan
        self.by_threshold = sampling.remasking == "threshold"
        self.response = response
        self.remaining = torch.empty(0, dtype=torch.long)

    def decode_sets(self) -> Iterator[tuple[Tensor, int | None]]:
        """(decode set, tokens to keep) per step; None lets the threshold policy decide how many."""
        for stage in self.plan.stages:
            self.remaining = stage.positions.to(self.response.device)
            counts = iter(stage.counts)
            while self.remaining.numel():
                count = next(counts, self.remaining.numel())
                yield self.remaining, (None if self.by_threshold and len(stage.counts) > 1 else count)

    def commit(self, decode: Tensor, keep: Tensor, tokens: Tensor) -> Tensor:
        chosen = decode[keep]
        self.response[chosen] = tokens
        left = torch.ones(decode.numel(), dtype=torch.bool, device=decode.device)
        left[keep] = False
        self.remaining = decode[left]
        return chosen

