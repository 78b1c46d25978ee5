"""LaViDa-O checkpoints in the published layout (config.json, safetensors + index, `vqvae/`): read, written, random."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from sparse_lavida_vllm.model_executor.lavida_o_config import (
    ARCHITECTURE,
    CONFIG_NAME,
    VQ_SUBFOLDER,
    LaViDaOConfig,
    load_config,
    read_json,
)
from sparse_lavida_vllm.model_executor.lavida_o_model import LaViDaOMDM
from sparse_lavida_vllm.model_executor.lavida_o_vision import UNDERSTANDING_PREFIXES, dropped_by_publishers
from sparse_lavida_vllm.model_executor.model import RMSNorm
from sparse_lavida_vllm.model_executor.parallel import TensorParallel
from sparse_lavida_vllm.model_executor.weights import INDEX_NAME, WEIGHTS_NAME, save_state_dict

# Published-checkpoint namespaces the model never holds: the VQ copy (loaded from vqvae/ by multimodal.vq).
IGNORED_PREFIXES = ("model.vqvae.",)


def read_checkpoint_tensors(folder: str | Path) -> dict[str, tuple[Tensor, str]]:
    """Every tensor of the checkpoint with the file it came from; sharded (index) or single file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out: dict[str, tuple[Tensor, str]] = {}
    if (folder / INDEX_NAME).exists():
        weight_map = read_json(folder / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{folder / INDEX_NAME} has no weight_map")
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ValueError(f"shard {folder / shard} (named in {INDEX_NAME}) is missing")
            for name, tensor in load_file(str(folder / shard)).items():
                out[name] = (tensor, shard)
        for name, shard in weight_map.items():
            if name not in out:
                raise ValueError(f"tensor {name}: {INDEX_NAME} maps it to {shard}, which does not hold it")
        return out
    if not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}")
    return {name: (tensor, WEIGHTS_NAME) for name, tensor in load_file(str(folder / WEIGHTS_NAME)).items()}


def load_lavida_o(folder: str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", tp: TensorParallel | None = None) -> LaViDaOMDM:
    """A LaViDa-O / Sparse-LaViDa checkpoint folder as a model (with `tp`, this rank's shard of it); one clear
    ValueError per bad file or tensor."""
    folder = Path(folder)
    config = load_config(folder)
    model = LaViDaOMDM(config, tp)
    expected = model.state_dict()
    found = read_checkpoint_tensors(folder)
    state: dict[str, Tensor] = {}
    vision = config.understanding
    for name, (tensor, source) in found.items():
        if name.startswith(IGNORED_PREFIXES):
            continue  # the VQ copy: not part of this model
        if name.startswith(UNDERSTANDING_PREFIXES) and (vision is None or dropped_by_publishers(name, vision)):
            continue  # no vision tower declared, or what SigLipVisionTower.load_model deletes (last layer, head)
        if name not in expected:
            raise ValueError(f"tensor {name} in {folder / source} is not a parameter of {ARCHITECTURE} "
                             f"with this config.json")
        shard = model.load_shard(name, tensor)
        if tuple(shard.shape) != tuple(expected[name].shape):
            rank = f" (tensor-parallel {model.tp}: this rank's slice is {tuple(shard.shape)})" \
                if model.tp.world_size > 1 else ""
            raise ValueError(f"tensor {name} in {folder / source} has shape {tuple(tensor.shape)}, config.json "
                             f"implies {tuple(expected[name].shape)}{rank}")
        state[name] = shard
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"tensor {missing[0]}{more} is missing from the checkpoint in {folder}")
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def save_lavida_o(model: LaViDaOMDM, folder: str | Path, max_shard_tensors: int | None = None) -> None:
    """config.json + safetensors in the published layout; with `max_shard_tensors`, sharded with an index."""
    if model.tp.world_size > 1:
        raise ValueError("save_lavida_o needs the whole model; this one is one tensor-parallel shard")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_state_dict(model.state_dict(), folder, max_shard_tensors)


def random_lavida_o(config: LaViDaOConfig, seed: int = 0, std: float = 0.05,
                    tp: TensorParallel | None = None) -> LaViDaOMDM:
    """Seeded random weights (norms at 1), for tests and shapes with no checkpoint. With `tp`, this rank's shard of
    the same weights (every rank draws the whole model, then slices it)."""
    gen = torch.Generator().manual_seed(seed)
    model = LaViDaOMDM(config)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm | nn.LayerNorm)}  # SigLIP's LayerNorms
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))  # not exactly 1: names must matter
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    if tp is not None and tp.world_size > 1:
        shard = LaViDaOMDM(config, tp)
        shard.load_state_dict({name: shard.load_shard(name, t) for name, t in model.state_dict().items()})
        model = shard
    return model.eval()


def write_tiny_checkpoint(folder: str | Path, config: LaViDaOConfig, seed: int = 0,
                          max_shard_tensors: int | None = None, vq_block_channels: tuple[int, ...] = (8, 16, 16),
                          vq_sample_size: int = 16, std: float = 0.05) -> LaViDaOMDM:
    """A random checkpoint in the published layout: config.json, safetensors (+ index), and a tiny diffusers VQModel
    in vqvae/ whose codebook has config.num_vq_embeddings codes. Returns the model written. A larger `std` gives
    decisive logits (token-for-token comparisons across GEMM shapes)."""
    from diffusers import VQModel

    folder = Path(folder)
    model = random_lavida_o(config, seed, std)
    save_lavida_o(model, folder, max_shard_tensors)
    torch.manual_seed(seed)
    blocks = len(vq_block_channels)
    vq = VQModel(block_out_channels=vq_block_channels, down_block_types=("DownEncoderBlock2D",) * blocks,
                 up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1,
                 latent_channels=4, norm_num_groups=4, num_vq_embeddings=config.num_vq_embeddings,
                 sample_size=vq_sample_size, mid_block_add_attention=False, lookup_from_codebook=True)
    vq.quantize.embedding.weight.data.normal_(0.0, 0.5)  # a spread codebook, as trained ones are
    vq.save_pretrained(folder / VQ_SUBFOLDER)
    return model

