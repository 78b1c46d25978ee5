"""Our MDMs as vLLM sees them: HF config classes for model_types "llada" and "llava_llada", vLLM model classes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import fields
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PretrainedConfig
from vllm.multimodal import MULTIMODAL_REGISTRY

from sparse_lavida_vllm.model_executor.config import ARCHITECTURE, LLADA_ARCHITECTURE, MDMConfig
from sparse_lavida_vllm.model_executor.lavida_o_config import ARCHITECTURE as LAVIDA_O_ARCHITECTURE
from sparse_lavida_vllm.model_executor.lavida_o_config import MODEL_TYPE as LAVIDA_O_MODEL_TYPE
from sparse_lavida_vllm.model_executor.lavida_o_config import load_config
from sparse_lavida_vllm.model_executor.lavida_o_model import LaViDaOMDM
from sparse_lavida_vllm.model_executor.lavida_o_text import (
    lavida_config,
    serves_lavida_o_images,
    summarize_skipped,
    text_tower_config,
    text_tower_weights,
    unused_text_registers,
)
from sparse_lavida_vllm.model_executor.lavida_o_vision import (
    UNDERSTANDING_PREFIXES,
    ImageTiles,
    dropped_by_publishers,
    image_features,
)
from sparse_lavida_vllm.model_executor.lavida_o_weights import IGNORED_PREFIXES
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.parallel import TensorParallel
from sparse_lavida_vllm.model_executor.patch_ids import PatchIds
from sparse_lavida_vllm.model_executor.weights import load_weights_into
from sparse_lavida_vllm.worker.lavida_o_processor import (
    IMAGE_PLACEHOLDER,
    LaViDaODummyInputsBuilder,
    LaViDaOMultiModalProcessor,
    LaViDaOProcessingInfo,
)

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
    Registered through LlavaLladaForVLLM, which builds this class when images cannot be served (no vqvae/); chat
    images are refused there (they need LlavaLladaForVLLM's tower and image rows).
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


@MULTIMODAL_REGISTRY.register_processor(LaViDaOMultiModalProcessor, info=LaViDaOProcessingInfo,
                                        dummy_inputs=LaViDaODummyInputsBuilder)
class LlavaLladaForVLLM(LaViDaOMDM):
    """LaViDa-O / Sparse-LaViDa served whole: text rows and image rows in one forward over the paged cache.

    The scheduler and runner carry an image position as one packed id above the text vocabulary (lavida_o.PatchIds);
    `step_logits` splits a pass's rows by id into text ids, image-stream code patches and (edits without
    enc_use_image_branch) text-stream source patches, runs LaViDaOMDM once, and returns each request's decode-row
    logits: (n, vocab) for text rows, (n, codes_per_position, codebook) for image rows. Per-modality layers read the
    runner's per-slot modality flags (worker/paged_attention.py). When config.json declares a vision tower it is
    built and loaded: chat images (vLLM's multimodal processor, worker/lavida_o_processor.py) become prompt rows whose
    embeddings are `embed_multimodal`'s features, spliced in by the runner (`prompt_embeds`). Each tensor-parallel
    rank builds and loads its shard of the blocks (text and image streams, vLLM's TP group); the generation
    embedding / head, the 2x2 convs and the understanding tower are replicated (lavida_o.py, "tensor parallelism"),
    so every rank computes the full logits and samples the same tokens. Without vqvae/, the plugin's class is the
    text path (LlavaLladaTextForVLLM) instead: see `__new__`.
    """

    # vLLM's SupportsMultiModal flags (the protocol's methods are below; its default embed_input_ids needs a
    # separate language model, which this dual-tower model is not)
    supports_multimodal: ClassVar[Literal[True]] = True
    supports_multimodal_raw_input_only: ClassVar[bool] = False
    supports_encoder_tp_data: ClassVar[bool] = False
    supports_mm_device_do_normalize: ClassVar[bool] = False
    supports_tower_connector_lora: ClassVar[bool] = False
    requires_raw_input_tokens: ClassVar[bool] = False
    _has_oov_mm_tokens: bool = False

    def __new__(cls, *, vllm_config, prefix: str = ""):
        model_config = vllm_config.model_config
        why = serves_lavida_o_images(model_config.model)
        if why is not None:
            logger.info("%s: %s", LAVIDA_O_ARCHITECTURE, why)
            return LlavaLladaTextForVLLM(vllm_config=vllm_config, prefix=prefix)
        return super().__new__(cls)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = load_config(vllm_config.model_config.model)
        # this rank's shard; with the understanding modules (replicated) when config.json names a vision tower
        super().__init__(config, VLLMTensorParallel())
        self.patch_ids = PatchIds.of(config)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return IMAGE_PLACEHOLDER if modality == "image" else None

    def embed_multimodal(self, **kwargs: object) -> list[Tensor]:
        """Each image's prompt rows (n_i, d_model): tower, resampler, projector, anyres grid, newlines."""
        pixel_values, num_tiles, image_sizes = kwargs["pixel_values"], kwargs["num_tiles"], kwargs["image_sizes"]
        pixels = torch.split(torch.as_tensor(pixel_values), torch.as_tensor(num_tiles).flatten().tolist())
        sizes = torch.as_tensor(image_sizes).view(-1, 2).tolist()
        return [self.image_rows(p, (int(w), int(h))) for p, (w, h) in zip(pixels, sizes)]

    def image_rows(self, pixel_values: Tensor, image_size: tuple[int, int]) -> Tensor:
        """One image's prompt rows, as lavida_o_vision.understanding_prompt computes them (same modules, dtype)."""
        wte = self.model.transformer["wte"]
        return image_features(self, ImageTiles(pixel_values, image_size)).to(wte.weight.dtype)

    def embed_input_ids(self, input_ids: Tensor, multimodal_embeddings: list[Tensor] | None = None, *,
                        is_multimodal: Tensor | None = None) -> Tensor:
        embeds = self.model.transformer["wte"](input_ids)
        if multimodal_embeddings is not None and len(multimodal_embeddings) and is_multimodal is not None:
            embeds[is_multimodal] = torch.cat(list(multimodal_embeddings)).to(embeds.dtype)
        return embeds

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        return self.text_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        vision = self.config.understanding
        skipped: list[str] = []

        def served(stream: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
            for name, tensor in stream:
                unused_vision = name.startswith(UNDERSTANDING_PREFIXES) and (vision is None or
                                                                             dropped_by_publishers(name, vision))
                if name.startswith(IGNORED_PREFIXES) or unused_vision:
                    # the VQ copy (multimodal.vq reads vqvae/); no tower declared, or what SigLipVisionTower deletes
                    skipped.append(name)
                    continue
                yield name, tensor

        loaded = load_weights_into(self, served(weights),
                                   owner=f" (not a parameter of {LAVIDA_O_ARCHITECTURE} with this config.json)")
        what = "text, image generation and image understanding" if vision is not None else \
            "text and image generation"
        logger.info("%s: serving %s (%d tensors, tensor-parallel rank %d of %d); skipped the %s",
                    LAVIDA_O_ARCHITECTURE, what, len(loaded), self.tp.rank, self.tp.world_size,
                    summarize_skipped(skipped))
        return loaded

    def step_logits(self, input_ids: Tensor, positions: Tensor, attention, logits_rows: list[Tensor],
                    prompt_embeds: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
        """Each request's decode-row logits from one forward over every row of the engine step. `prompt_embeds`
        (rows, embeds): text-stream rows fed these embeddings instead of their ids' (chat images' features)."""
        ids, cfg = self.patch_ids, self.config
        is_gen, is_source = ids.kinds(input_ids)
        image_rows = is_gen.nonzero().flatten()
        text_ids = input_ids.masked_fill(is_gen | is_source, 0)
        text_embeds = None
        if prompt_embeds is not None:
            text_embeds = self.model.transformer["wte"](text_ids)
            text_embeds[prompt_embeds[0]] = prompt_embeds[1].to(text_embeds.dtype)
        if bool(is_source.any()):  # an edit's source image as text-stream rows: the zero-padded patch embedding
            source = is_source.nonzero().flatten()
            text_embeds = self.model.transformer["wte"](text_ids) if text_embeds is None else text_embeds
            text_embeds[source] = F.pad(self.embed_patches(ids.unpack(input_ids[source])),
                                        (0, cfg.d_model - cfg.d_model_gen))
        x_text, x_image, text_rows, image_rows = self.hidden_states(
            text_ids, positions, attention, image_rows, ids.unpack(input_ids[image_rows]), text_embeds)
        out = []
        for rows in logits_rows:
            rows = rows.to(input_ids.device)
            if rows.numel() and bool(is_gen[rows[0]]):
                out.append(self.image_head(x_image[_local_rows(image_rows, rows)]))
            elif rows.numel():
                out.append(self.text_head(x_text[_local_rows(text_rows, rows)]))
            else:
                out.append(x_text.new_empty(0, cfg.vocab_size))
        return out


def _local_rows(kind_rows: Tensor, wanted: Tensor) -> Tensor:
    """Indices into one stream's states of the pass rows `wanted` (all of that stream)."""
    return torch.searchsorted(kind_rows, wanted)


# architecture -> the vLLM model class the plugin registers for it
MODEL_CLASSES = {ARCHITECTURE: SparseLLaDAForVLLM, LLADA_ARCHITECTURE: SparseLLaDAForVLLM,
                 LAVIDA_O_ARCHITECTURE: LlavaLladaForVLLM}
HF_CONFIGS = (LLaDAHFConfig, LlavaLladaHFConfig)
