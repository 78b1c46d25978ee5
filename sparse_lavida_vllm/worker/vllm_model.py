"""Our MDM as vLLM sees it: the HF config class for model_type "llada" and a vLLM-loadable model class."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from transformers import PretrainedConfig

from sparse_lavida_vllm.model_executor.config import ARCHITECTURE, LLADA_ARCHITECTURE, MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.parallel import TensorParallel

ARCHITECTURES = (ARCHITECTURE, LLADA_ARCHITECTURE)


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
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} in the checkpoint")
            shard = self.load_shard(name, tensor)
            if shard.shape != params[name].shape:  # copy_ would broadcast a wrong shape silently
                raise ValueError(f"weight {name!r}: checkpoint shard {tuple(shard.shape)} does not fit the "
                                 f"parameter {tuple(params[name].shape)} (tensor-parallel {self.tp})")
            with torch.no_grad():
                params[name].copy_(shard.to(params[name].dtype))
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")
        return loaded
