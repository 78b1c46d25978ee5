"""Load and save HF-style checkpoint folders (config.json + model.safetensors, sharded or not)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.parallel import TensorParallel

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def save_pretrained(model: LLaDAMDM, folder: str | Path, max_shard_tensors: int | None = None) -> None:
    """config.json + model.safetensors; with `max_shard_tensors`, the published (HF) sharded layout instead:
    model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    if model.tp.world_size > 1:
        raise ValueError("save_pretrained needs the whole model; this one is one tensor-parallel shard")
    folder = Path(folder)
    model.config.save(folder)
    save_state_dict(model.state_dict(), folder, max_shard_tensors)


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: str | Path,
                    max_shard_tensors: int | None = None) -> None:
    """model.safetensors, or with `max_shard_tensors` the HF sharded layout (model-0000i-of-0000n.safetensors +
    model.safetensors.index.json), as published checkpoints ship."""
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if not max_shard_tensors:
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    names = sorted(state)
    chunks = [names[i:i + max_shard_tensors] for i in range(0, len(names), max_shard_tensors)]
    weight_map = {}
    for i, chunk in enumerate(chunks, start=1):
        shard = f"model-{i:05d}-of-{len(chunks):05d}.safetensors"
        save_file({n: state[n] for n in chunk}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")


def check_safetensors(path: str | Path) -> None:
    """Read a .safetensors file's header only; a file that is not one is a ValueError naming it.

    The safetensors reader itself fails on such a file with messages like "cannot fit 'int' into an index-sized
    integer" (the first 8 bytes are the header's length) that do not say which file is broken.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= header_len <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (its header length field reads {header_len} for a "
                             f"file of {size} bytes); re-download or re-save the checkpoint")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {e}); re-download or "
                             f"re-save the checkpoint") from None
    data = size - 8 - header_len
    for name, info in header.items() if isinstance(header, dict) else [("header", None)]:
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data):
            raise ValueError(f"{path} is truncated or not a safetensors file (tensor {name!r} lies outside its "
                             f"{data} data bytes); re-download or re-save the checkpoint")


def _load(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors(path)
    return load_file(str(path))


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, following model.safetensors.index.json when sharded."""
    folder = Path(folder)
    if (folder / INDEX_NAME).exists():
        shards = sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load(folder / shard))
        return state
    if not (folder / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}")
    return _load(folder / WEIGHTS_NAME)


def shard_state_dict(state: dict[str, torch.Tensor], model: LLaDAMDM) -> dict[str, torch.Tensor]:
    """The slices of a full state dict that `model`'s tensor-parallel rank holds (the same dict on one rank)."""
    if model.tp.world_size == 1:
        return state
    return {name: model.load_shard(name, tensor) for name, tensor in state.items()}


def load_weights_into(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                      owner: str = "") -> set[str]:
    """Copy full checkpoint tensors into `model` (this rank's slice of each: any model with `load_shard` and `tp`,
    LLaDAMDM or LaViDaOMDM); every bad or missing name is a ValueError naming the tensor (`owner` says whose
    parameters it is not). What vLLM's loaders call (SparseLLaDAForVLLM / LlavaLladaForVLLM.load_weights)."""
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in weights:
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} in the checkpoint{owner}")
        shard = model.load_shard(name, tensor)
        if shard.shape != params[name].shape:  # copy_ would broadcast a wrong shape silently
            raise ValueError(f"weight {name!r}: checkpoint shard {tuple(shard.shape)} does not fit the "
                             f"parameter {tuple(params[name].shape)} (tensor-parallel {model.tp})")
        with torch.no_grad():
            params[name].copy_(shard.to(params[name].dtype))
        loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")
    return loaded


def load_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    tp: TensorParallel | None = None) -> LLaDAMDM:
    """The checkpoint in `folder` as a model; with `tp`, only this rank's shard of it (Megatron-style)."""
    config = MDMConfig.load(folder)
    model = LLaDAMDM(config, tp)
    state = shard_state_dict(read_state_dict(folder), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match {config.architectures}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.to(device=device, dtype=dtype).eval()


def random_model(config: MDMConfig, seed: int = 0, std: float = 0.02, tp: TensorParallel | None = None) -> LLaDAMDM:
    """A model with seeded random weights (tests and benchmarks of shapes that have no checkpoint).

    With `tp`, this rank's shard of the same weights: every rank draws the whole model, then slices it.
    """
    gen = torch.Generator().manual_seed(seed)
    model = LLaDAMDM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    if tp is not None:
        shard = LLaDAMDM(config, tp)
        shard.load_state_dict(shard_state_dict(model.state_dict(), shard))
        model = shard
    return model.eval()
