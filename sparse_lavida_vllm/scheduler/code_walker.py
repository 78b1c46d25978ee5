"""Walks a plan over single VQ codes (LaViDa-O's own sampler) on a canvas of packed 2x2 positions."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sparse_lavida_vllm.diffusion.planners import UnmaskPlan, code_step
from sparse_lavida_vllm.model_executor.patch_ids import PatchIds


class CodeWalker:
    """PlanWalker's interface for `ImageParams.per_code`: a step's decode set is the positions its codes sit in
    (ascending, as `lavida_o.generate_image_dense(code_width=...)` runs them), every one of them sampled whole by the
    runner; a commit writes only this step's codes into the packed patches and leaves the rest as they were (mask
    codes included), so the next dense step feeds partly decoded patches. `commit` returns the positions it made
    whole (no mask code left): the scheduler marks only those decoded."""

    def __init__(self, plan: UnmaskPlan, response: Tensor, patch_ids: PatchIds, code_width: int) -> None:
        self.plan = plan
        self.response = response
        self.patch_ids = patch_ids
        self.code_width = code_width
        self._taken: Tensor | None = None  # (positions, 4) bool: which codes of the decode set this step commits

    def decode_sets(self) -> Iterator[tuple[Tensor, int]]:
        for stage in self.plan.stages:
            decode, self._taken = code_step(stage.positions, self.code_width)
            yield decode, decode.numel()

    def commit(self, decode: Tensor, keep: Tensor, tokens: Tensor) -> Tensor:
        if keep.tolist() != list(range(decode.numel())):
            raise ValueError("a per-code step samples every position of its decode set, in order")
        old, new = self.patch_ids.unpack(self.response[decode]), self.patch_ids.unpack(tokens)
        merged = torch.where(self._taken, new, old)
        self.response[decode] = self.patch_ids.pack(merged)
        return decode[(merged != self.patch_ids.mask_code).all(-1)]  # the positions now whole: emitted when all are
