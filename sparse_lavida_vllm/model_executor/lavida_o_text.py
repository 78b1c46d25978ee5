"""LaViDa-O / Sparse-LaViDa's text path as the LLaDA tower: its config as an MDMConfig, its tensors as LLaDAMDM's.

A pass whose rows are all text runs, in `LaViDaOMDM`, through `model.transformer.{wte, blocks.N.<text weights>,
ln_f, ff_out}` only: the `*_vision` block weights are read by image rows, and per-modality layers
(> dual_tower_layers) differ from joint ones only when image keys exist (`LaViDaOMDM.wrap_attention`). That is
`LLaDAMDM` with the same tensor names, so the served text path is our LLaDA engine (paged KV, step-causal sparse
path, tensor parallelism, batching) over a `llava_llada` checkpoint's text tower: what the server runs when the whole
model cannot be served (no vqvae/: `serves_lavida_o_images`; the whole model shards over tensor-parallel ranks
too, lavida_o_model.py). What only image rows read
(the generation branch, the understanding tower, the VQ copy) is listed and skipped, never loaded.

No vLLM import here: the vLLM classes live in worker/vllm_model.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.lavida_o_config import (
    ARCHITECTURE,
    CONFIG_NAME,
    OWNED_KEYS,
    VQ_SUBFOLDER,
    LaViDaOConfig,
)
from sparse_lavida_vllm.model_executor.lavida_o_model import LaViDaOBlock
from sparse_lavida_vllm.model_executor.lavida_o_vision import UNDERSTANDING_PREFIXES
from sparse_lavida_vllm.model_executor.lavida_o_weights import IGNORED_PREFIXES, read_checkpoint_tensors
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.parallel import TensorParallel
from sparse_lavida_vllm.model_executor.weights import load_weights_into

TEXT_PREFIX = "model.transformer."
# Tensors only image rows read: the generation branch, the understanding modules, the VQ copy (multimodal.vq).
IMAGE_PATH_PREFIXES = ("model.gen_", "model.downsample_gen.", "model.upsample_gen.", *UNDERSTANDING_PREFIXES,
                       *IGNORED_PREFIXES)
# config.json keys only the image path reads. LaViDaOConfig.from_dict refuses the branches lavida_o_model.py does
# not model (other projectors, gen MLPs, ...); none of them changes a text row, so the text path does not read them.
IMAGE_PATH_KEYS = frozenset(OWNED_KEYS) | {"gen_mlp_type", "extra_gen_dit", "unified_gen_enc"}


def lavida_config(raw: dict) -> LaViDaOConfig:
    """The LaViDaOConfig of a `llava_llada` config.json as the text path reads it (no vqvae/config.json needed)."""
    return LaViDaOConfig.from_dict({k: v for k, v in raw.items() if k not in IMAGE_PATH_KEYS})


def text_tower_config(config: LaViDaOConfig) -> MDMConfig:
    """The LLaDA tower's MDMConfig. Defaults follow the checkpoint: step-causal training (`block_causal`) makes
    requests sparse by default; text registers (the first of `num_register_tokens`) only with a declared
    `register_token_id` (never an invented id). Plain LaViDa-O declares neither: dense by default, like LLaDA."""
    registers = config.registers("text") if config.register_token_id is not None else 0
    return MDMConfig(vocab_size=config.vocab_size, d_model=config.d_model, n_layers=config.n_layers,
                     n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, mlp_hidden_size=config.mlp_hidden_size,
                     rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
                     max_sequence_length=config.max_sequence_length, mask_token_id=config.mask_token_id,
                     register_token_id=config.register_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, num_registers=registers, block_causal=config.block_causal,
                     model_type=config.model_type, architectures=config.architectures)


def unused_text_registers(config: LaViDaOConfig) -> int:
    """Text registers the checkpoint was trained with but cannot be served (no register_token_id names their row)."""
    return config.registers("text") if config.register_token_id is None else 0


def serves_lavida_o_images(model: str | Path) -> str | None:
    """None when a `llava_llada` checkpoint is served whole (text and image rows: worker/vllm_model.LlavaLladaForVLLM,
    with any tensor_parallel_size: both streams shard), else why only its text path is (this file's mapping)."""
    if not (Path(model) / VQ_SUBFOLDER / CONFIG_NAME).is_file():
        return (f"the checkpoint has no {VQ_SUBFOLDER}/{CONFIG_NAME} (the VQ codec of its images); this server serves "
                "its text path")
    return None


def _vision_shapes(config: LaViDaOConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one block's `*_vision` tensors (all blocks have the same), built on the meta device (no memory)."""
    with torch.device("meta"):
        block = LaViDaOBlock(config)
    return {name: tuple(p.shape) for name, p in block.named_parameters() if "_vision" in name}


def text_tower_weights(weights: Iterable[tuple[str, Tensor]], config: LaViDaOConfig,
                       skipped: list[str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """The `model.transformer.*` text tensors of a `llava_llada` checkpoint, under LLaDAMDM's (identical) names.

    Image-path tensors are skipped and appended to `skipped`; per-block `*_vision` tensors are shape-checked
    first (config.json fixes them). A tensor that is neither is a ValueError naming it. Missing or misshapen text
    tensors are caught by `load_weights_into`, which reads this stream.
    """
    vision = _vision_shapes(config) if config.dual_tower else {}
    for name, tensor in weights:
        if name.startswith(IMAGE_PATH_PREFIXES):
            if skipped is not None:
                skipped.append(name)
            continue
        parts = name.split(".")
        local = ".".join(parts[4:])
        if name.startswith(TEXT_PREFIX + "blocks.") and "_vision" in local:
            if not (parts[3].isdigit() and int(parts[3]) < config.n_layers and local in vision):
                raise ValueError(f"tensor {name} is not a parameter of {ARCHITECTURE} with this "
                                 "config.json")
            if tuple(tensor.shape) != vision[local]:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{vision[local]}")
            if skipped is not None:
                skipped.append(name)
            continue
        if not name.startswith(TEXT_PREFIX):
            raise ValueError(f"tensor {name} is not a parameter of {ARCHITECTURE} (neither the text "
                             f"tower {TEXT_PREFIX}* nor an image-path module)")
        yield name, tensor


def summarize_skipped(names: list[str]) -> str:
    """'N tensors: model.gen_embedding (1), model.transformer.blocks.*_vision (16), ...' for the load log."""
    groups: dict[str, int] = {}
    for name in names:
        key = f"{TEXT_PREFIX}blocks.*_vision" if name.startswith(TEXT_PREFIX) else ".".join(name.split(".")[:2])
        groups[key] = groups.get(key, 0) + 1
    return f"{len(names)} tensors: " + ", ".join(f"{k} ({n})" for k, n in sorted(groups.items()))


def load_text_tower(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    tp: TensorParallel | None = None) -> LLaDAMDM:
    """A `llava_llada` checkpoint's text tower as LLaDAMDM (this rank's shard with `tp`), loaded as vLLM loads it."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    config = lavida_config(json.loads(path.read_text()))
    model = LLaDAMDM(text_tower_config(config), tp)
    tensors = ((name, tensor) for name, (tensor, _) in read_checkpoint_tensors(folder).items())
    load_weights_into(model, text_tower_weights(tensors, config))
    return model.to(device=device, dtype=dtype).eval()


__all__ = ["lavida_config", "text_tower_config", "text_tower_weights", "load_text_tower", "unused_text_registers",
           "summarize_skipped", "serves_lavida_o_images", "IMAGE_PATH_PREFIXES", "IMAGE_PATH_KEYS"]
