"""Two (or more) real gloo ranks in processes, for the tensor-parallel tests of the pure-PyTorch models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_lavida_vllm.model_executor.parallel import TorchDistributedTP


def _rank_main(rank: int, world: int, out_dir: str, collect: Callable[[TorchDistributedTP], dict]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    try:
        torch.save(collect(TorchDistributedTP()), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(collect: Callable[[TorchDistributedTP], dict], out_dir: Path, world: int = 2) -> list[dict]:
    """What `collect(tp)` returns on each of `world` ranks, in rank order. `collect` must pickle (a module-level
    function or a functools.partial of one): each rank is a spawned process."""
    mp.spawn(_rank_main, args=(world, str(out_dir), collect), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
