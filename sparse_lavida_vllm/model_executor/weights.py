"""Load and save HF-style checkpoint folders (config.json + model.safetensors, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def save_pretrained(model: LLaDAMDM, folder: str | Path) -> None:
    folder = Path(folder)
    model.config.save(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, following model.safetensors.index.json when sharded."""
    folder = Path(folder)
    if (folder / INDEX_NAME).exists():
        shards = sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    if not (folder / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}")
    return load_file(str(folder / WEIGHTS_NAME))


def load_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> LLaDAMDM:
    config = MDMConfig.load(folder)
    model = LLaDAMDM(config)
    state = read_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match {config.architectures}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.to(device=device, dtype=dtype).eval()


def random_model(config: MDMConfig, seed: int = 0, std: float = 0.02) -> LLaDAMDM:
    """A model with seeded random weights (tests and benchmarks of shapes that have no checkpoint)."""
    gen = torch.Generator().manual_seed(seed)
    model = LLaDAMDM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
