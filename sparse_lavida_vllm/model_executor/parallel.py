"""Tensor-parallel state for the model: which rank this is, how many there are, and the all-reduce (no vLLM import)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch.distributed as dist
from torch import Tensor


class TensorParallel(ABC):
    """What a Megatron-style sharded model needs from its process group.

    Column-parallel layers need `rank` and `world_size` to pick their slice; each row-parallel
    layer's partial output is summed over the group with `all_reduce`. The served path gets this
    from vLLM's parallel state (worker/vllm_model.py); tests and scripts from torch.distributed.
    """

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of x over every rank of the group (may reuse x's storage)."""


class SingleRank(TensorParallel):
    """One rank holding the whole model: the all-reduce is the identity, so the arithmetic is the unsharded one."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: Tensor) -> Tensor:
        return x

    def __repr__(self) -> str:
        return "SingleRank()"


class TorchDistributedTP(TensorParallel):
    """Tensor parallelism over a torch.distributed process group (the default group when `group` is None)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchDistributedTP needs torch.distributed.init_process_group() first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)  # in place: x is a fresh matmul output nobody else holds
        return x

    def __repr__(self) -> str:
        return f"TorchDistributedTP(rank={self.rank}, world_size={self.world_size})"
