"""Our MDMs as vLLM sees them: HF config classes for model_types "llada" and "llava_llada", vLLM model classes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import fields

from torch import Tensor
from transformers import PretrainedConfig

from sparse_lavida_vllm.model_executor.config import ARCHITECTURE, LLADA_ARCHITECTURE, MDMConfig
from sparse_lavida_vllm.model_executor.lavida_o import ARCHITECTURE as LAVIDA_O_ARCHITECTURE
from sparse_lavida_vllm.model_executor.lavida_o import MODEL_TYPE as LAVIDA_O_MODEL_TYPE
from sparse_lavida_vllm.model_executor.lavida_o_text import (
    lavida_config,
    summarize_skipped,
    text_tower_config,
    text_tower_weights,
    unused_text_registers,
)
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.parallel import TensorParallel
from sparse_lavida_vllm.model_executor.weights import load_weights_into

ARCHITECTURES = (ARCHITECTURE, LLADA_ARCHITECTURE, LAVIDA_O_ARCHITECTURE)
logger = logging.getLogger("vllm.sparse_lavida." + __name__)  # under "vllm": shown in vLLM's log format


# model_type "llada" also names LLaDA-MoE; LLaDA 2.x is a block-diffusion MoE of its own type. Neither is this
# architecture: refuse them by name instead of failing later on unknown tensors.
UNSUPPORTED = {"LLaDAMoEModelLM": "LLaDA-MoE (mixture-of-experts blocks)",
               "LLaDA2MoeModelLM": "LLaDA 2.x (block-diffusion mixture of experts)"}


def refuse_unsupported(architectures: list[str]) -> None:
    for arch in architectures:
        if arch in UNSUPPORTED or ("moe" in arch.lower() and arch not in ARCHITECTURES):
            what = UNSUPPORTED.get(arch, f"{arch} (a mixture-of-experts model)")
            raise ValueError(f"config.json architectures: {what} is not supported by sparse-lavida-vllm, which serves "
                             f"the dense LLaDA architecture ({', '.join(ARCHITECTURES)}) and LaViDa-O")


class LLaDAHFConfig(PretrainedConfig):
    """LLaDA's config.json under the names vLLM reads (hidden_size, num_attention_heads, ...)."""

    model_type = "llada"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_sequence_length",
        "intermediate_size": "mlp_hidden_size",
    }

    def __init__(self, **kwargs) -> None:
        refuse_unsupported(kwargs.get("architectures") or [])
        defaults = MDMConfig().to_dict()
        # no register token unless the checkpoint names one (a published LLaDA has none): never an invented id
        defaults["register_token_id"] = None
        defaults["num_registers"] = 0 if kwargs.get("register_token_id") is None else defaults["num_registers"]
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                     "rope_theta", "rms_norm_eps", "max_sequence_length", "mask_token_id", "register_token_id",
                     "num_registers"):
            setattr(self, name, kwargs.pop(name, defaults[name]))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def to_mdm_config(self) -> MDMConfig:
        return MDMConfig.from_dict(self.to_dict())


# The MDMConfig fields a llava_llada config.json is rewritten with (the rest are not config.json keys of ours).
_TEXT_FIELDS = tuple(f.name for f in fields(MDMConfig) if f.name not in ("image_generation", "model_type",
                                                                          "architectures"))


class LlavaLladaHFConfig(LLaDAHFConfig):
    """LaViDa-O / Sparse-LaViDa's config.json (model_type "llava_llada") as the LLaDA tower it serves text with.

    The published keys are read by lavida_o.LaViDaOConfig (refusals name the key) and mapped to the tower's
    MDMConfig (lavida_o_text.text_tower_config: sparse by default iff `block_causal`, text registers only with a
    `register_token_id`); every published key stays on the object as read.
    """

    model_type = LAVIDA_O_MODEL_TYPE

    def __init__(self, **kwargs) -> None:
        text = text_tower_config(lavida_config(kwargs))
        kwargs.update({name: getattr(text, name) for name in _TEXT_FIELDS})
        super().__init__(**kwargs)


class VLLMTensorParallel(TensorParallel):
    """The tensor-parallel group of vLLM's parallel state (set up by the worker before the model is built)."""

    def __init__(self) -> None:
        from vllm.distributed.parallel_state import get_tp_group

        self.group = get_tp_group()
        self.rank = self.group.rank_in_group
        self.world_size = self.group.world_size

    def all_reduce(self, x: Tensor) -> Tensor:
        return self.group.all_reduce(x)  # the identity when world_size is 1

    def __repr__(self) -> str:
        return f"VLLMTensorParallel(rank={self.rank}, world_size={self.world_size})"


class SparseLLaDAForVLLM(LLaDAMDM):
    """LLaDAMDM built and loaded by vLLM's model loader; the diffusion model runner drives it.

    vLLM's generic runner never calls forward() here: the runner passes its own attention
    backend over the paged cache, so the model file stays the one the reference samplers use.
    Each tensor-parallel rank builds and loads only its shard (vLLM's TP group).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config.model_config.hf_config.to_mdm_config(), VLLMTensorParallel())

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.transformer["wte"](input_ids)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        t = self.model.transformer
        return t["ff_out"](t["ln_f"](hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return load_weights_into(self, weights)


class LlavaLladaTextForVLLM(SparseLLaDAForVLLM):
    """LaViDa-O / Sparse-LaViDa (`LlavaLladaForMaskedDiffusion`) served on its text path: the LLaDA tower.

    Text-only rows use `model.transformer.*` alone (lavida_o_text.py), so this is SparseLLaDAForVLLM loading those
    tensors (same names, same tensor-parallel sharding); the image-path tensors are checked, listed and skipped.
    Image generation, edits and understanding are not served through vLLM (they run in PyTorch, lavida_o.py).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.lavida_config = lavida_config(vllm_config.model_config.hf_config.to_dict())
        unused = unused_text_registers(self.lavida_config)
        if unused:
            logger.warning("%s: config.json declares %d text registers (num_register_tokens) but no "
                           "register_token_id, so requests run with 0 registers; add register_token_id to serve "
                           "them", LAVIDA_O_ARCHITECTURE, unused)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        skipped: list[str] = []
        loaded = load_weights_into(self, text_tower_weights(weights, self.lavida_config, skipped))
        logger.info("%s: serving the text path (the LLaDA tower, %d tensors); skipped the image-path %s",
                    LAVIDA_O_ARCHITECTURE, len(loaded), summarize_skipped(skipped))
        return loaded


# architecture -> the vLLM model class the plugin registers for it
MODEL_CLASSES = {ARCHITECTURE: SparseLLaDAForVLLM, LLADA_ARCHITECTURE: SparseLLaDAForVLLM,
                 LAVIDA_O_ARCHITECTURE: LlavaLladaTextForVLLM}
HF_CONFIGS = (LLaDAHFConfig, LlavaLladaHFConfig)
