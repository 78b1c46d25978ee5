"""LaViDa-O / Sparse-LaViDa (`llava_llada`): the LLaDA tower plus the Elastic-MoT generation branch, over flat rows.

What this file models, with names as in adobe-research/LaVida-O (`llava_llada.py`, `llada/modeling_llada.py`,
`llava_arch.py`, `multimodal_projector/u_vit.py`), so a published `model.safetensors.index.json` maps onto it:

* `model.transformer.{wte, blocks.N.*, ln_f, ff_out}`: LLaDA-8B (see model.py).
* per block, for image rows: `{attn,ff}_norm_vision`, `{q,k,v}_proj_vision` (d_model_gen -> heads),
  `{ff_proj,up_proj,ff_out}_vision` (SwiGLU, mlp_hidden_size_gen). There is no `attn_out_vision`: the shared
  `attn_out` maps every row's attention output to d_model; the publishers add it to the image stream zero-padded
  to d_model and cut the stream back to d_model_gen before the MLP, which is the same as keeping only its first
  d_model_gen outputs for image rows (what we do).
* layers `0..dual_tower_layers` (inclusive: the code splits when `layer_id > dual_tower_layers`) attend jointly;
  deeper layers attend per modality (text rows see text keys, image rows see image keys).
* `model.gen_embedding` (VQ codes, num_vq_embeddings + 256 rows; the image mask code is 8193 = 8192 + 1),
  `model.downsample_gen.downsample.{norm,conv}` (RMSNorm + 2x2 stride-2 conv: 4 codes -> one transformer
  position), `model.upsample_gen.upsample.{norm,conv}` (RMSNorm + 2x2 stride-2 transposed conv: one position ->
  4 code states), `model.gen_predictor` (per-code logits over the codebook); with `gen_mlp_type` "dit" / "dit2"
  these are llava_arch's Sequentials plus `gen_embedding_2` (after the conv) and, for "dit2", `gen_predictor_2`.
* the final `ln_f` is shared: the publishers run it on the image stream zero-padded to d_model, so its RMS
  divides by d_model, not d_model_gen; we reproduce that.
* image understanding (when config.json names an `mm_vision_tower`): `model.vision_tower.vision_tower.vision_model.*`
  (SigLIP, last layer dropped), `model.vision_resampler.pool` (stride-2 conv), `model.mm_projector.{0,2}`
  (mlp2x_gelu), `model.image_newline`; anyres tiles spliced into the prompt as text-stream rows. That half lives in
  lavida_o_vision.py; this file builds and loads its modules.

Served through vLLM: text, text-to-image, edits and chat images (worker/vllm_model.LlavaLladaForVLLM is this model;
image positions travel the engine as one packed id each, `PatchIds`; chat images are vLLM multimodal inputs whose
features the runner feeds at their prompt rows), on one rank or sharded over tensor-parallel ranks (both streams'
block weights Megatron-style, the rest replicated: "tensor parallelism" below); without vqvae/ the text path
(lavida_o_text.py maps the text tower onto LLaDAMDM).

Flat rows. A pass is a list of rows with explicit RoPE positions; a row is either a text row (an id into `wte`,
or a given embedding) or an image row holding one transformer position = a 2x2 patch of VQ codes (row-major
inside the patch; some may be the mask code). `forward` returns text logits for text `logits_rows` and
(n, 4, codebook) logits for image `logits_rows`.

Decisions (docs/ARCHITECTURE.md, "LaViDa-O on the step-causal machinery"):

* 4 codes per position. LaViDa-O's own sampler (`predict_t2i_edit.text_to_image`) unmasks per *code* on the
  64x64 code grid; a half-decoded position would change its input embedding after it was cached, which breaks
  I1. The sparse path therefore plans, decodes and caches per *position*: an image plan is over the
  (H/2) x (W/2) position grid, a decoded position samples its 4 codes from its 4 logits rows at once, and a
  position is either all-mask (decode set / truncated) or all-clean (committed, cached). The model itself takes
  any code patch, so a per-code dense sampler can still run on it.
* Per-modality attention composes with the step-causal spans by intersection: in split layers a row may attend
  to key j iff the spans allow it *and* j has the row's modality. `ModalityAttention` wraps `SpanAttention`
  (same cache writes, same spans) and remembers each cached row's modality in `ModalKVCache`. Every row still
  sees itself, so no row is left without keys. Cached K/V stay pure (I1): commit rows see clean keys only.
* Registers (Sparse-LaViDa: `num_register_tokens "64,64"`, `num_register_groups "25,25"`): the publishers'
  Sparse-LaViDa modelling code is not public, only the training flags. We read both pairs as (text, image).
  Image-generation registers are image rows (so per-modality layers let the truncated image tokens' stand-ins
  reach the decode set), each a 2x2 patch of the register code `register_code`; text registers are `wte` rows of
  `register_token_id`. Neither id is invented: a checkpoint that declares none gets no registers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lavida_vllm.diffusion.masks import build_step_causal_sequence, inference_step_spans, spans_to_mask
from sparse_lavida_vllm.diffusion.planners import UnmaskPlan, code_step
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig, guide_logits, sample_tokens, step_generator
from sparse_lavida_vllm.model_executor.attention import AttentionBackend, KVCache, SpanAttention, sdpa_with_mask
from sparse_lavida_vllm.model_executor.lavida_o_vision import (
    OWNED_KEYS,
    UNDERSTANDING_PREFIXES,
    UnderstandingConfig,
    build_understanding,
    dropped_by_publishers,
)
from sparse_lavida_vllm.model_executor.model import (
    COLUMN_PARALLEL,
    ROW_PARALLEL,
    ROW_TILE,
    RMSNorm,
    RowTiles,
    apply_rope,
    narrow_shard,
    rope_cos_sin,
    tiled,
)
from sparse_lavida_vllm.model_executor.parallel import SingleRank, TensorParallel
from sparse_lavida_vllm.model_executor.weights import INDEX_NAME, WEIGHTS_NAME, save_state_dict

ARCHITECTURE = "LlavaLladaForMaskedDiffusion"
MODEL_TYPE = "llava_llada"
# Constants the publishers hard-code (llava_llada.py / predict_t2i_edit.py), overridable from config.json.
IMAGE_TOKEN_ID = 126089  # <|reserved_token_5|>: one per generated image position
EDIT_IMAGE_TOKEN_ID = 126090  # <|reserved_token_6|>: one per position of an edit's source image
EXTRA_GEN_EMBEDDINGS = 256  # gen_embedding has num_vq_embeddings + 256 rows (the mask code lives there)
UPSAMPLE_NORM_EPS = 1e-6  # Simple_UVitBlock's layer_norm_eps (also the gen MLPs' nn.RMSNorm eps)
# build_gen_embedding's variants: "embed" = a table and a linear head; "dit" adds RMSNorm+Linear around them
# (Sequentials: gen_embedding.{0,1,2}, gen_embedding_2.{0,1}, gen_predictor.{0,1,2}); "dit2" adds gen_predictor_2.
GEN_MLP_TYPES = ("embed", "dit", "dit2")
# Published-checkpoint namespaces the model never holds: the VQ copy (loaded from vqvae/ by multimodal.vq).
IGNORED_PREFIXES = ("model.vqvae.",)


def _pair(value: Any, name: str) -> tuple[int, ...]:
    """Sparse-LaViDa's "64,64" flags (a string in config.json), or an int, or a list."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an int or a comma-separated list of ints, got {value!r}") from exc
    if any(v < 0 for v in out):
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


@dataclass(frozen=True)
class LaViDaOConfig:
    """The `llava_llada` config.json keys this model reads (LLaDA's names + LaViDa-O's + Sparse-LaViDa's)."""

    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 8192
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    include_bias: bool = False
    # LaViDa-O
    d_model_gen: int = 2048
    mlp_hidden_size_gen: int = 8192
    dual_tower: bool = True
    dual_tower_layers: int | None = 16  # None: every layer joint (the code's default 9999)
    downsample: bool = True  # 2x2 codes per transformer position
    enc_use_image_branch: bool = False  # an edit's source image rows use the image branch
    gen_mlp_type: str = "embed"
    num_vq_embeddings: int = 8192  # from vqvae/config.json (the publishers read it off the VQ model)
    image_token_id: int = IMAGE_TOKEN_ID
    edit_image_token_id: int = EDIT_IMAGE_TOKEN_ID
    image_mask_code: int | None = None  # None: num_vq_embeddings + 1 (8193 for the published 8192 codes)
    # Sparse-LaViDa
    block_causal: bool = False
    num_register_tokens: tuple[int, ...] = ()  # "64,64" -> (text, image)
    num_register_groups: tuple[int, ...] = ()  # training-time only (how many masked blocks per sequence)
    gen_enc_add_pos_emb: bool = False
    # Our extension keys: the ids registers are embedded with (none invented when absent)
    register_token_id: int | None = None  # a wte row (text registers)
    register_code: int | None = None  # a gen_embedding row (image registers)
    # image understanding (SigLIP + projector, lavida_o_vision.py): the mm_* / image_* keys; None = no vision tower
    understanding: UnderstandingConfig | None = None
    model_type: str = MODEL_TYPE
    architectures: tuple[str, ...] = (ARCHITECTURE,)
    extra: dict = field(default_factory=dict, compare=False)  # every other published key, written back as read

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                     "d_model_gen", "mlp_hidden_size_gen", "num_vq_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.d_model_gen > self.d_model:
            raise ValueError(f"d_model_gen ({self.d_model_gen}) must be <= d_model ({self.d_model}): the image "
                             "stream is zero-padded to d_model")
        if not self.dual_tower and self.d_model_gen != self.d_model:
            raise ValueError("dual_tower=false needs d_model_gen == d_model (image rows run through the text tower)")
        if self.gen_mlp_type not in GEN_MLP_TYPES:
            raise ValueError(f"gen_mlp_type {self.gen_mlp_type!r} is not supported (one of {GEN_MLP_TYPES})")
        if self.include_bias:
            raise ValueError("include_bias=true is not supported")
        for name in ("mask_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size), got {getattr(self, name)}")
        table = self.num_vq_embeddings + EXTRA_GEN_EMBEDDINGS
        if not 0 <= self.mask_code < table:
            raise ValueError(f"image_mask_code must be in [0, {table}), got {self.mask_code}")
        if self.register_token_id is not None and not 0 <= self.register_token_id < self.vocab_size:
            raise ValueError(f"register_token_id must be in [0, vocab_size), got {self.register_token_id}")
        if self.register_code is not None and not 0 <= self.register_code < table:
            raise ValueError(f"register_code must be in [0, {table}), got {self.register_code}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mask_code(self) -> int:
        return self.num_vq_embeddings + 1 if self.image_mask_code is None else self.image_mask_code

    @property
    def codes_per_position(self) -> int:
        return 4 if self.downsample else 1

    @property
    def first_split_layer(self) -> int:
        """The first per-modality layer (n_layers when every layer is joint)."""
        if not self.dual_tower or self.dual_tower_layers is None:
            return self.n_layers
        return min(self.n_layers, self.dual_tower_layers + 1)

    def registers(self, modality: str) -> int:
        """The register count the checkpoint was trained with for `modality` ("text" or "image"); 0 if undeclared."""
        index = {"text": 0, "image": 1}[modality]
        if not self.num_register_tokens:
            return 0
        counts = self.num_register_tokens
        return counts[index] if index < len(counts) else counts[-1]

    def to_dict(self) -> dict:
        d: dict[str, Any] = dict(self.extra)
        if self.understanding is not None:
            d.update(self.understanding.to_dict())
        for f in fields(self):
            if f.name in ("extra", "num_vq_embeddings", "understanding"):  # num_vq_embeddings: vqvae/config.json
                continue
            value = getattr(self, f.name)
            if f.name in ("num_register_tokens", "num_register_groups"):
                if value:
                    d[f.name] = ",".join(str(v) for v in value)  # the training script's string form
                continue
            if value is None and f.name in ("register_token_id", "register_code", "image_mask_code"):
                continue
            d[f.name] = list(value) if isinstance(value, tuple) else value
        d["embedding_size"] = self.vocab_size
        d.update(weight_tying=False, include_qkv_bias=False, block_type="llama", layer_norm_type="rms",
                 activation_type="silu", rope=True, alibi=False, block_group_size=1)
        return d

    @classmethod
    def from_dict(cls, d: dict, num_vq_embeddings: int | None = None) -> LaViDaOConfig:
        """From a published config.json; refuses what this file does not model, naming the key."""
        if d.get("weight_tying"):
            raise ValueError("weight_tying=true is not supported: the LM head must be untied")
        if d.get("block_type", "llama") != "llama":
            raise ValueError(f"block_type {d.get('block_type')!r} is not supported (only 'llama')")
        for key in ("extra_gen_dit", "unified_gen_enc", "include_qkv_bias", "alibi", "input_emb_norm",
                    "scale_logits", "attention_layer_norm"):
            if d.get(key):
                raise ValueError(f"{key}={d[key]!r} is not supported by this model file")
        for key, allowed in (("layer_norm_type", "rms"), ("activation_type", "silu"), ("rope", True)):
            if d.get(key, allowed) not in (allowed, None):  # anything else would be silently computed wrong
                raise ValueError(f"{key}={d[key]!r} is not supported by this model file (only {allowed!r})")
        known = {f.name for f in fields(cls)} - {"extra", "understanding"}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        kw["understanding"] = UnderstandingConfig.from_dict(d)
        if kw.get("mlp_hidden_size") is None and d.get("mlp_ratio"):  # LLaDA's fallback
            kw["mlp_hidden_size"] = int(d["mlp_ratio"] * kw.get("d_model", cls.d_model))
        if d.get("embedding_size"):  # LLaDA's padded table size is what the weights have
            kw["vocab_size"] = int(d["embedding_size"])
        if kw.get("n_kv_heads") is None:
            kw["n_kv_heads"] = kw.get("n_heads", cls.n_heads)
        # The publishers' defaults when a key is absent or negative (LlavaLladaForMaskedDiffusion.__init__)
        d_model = kw.get("d_model", cls.d_model)
        if kw.get("d_model_gen") is None or kw["d_model_gen"] < 0:
            kw["d_model_gen"] = d_model
        if kw.get("mlp_hidden_size_gen") is None or kw["mlp_hidden_size_gen"] < 0:
            kw["mlp_hidden_size_gen"] = kw.get("mlp_hidden_size", cls.mlp_hidden_size)
        kw.setdefault("downsample", False)
        kw.setdefault("dual_tower", False)
        kw.setdefault("gen_mlp_type", "embed")
        if d.get("dual_tower_layers") is None:  # the code's 9999: every layer joint
            kw["dual_tower_layers"] = None
        for key in ("num_register_tokens", "num_register_groups"):
            kw[key] = _pair(d.get(key), key)
        if num_vq_embeddings is not None:
            kw["num_vq_embeddings"] = int(num_vq_embeddings)
        if "architectures" in kw:
            kw["architectures"] = tuple(kw["architectures"])
        derived = {"embedding_size", "weight_tying", "include_qkv_bias", "block_type", "layer_norm_type",
                   "activation_type", "rope", "alibi", "block_group_size"}
        if kw["understanding"] is not None:
            derived |= set(OWNED_KEYS)
        extra = {k: v for k, v in d.items() if k not in known and k not in derived}
        return cls(**kw, extra=extra)


# ---- image grid <-> transformer positions -------------------------------------------------

def codes_to_patches(codes: Tensor, height: int, width: int) -> Tensor:
    """(H*W,) raster codes -> (H/2 * W/2, 4) patches in raster position order (row-major inside each patch)."""
    if height % 2 or width % 2:
        raise ValueError(f"the code grid must have even sides for 2x2 positions, got {height}x{width}")
    grid = codes.reshape(height // 2, 2, width // 2, 2)
    return grid.permute(0, 2, 1, 3).reshape(-1, 4)


def patches_to_codes(patches: Tensor, height: int, width: int) -> Tensor:
    """Inverse of codes_to_patches: (H/2 * W/2, 4, ...) -> (H*W, ...)."""
    rest = patches.shape[2:]
    grid = patches.reshape(height // 2, width // 2, 2, 2, *rest)
    return grid.permute(0, 2, 1, 3, *range(4, 4 + len(rest))).reshape(height * width, *rest)


@dataclass(frozen=True)
class PatchIds:
    """One int64 id per image position, above the text vocabulary: how the served engine carries image rows.

    The scheduler's canvas, KV bookkeeping and the runner's rows stay one id per position; an image position's
    codes (each a row of gen_embedding, mask and register codes included) are packed base-`table` into one id:
    `base + ((c0 * T + c1) * T + c2) * T + c3` (row-major inside the 2x2 patch, as codes_to_patches). Two ranges:
    `gen_base` ids are image-stream rows (generated positions, image registers, and an edit's source image when
    the checkpoint sets enc_use_image_branch), `source_base` ids are text-stream rows carrying the zero-padded
    patch embedding (an edit's source image otherwise: context_inputs' two paths). Published sizes: 8448^4 ~ 5e15
    ids per range, well inside int64.
    """

    vocab_size: int
    table: int  # gen_embedding rows (num_vq_embeddings + 256)
    codes_per_position: int
    mask_code: int
    register_code: int | None
    enc_use_image_branch: bool

    @classmethod
    def of(cls, config: LaViDaOConfig) -> PatchIds:
        return cls(config.vocab_size, config.num_vq_embeddings + EXTRA_GEN_EMBEDDINGS, config.codes_per_position,
                   config.mask_code, config.register_code, config.enc_use_image_branch)

    @property
    def span(self) -> int:
        return self.table ** self.codes_per_position

    @property
    def codebook(self) -> int:
        """VQ codes the image head predicts (num_vq_embeddings)."""
        return self.table - EXTRA_GEN_EMBEDDINGS

    @property
    def gen_base(self) -> int:
        return self.vocab_size

    @property
    def source_base(self) -> int:
        return self.vocab_size + self.span

    def pack(self, patches: Tensor, source: bool = False) -> Tensor:
        """(n, codes_per_position) codes -> (n,) ids; `source`: an edit's source image (its stream per config)."""
        if patches.dim() != 2 or patches.shape[1] != self.codes_per_position:
            raise ValueError(f"patches must have shape (n, {self.codes_per_position}), got {tuple(patches.shape)}")
        if patches.numel() and (int(patches.min()) < 0 or int(patches.max()) >= self.table):
            raise ValueError(f"codes must lie in [0, {self.table}) (gen_embedding rows)")
        ids = torch.zeros(patches.shape[0], dtype=torch.long, device=patches.device)
        for i in range(self.codes_per_position):
            ids = ids * self.table + patches[:, i].long()
        base = self.source_base if source and not self.enc_use_image_branch else self.gen_base
        return ids + base

    def unpack(self, ids: Tensor) -> Tensor:
        """(n,) image ids of either range -> (n, codes_per_position) codes."""
        rest = (ids - self.gen_base) % self.span
        codes = []
        for _ in range(self.codes_per_position):
            codes.append(rest % self.table)
            rest = rest // self.table
        return torch.stack(codes[::-1], dim=1)

    def kinds(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(image-stream rows, text-stream patch rows) as bool masks over ids."""
        return (ids >= self.gen_base) & (ids < self.source_base), ids >= self.source_base

    def fill(self, code: int) -> int:
        """The id of a position whose codes are all `code` (the mask patch, the register patch)."""
        return int(self.pack(torch.full((1, self.codes_per_position), code, dtype=torch.long))[0])

    @property
    def mask_id(self) -> int:
        return self.fill(self.mask_code)

    @property
    def register_id(self) -> int | None:
        return None if self.register_code is None else self.fill(self.register_code)


# ---- attention: step-causal spans x per-modality layers --------------------------------------

class ModalKVCache(KVCache):
    """A KVCache that also records, per cached row, whether it is an image row (read by per-modality layers)."""

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(num_layers, capacity, num_kv_heads, head_dim, dtype, device)
        self.is_image = torch.zeros(capacity, dtype=torch.bool, device=device)


class ModalityAttention(AttentionBackend):
    """Joint layers: the wrapped SpanAttention as is. Split layers: its spans AND same-modality keys.

    `row_is_image` (rows,) marks this pass's image rows. Keys are [cache | this pass] as in SpanAttention (whose
    `keys_values` does the cache writes, so commit rows are cached exactly as for LLaDA); the modality of cached
    keys comes from a ModalKVCache.
    """

    def __init__(self, inner: SpanAttention, row_is_image: Tensor, first_split_layer: int) -> None:
        if inner.cache is not None and not isinstance(inner.cache, ModalKVCache):
            raise TypeError("per-modality layers need a ModalKVCache (it records each cached row's modality)")
        self.inner = inner
        self.row_is_image = row_is_image.to(torch.bool)
        self.first_split_layer = first_split_layer
        self._key_is_image: Tensor | None = None
        self._masks: dict[int, Tensor | None] = {}
        cache = inner.cache
        if isinstance(cache, ModalKVCache):  # mirrors SpanAttention's in-place K/V staging of this pass's rows
            room = min(self.row_is_image.numel(), cache.capacity - cache.length)
            cache.is_image[cache.length:cache.length + room] = self.row_is_image[:room]

    def _mask(self, num_keys: int, device: torch.device) -> Tensor | None:
        """The split layers' mask (same for every split layer of the pass); None when every row and key has one
        modality, where per-modality attention is the joint one (so such a pass keeps the joint arithmetic, as a
        text request's pass does on the served path)."""
        if num_keys not in self._masks:
            cache = self.inner.cache
            cached = cache.is_image[:num_keys - self.row_is_image.numel()] if cache is not None else \
                self.row_is_image[:0]
            keys = torch.cat([cached.to(device), self.row_is_image.to(device)])
            if bool((keys == keys[0]).all()) if keys.numel() else True:
                self._masks[num_keys] = None
                return None
            mask = self.row_is_image.to(device).view(-1, 1) == keys.view(1, -1)
            if self.inner.spans is not None:
                mask = mask & spans_to_mask(self.inner.spans.to(device), num_keys)
            self._masks[num_keys] = mask
        return self._masks[num_keys]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer < self.first_split_layer:
            return self.inner.attend(layer, q, k, v)
        cache = self.inner.cache
        num_keys = (cache.length if cache is not None else 0) + q.shape[0]
        mask = self._mask(num_keys, q.device)
        if mask is None:
            return self.inner.attend(layer, q, k, v)
        keys, values = self.inner.keys_values(layer, k, v)
        out = sdpa_with_mask(q.transpose(0, 1), keys, values, mask)
        return out.transpose(0, 1)


# ---- tensor parallelism -----------------------------------------------------------------------
# Megatron-style over the blocks, as LLaDAMDM (model.py): the text weights by LLaDA's names, and the image stream's
# `*_vision` twins the same way: {q,k,v}_proj_vision column-parallel by heads (rank r computes the same heads from
# image rows as q/k/v_proj from text rows, so its attention and its KV cache see one head slice of every row),
# ff_proj_vision / up_proj_vision column-parallel and ff_out_vision row-parallel (mlp_hidden_size_gen / W columns
# each). The shared attn_out is row-parallel for every row; image rows keep the first d_model_gen outputs of the
# all-reduced sum. Replicated on every rank (small next to the 32 blocks, or not worth a collective): wte, ln_f, the
# LM head, the `*_norm_vision` norms, gen_embedding(_2), the 2x2 down/upsample convs, gen_predictor(_2) and the
# whole understanding half (SigLIP tower, resampler, projector, image_newline). So every rank returns full text and
# image logits and samples the same tokens from the same seed, with no gather before sampling.
VISION_COLUMN_PARALLEL = tuple(f"{name}_vision" for name in COLUMN_PARALLEL)
VISION_ROW_PARALLEL = tuple(f"{name}_vision" for name in ROW_PARALLEL if name != "attn_out")  # no attn_out_vision
BLOCK_PREFIX = "model.transformer.blocks."


def lavida_shard_dim(name: str) -> int | None:
    """The dim a LaViDa-O parameter is split along over tensor-parallel ranks (None: every rank holds all of it)."""
    if not name.startswith(BLOCK_PREFIX):
        return None
    leaf = name.split(".")[-2]
    if leaf in COLUMN_PARALLEL or leaf in VISION_COLUMN_PARALLEL:
        return 0
    if leaf in ROW_PARALLEL or leaf in VISION_ROW_PARALLEL:
        return 1
    return None


def check_lavida_divisible(config: LaViDaOConfig, world_size: int) -> None:
    """A ValueError naming the field when heads or an MLP width do not split evenly over the ranks."""
    names = ["n_heads", "n_kv_heads", "mlp_hidden_size"] + (["mlp_hidden_size_gen"] if config.dual_tower else [])
    for name in names:
        if getattr(config, name) % world_size:
            raise ValueError(f"{name} ({getattr(config, name)}) must be divisible by the tensor-parallel "
                             f"world size ({world_size})")


# ---- the model ------------------------------------------------------------------------------

def _swiglu(x: Tensor, ff_proj: nn.Linear, up_proj: nn.Linear, ff_out: nn.Linear, tile: RowTiles | None,
            tp: TensorParallel) -> Tensor:
    if not x.shape[0]:  # every rank sees the same rows, so every rank skips the same collectives
        return x
    return tp.all_reduce(tiled(ff_out, F.silu(tiled(ff_proj, x, tile)) * tiled(up_proj, x, tile), tile))


class LaViDaOBlock(nn.Module):
    """LLaDALlamaBlock with the Elastic-MoT image branch (parameter names as published).

    Under tensor parallelism (`tp`) it holds n_heads/W query heads and n_kv_heads/W K/V heads of both streams,
    mlp_hidden_size/W and mlp_hidden_size_gen/W MLP columns; attn_out, ff_out and ff_out_vision give partial sums
    that `tp.all_reduce` adds up (see "tensor parallelism" above).
    """

    def __init__(self, config: LaViDaOConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        tp = tp if tp is not None else SingleRank()
        w = tp.world_size
        d, dg, hd = config.d_model, config.d_model_gen, config.head_dim
        self.tp = tp
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads // w, config.n_kv_heads // w, hd
        self.d_model_gen = dg
        eps = config.rms_norm_eps
        heads, kv, mlp = self.n_heads * hd, self.n_kv_heads * hd, config.mlp_hidden_size // w
        self.attn_norm = RMSNorm(d, eps)
        self.ff_norm = RMSNorm(d, eps)
        self.q_proj = nn.Linear(d, heads, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(heads, d, bias=False)
        self.ff_proj = nn.Linear(d, mlp, bias=False)
        self.up_proj = nn.Linear(d, mlp, bias=False)
        self.ff_out = nn.Linear(mlp, d, bias=False)
        self.dual_tower = config.dual_tower
        if self.dual_tower:
            mlp_gen = config.mlp_hidden_size_gen // w
            self.attn_norm_vision = RMSNorm(dg, eps)
            self.ff_norm_vision = RMSNorm(dg, eps)
            self.q_proj_vision = nn.Linear(dg, heads, bias=False)
            self.k_proj_vision = nn.Linear(dg, kv, bias=False)
            self.v_proj_vision = nn.Linear(dg, kv, bias=False)
            self.ff_proj_vision = nn.Linear(dg, mlp_gen, bias=False)
            self.up_proj_vision = nn.Linear(dg, mlp_gen, bias=False)
            self.ff_out_vision = nn.Linear(mlp_gen, dg, bias=False)

    def _qkv(self, x: Tensor, vision: bool, tile: RowTiles | None) -> tuple[Tensor, Tensor, Tensor]:
        if vision and self.dual_tower:
            h = self.attn_norm_vision(x)
            return (tiled(self.q_proj_vision, h, tile), tiled(self.k_proj_vision, h, tile),
                    tiled(self.v_proj_vision, h, tile))
        h = self.attn_norm(x)
        return tiled(self.q_proj, h, tile), tiled(self.k_proj, h, tile), tiled(self.v_proj, h, tile)

    def forward(self, x_text: Tensor, x_image: Tensor, text_rows: Tensor, image_rows: Tensor, cos: Tensor,
                sin: Tensor, layer: int, attention: AttentionBackend,
                tile: RowTiles | None = None) -> tuple[Tensor, Tensor]:
        rows = text_rows.numel() + image_rows.numel()
        q = x_text.new_empty(rows, self.n_heads * self.head_dim)
        k = x_text.new_empty(rows, self.n_kv_heads * self.head_dim)
        v = torch.empty_like(k)
        for idx, x, vision in ((text_rows, x_text, False), (image_rows, x_image, True)):
            if idx.numel():
                q[idx], k[idx], v[idx] = self._qkv(x, vision, tile)
        q = apply_rope(q.view(rows, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(rows, self.n_kv_heads, self.head_dim), cos, sin)
        att = self.tp.all_reduce(tiled(
            self.attn_out, attention.attend(layer, q, k, v.view(rows, self.n_kv_heads, self.head_dim))
            .reshape(rows, -1), tile))
        x_text = x_text + att[text_rows]
        # the publishers add the d_model-wide output to the zero-padded image stream, then truncate it
        x_image = x_image + att[image_rows, :x_image.shape[-1]]
        tp = self.tp
        x_text = x_text + _swiglu(self.ff_norm(x_text), self.ff_proj, self.up_proj, self.ff_out, tile, tp)
        if self.dual_tower:
            x_image = x_image + _swiglu(self.ff_norm_vision(x_image), self.ff_proj_vision, self.up_proj_vision,
                                        self.ff_out_vision, tile, tp)
        else:
            x_image = x_image + _swiglu(self.ff_norm(x_image), self.ff_proj, self.up_proj, self.ff_out, tile, tp)
        return x_text, x_image


class _Resample(nn.Module):
    """diffusers' Downsample2D / Upsample2D as Simple_UVitBlock builds them: RMSNorm then a bias-free 2x2 conv."""

    def __init__(self, channels: int, transpose: bool) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, UPSAMPLE_NORM_EPS)
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.conv = conv(channels, channels, kernel_size=2, stride=2, padding=0, bias=False)


class LaViDaOMDM(nn.Module):
    """LaViDa-O over flat rows: text rows (ids or embeddings) and image rows (2x2 code patches), explicit positions.

    forward(input_ids, positions, attention, logits_rows, image_rows=..., image_codes=...) -> text logits of the
    text `logits_rows`; `image_logits(...)` -> (n, codes_per_position, num_vq_embeddings) for image rows. Both
    go through `hidden_states`, so one pass can feed the LM head and the image head.

    Batch invariance as LLaDAMDM: without autograd the linear layers run in fixed tiles of `row_tile` rows
    (model.tiled), so a row's values do not depend on how many rows share the pass (the served path batches
    requests and guidance branches into one forward; the reference driver runs each branch alone).

    `tp` shards the blocks (both streams) Megatron-style over tensor-parallel ranks; everything else is replicated,
    so every rank returns the full logits (see "tensor parallelism" above). `config` stays the whole model's;
    `local_kv_heads` is what this rank caches.
    """

    row_tile: int | None = ROW_TILE
    plain_rows: int = 0  # passes of up to this many rows skip the tiles (verified equal: plain_rows_verified)

    def __init__(self, config: LaViDaOConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        tp = tp if tp is not None else SingleRank()
        check_lavida_divisible(config, tp.world_size)
        self.config = config
        self.tp = tp
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.d_model),
            "blocks": nn.ModuleList(LaViDaOBlock(config, tp) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
            "ff_out": nn.Linear(config.d_model, config.vocab_size, bias=False),
        })
        dg = config.d_model_gen
        table, codes = config.num_vq_embeddings + EXTRA_GEN_EMBEDDINGS, config.num_vq_embeddings
        if config.gen_mlp_type == "embed":
            self.model.gen_embedding = nn.Embedding(table, dg)
            self.model.gen_predictor = nn.Linear(dg, codes, bias=False)
        else:
            eps = UPSAMPLE_NORM_EPS
            self.model.gen_embedding = nn.Sequential(nn.Embedding(table, dg), RMSNorm(dg, eps),
                                                     nn.Linear(dg, dg, bias=False))
            self.model.gen_embedding_2 = nn.Sequential(RMSNorm(dg, eps), nn.Linear(dg, dg, bias=False))
            self.model.gen_predictor = nn.Sequential(nn.Linear(dg, dg, bias=False), RMSNorm(dg, eps),
                                                     nn.Linear(dg, codes, bias=False))
            if config.gen_mlp_type == "dit2":
                self.model.gen_predictor_2 = nn.Sequential(RMSNorm(dg, eps), nn.Linear(dg, dg, bias=False))
        if config.downsample:
            self.model.downsample_gen = nn.Module()
            self.model.downsample_gen.downsample = _Resample(dg, transpose=False)
            self.model.upsample_gen = nn.Module()
            self.model.upsample_gen.upsample = _Resample(dg, transpose=True)
        if config.understanding is not None:  # vision_tower, vision_resampler, mm_projector, image_newline
            build_understanding(self.model, config.understanding, config.d_model)

    @property
    def local_kv_heads(self) -> int:
        """K/V heads this rank computes and caches (n_kv_heads // world_size)."""
        return self.config.n_kv_heads // self.tp.world_size

    def load_shard(self, name: str, full: Tensor) -> Tensor:
        """This rank's slice of the full checkpoint tensor `name` (the tensor itself when replicated)."""
        return narrow_shard(name, full, lavida_shard_dim(name), self.tp.rank, self.tp.world_size)

    @property
    def tile(self) -> RowTiles | None:
        """The GEMM row tiles of this call: tiles for inference, plain GEMMs under autograd (training)."""
        if torch.is_grad_enabled() or self.row_tile is None:
            return None
        return RowTiles(self.row_tile, self.plain_rows)

    # ---- embeddings and heads ----

    def embed_patches(self, codes: Tensor) -> Tensor:
        """(n, codes_per_position) code ids -> (n, d_model_gen) image-row inputs (gen_embedding, then 2x2 conv)."""
        k = self.config.codes_per_position
        if codes.dim() != 2 or codes.shape[1] != k:
            raise ValueError(f"image_codes must have shape (rows, {k}), got {tuple(codes.shape)}")
        x = self.model.gen_embedding(codes)
        if self.config.downsample:
            down = self.model.downsample_gen.downsample
            x = down.conv(down.norm(x).view(-1, 2, 2, x.shape[-1]).permute(0, 3, 1, 2)).flatten(1)
        else:
            x = x[:, 0]
        second = getattr(self.model, "gen_embedding_2", None)  # call_gen_embedding: after the 2x2 conv
        return second(x) if second is not None else x

    def image_head(self, x_image: Tensor) -> Tensor:
        """Final image states (n, d_model_gen) -> logits (n, codes_per_position, num_vq_embeddings)."""
        cfg = self.config
        ln_f = self.model.transformer["ln_f"]
        # ln_f runs on the stream zero-padded to d_model: the mean of squares divides by d_model
        xf = x_image.float()
        xf = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / cfg.d_model + ln_f.eps)
        h = (xf * ln_f.weight[:x_image.shape[-1]].float()).to(x_image.dtype)
        if cfg.downsample:
            up = self.model.upsample_gen.upsample
            h = up.conv(up.norm(h).view(-1, h.shape[-1], 1, 1))  # (n, d, 2, 2)
            h = h.permute(0, 2, 3, 1).reshape(h.shape[0], 4, h.shape[1])
        else:
            h = h.unsqueeze(1)
        second = getattr(self.model, "gen_predictor_2", None)  # call_gen_predictor: after the upsampling
        h = second(h) if second is not None else h
        predictor = self.model.gen_predictor
        if isinstance(predictor, nn.Linear):
            return tiled(predictor, h.reshape(-1, h.shape[-1]), self.tile).view(*h.shape[:-1], predictor.out_features)
        return predictor(h)

    def text_head(self, x_text: Tensor) -> Tensor:
        t = self.model.transformer
        return tiled(t["ff_out"], t["ln_f"](x_text), self.tile)

    # ---- the pass ----

    def wrap_attention(self, attention: AttentionBackend | None, image_rows: Tensor, rows: int) -> AttentionBackend:
        """The backend per-modality layers need: SpanAttention gets wrapped in ModalityAttention."""
        attention = attention if attention is not None else SpanAttention(None)
        split = self.config.first_split_layer
        if split >= self.config.n_layers or isinstance(attention, ModalityAttention):
            return attention
        with_modality = getattr(attention, "with_modality", None)
        if with_modality is not None:  # the paged backend (worker/paged_attention.py) keeps per-slot modality
            is_image = torch.zeros(rows, dtype=torch.bool, device=image_rows.device)
            is_image[image_rows] = True
            return with_modality(is_image, split)
        if (not image_rows.numel() and isinstance(attention, SpanAttention)
                and not isinstance(attention.cache, ModalKVCache)):
            # A text pass over a plain KVCache is a text-only sequence (the caller's contract: image sequences
            # use a ModalKVCache), where per-modality layers are ordinary ones. This is what lets text requests
            # on this checkpoint run through diffusion.reference unchanged.
            return attention
        if not isinstance(attention, SpanAttention):
            raise TypeError(f"layers >= {split} attend per modality: pass a SpanAttention or a ModalityAttention, "
                            f"got {type(attention).__name__}")
        is_image = torch.zeros(rows, dtype=torch.bool, device=image_rows.device)
        is_image[image_rows] = True
        return ModalityAttention(attention, is_image, split)

    def hidden_states(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend | None = None,
                      image_rows: Tensor | None = None, image_codes: Tensor | None = None,
                      text_embeds: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(text states, image states, text row indices, image row indices) after the last block (pre ln_f).

        `input_ids` (rows,): ids of the text rows (ignored at image rows). `image_rows` (n,): indices of the image
        rows, `image_codes` (n, codes_per_position) their code patches. `text_embeds` (rows or text rows, d_model)
        replaces `wte(input_ids)` for text rows (understanding features, CFG embeddings).
        """
        rows = positions.numel()
        device = positions.device
        image_rows = image_rows if image_rows is not None else torch.empty(0, dtype=torch.long, device=device)
        is_image = torch.zeros(rows, dtype=torch.bool, device=device)
        is_image[image_rows] = True
        text_rows = (~is_image).nonzero().flatten()
        if image_rows.numel():
            if image_codes is None or image_codes.shape[0] != image_rows.numel():
                raise ValueError("image_codes must give one code patch per image row")
            x_image = self.embed_patches(image_codes)
        else:
            x_image = self.model.transformer["wte"].weight.new_empty(0, self.config.d_model_gen)
        if text_embeds is not None:
            x_text = text_embeds if text_embeds.shape[0] == text_rows.numel() else text_embeds[text_rows]
        else:
            x_text = self.model.transformer["wte"](input_ids[text_rows])
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x_text.dtype)
        attention = self.wrap_attention(attention, image_rows, rows)
        tile = self.tile
        for i, block in enumerate(self.model.transformer["blocks"]):
            x_text, x_image = block(x_text, x_image, text_rows, image_rows, cos, sin, i, attention, tile)
        return x_text, x_image, text_rows, image_rows

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend | None = None,
                logits_rows: Tensor | None = None, image_rows: Tensor | None = None,
                image_codes: Tensor | None = None, text_embeds: Tensor | None = None) -> Tensor:
        """Text logits (len(logits_rows), vocab) for text rows; image rows in logits_rows are refused."""
        x_text, _, text_rows, _ = self.hidden_states(input_ids, positions, attention, image_rows, image_codes,
                                                     text_embeds)
        return self.text_head(x_text[_local(text_rows, logits_rows, "text")])

    def image_logits(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend | None = None,
                     logits_rows: Tensor | None = None, image_rows: Tensor | None = None,
                     image_codes: Tensor | None = None, text_embeds: Tensor | None = None) -> Tensor:
        """Per-code logits (len(logits_rows), codes_per_position, num_vq_embeddings) of image rows."""
        _, x_image, _, image_rows = self.hidden_states(input_ids, positions, attention, image_rows, image_codes,
                                                       text_embeds)
        return self.image_head(x_image[_local(image_rows, logits_rows, "image")])


def _local(kind_rows: Tensor, wanted: Tensor | None, kind: str) -> Tensor:
    """Indices into one stream of the pass rows `wanted` (all of the stream when None); other rows are refused."""
    if wanted is None:
        return torch.arange(kind_rows.numel(), device=kind_rows.device)
    lookup = torch.full((int(kind_rows.max()) + 1 if kind_rows.numel() else 0,), -1, dtype=torch.long,
                        device=kind_rows.device)
    lookup[kind_rows] = torch.arange(kind_rows.numel(), device=kind_rows.device)
    if wanted.numel() and (int(wanted.max()) >= lookup.numel() or bool((lookup[wanted] < 0).any())):
        raise ValueError(f"logits_rows must all be {kind} rows")
    return lookup[wanted] if wanted.numel() else wanted


# ---- sparse image generation over positions (the reference driver for this architecture) ------------------

@dataclass
class ImageStep:
    decode: Tensor  # positions (response-relative) fed as masks this step
    logits: Tensor  # (len(decode), codes_per_position, num_vq_embeddings)


@dataclass
class ImageResult:
    patches: Tensor  # (positions, codes_per_position) the generated code patches
    steps: list[ImageStep]
    forward_rows: int  # rows through the model, prefill included


def _register_patch(config: LaViDaOConfig, count: int, device: torch.device) -> Tensor:
    if count and config.register_code is None:
        raise ValueError("image registers need register_code in config.json (the checkpoint declares none)")
    return torch.full((count, config.codes_per_position), config.register_code or 0, dtype=torch.long, device=device)


@dataclass(frozen=True)
class ImageContext:
    """One guidance branch's context around the image: text before it (with an edit's source-image positions among
    them, as 2x2 code patches, and on checkpoints with a vision tower the source's SigLIP rows) and text after it."""

    prompt_ids: Tensor  # (p,) ids; entries at source_rows and feature_rows are ignored
    suffix_ids: Tensor  # (s,) text after the image placeholders (LaViDa-O's closing <|eot_id|>)
    source_rows: Tensor  # (n,) indices into prompt_ids of the source image's positions (edits), else empty
    source_codes: Tensor  # (n, codes_per_position)
    # (f,) indices into prompt_ids of text-stream rows fed given embeddings instead of their ids' (an edit's SigLIP
    # copy of the source: lavida_o_vision.edit_understanding), and those embeddings (f, d_model)
    feature_rows: Tensor | None = None
    features: Tensor | None = None


def image_context(config: LaViDaOConfig, prompt_ids: Tensor, suffix_ids: Tensor | None = None,
                  source_rows: Tensor | None = None, source_codes: Tensor | None = None,
                  understanding: tuple[Tensor, Tensor] | None = None) -> ImageContext:
    """`understanding` (rows, features): prompt rows that carry the understanding branch's features (the edit
    prompt's `<image>`, as lavida_o_vision.edit_understanding lays it out)."""
    empty = torch.empty(0, dtype=torch.long, device=prompt_ids.device)
    rows = empty if source_rows is None else source_rows.to(prompt_ids.device)
    codes = empty.view(0, config.codes_per_position) if source_codes is None else source_codes
    if codes.shape != (rows.numel(), config.codes_per_position):
        raise ValueError(f"source_codes must have shape ({rows.numel()}, {config.codes_per_position}), "
                         f"got {tuple(codes.shape)}")
    if rows.numel() and config.gen_enc_add_pos_emb:
        raise ValueError("gen_enc_add_pos_emb=true (Sparse-LaViDa) changes how an edit's source image is embedded "
                         "and that code is not published: edits are not supported on this checkpoint")
    feature_rows = features = None
    if understanding is not None:
        feature_rows, features = understanding[0].to(prompt_ids.device), understanding[1]
        if features.shape != (feature_rows.numel(), config.d_model):
            raise ValueError(f"understanding features must have shape ({feature_rows.numel()}, {config.d_model}), "
                             f"got {tuple(features.shape)}")
    return ImageContext(prompt_ids, empty if suffix_ids is None else suffix_ids, rows, codes, feature_rows,
                        features)


def edit_branches(config: LaViDaOConfig, cond: ImageContext,
                  uncond_prompt_ids: Tensor | None = None) -> tuple[ImageContext, ImageContext]:
    """LaViDa-O's guidance companions (predict_t2i_edit, edit_mode 0): uncond = `uncond_prompt_ids` (the publishers'
    `is_prompt`: rows through the user turn's closing `<|eot_id|>` masked, the assistant header kept; the
    request layout builds it, multimodal/lavida_o_layout.LaViDaOLayout.uncond_ids), by default the whole prompt
    masked; the source image's rows are mask tokens there, text after the image kept. Image-only = every text row
    masked, the text after the image too (`~is_gen_enc`), the source image's VQ positions kept. Neither keeps the
    SigLIP rows (they lie inside the masked user turn)."""
    mask = config.mask_token_id
    none = cond.source_rows[:0]
    if uncond_prompt_ids is not None and uncond_prompt_ids.shape != cond.prompt_ids.shape:
        raise ValueError("uncond_prompt_ids must have the prompt's length (positions are shared)")
    uncond_ids = torch.full_like(cond.prompt_ids, mask) if uncond_prompt_ids is None else uncond_prompt_ids
    uncond = ImageContext(uncond_ids, cond.suffix_ids, none, cond.source_codes[:0])
    image_only = ImageContext(torch.full_like(cond.prompt_ids, mask), torch.full_like(cond.suffix_ids, mask),
                              cond.source_rows, cond.source_codes)
    return uncond, image_only


def context_inputs(model: LaViDaOMDM, ctx: ImageContext, extra_ids: Tensor, extra_image_rows: Tensor,
                   extra_codes: Tensor) -> dict[str, Tensor]:
    """Model inputs for rows [prompt | suffix | extra...]: source rows in the image stream when the checkpoint says
    enc_use_image_branch, else as text rows carrying the zero-padded patch embedding (the publishers' two paths);
    feature rows (an edit's SigLIP copy) as text rows carrying their features."""
    cfg = model.config
    ids = torch.cat([ctx.prompt_ids, ctx.suffix_ids, extra_ids])
    source_as_text = not cfg.enc_use_image_branch and ctx.source_rows.numel()
    has_features = ctx.feature_rows is not None and ctx.feature_rows.numel()
    if not source_as_text and not has_features:
        return {"input_ids": ids, "image_rows": torch.cat([ctx.source_rows, extra_image_rows]),
                "image_codes": torch.cat([ctx.source_codes, extra_codes])}
    # the ids of feature rows (IMAGE_TOKEN_INDEX) and source rows are not embedded: clamp them to a valid id
    embeds = model.model.transformer["wte"](ids.masked_fill(ids < 0, 0))
    if has_features:
        embeds[ctx.feature_rows] = ctx.features.to(embeds.dtype)
    if source_as_text:
        embeds[ctx.source_rows] = F.pad(model.embed_patches(ctx.source_codes), (0, cfg.d_model - cfg.d_model_gen))
        return {"input_ids": ids, "image_rows": extra_image_rows, "image_codes": extra_codes, "text_embeds": embeds}
    return {"input_ids": ids, "image_rows": torch.cat([ctx.source_rows, extra_image_rows]),
            "image_codes": torch.cat([ctx.source_codes, extra_codes]), "text_embeds": embeds}


@torch.no_grad()
def generate_image_sparse(model: LaViDaOMDM, prompt_ids: Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
                          num_registers: int | None = None, record_logits: bool = True,
                          uncond_prompt_ids: Tensor | None = None, suffix_ids: Tensor | None = None,
                          source_rows: Tensor | None = None, source_codes: Tensor | None = None,
                          understanding: tuple[Tensor, Tensor] | None = None) -> ImageResult:
    """Sparse-LaViDa image generation over positions: prompt (+ suffix) prefilled into the cache, then per step
    [C_{k-1} (cached after the pass) | decode positions as mask patches | image registers].

    `plan` is over the (H/2) x (W/2) position grid (planners.image_plan); each decode position samples its 4 codes
    with the (seed, step) noise; the plan's stages fix which positions are kept (all of the stage). `suffix_ids`
    is the text after the image placeholders, prefilled with the prompt at positions after the image; registers
    follow the whole sequence. Edits: `source_rows` / `source_codes` put the source image's positions in the
    prompt, and `understanding` (rows, features) its SigLIP copy on checkpoints with a vision tower (the cond
    branch only, see edit_branches). Guidance (`cfg_scale`, `image_cfg_scale`, `cfg_interval`): the companions of
    `edit_branches` (or `uncond_prompt_ids`) are sequences with caches of their own; outside `cfg_interval` they
    run only their commit rows, so their caches stay in step with the canvas.
    """
    cfg = model.config
    device = prompt_ids.device
    m = cfg.registers("image") if num_registers is None else num_registers
    length, k = plan.length, cfg.codes_per_position
    cond = image_context(cfg, prompt_ids, suffix_ids, source_rows, source_codes, understanding)
    branches = [cond]
    if sampling.cfg_scale > 0:
        uncond, image_only = edit_branches(cfg, cond, uncond_prompt_ids)
        branches.append(uncond)
        if sampling.image_cfg_scale > 0:
            if not cond.source_rows.numel():
                raise ValueError("image_cfg_scale > 0 needs an edit's source image (source_rows, source_codes)")
            branches.append(image_only)
    p, s = prompt_ids.numel(), cond.suffix_ids.numel()
    mask_patch = torch.full((k,), cfg.mask_code, dtype=torch.long, device=device)
    patches = mask_patch.repeat(length, 1)
    dtype = next(model.parameters()).dtype
    caches = [ModalKVCache(cfg.n_layers, p + s + length + m, model.local_kv_heads, cfg.head_dim, dtype, device)
              for _ in branches]
    prefix_positions = torch.cat([torch.arange(p, device=device), p + length + torch.arange(s, device=device)])
    no_rows = torch.empty(0, dtype=torch.long, device=device)
    for ctx, cache in zip(branches, caches):
        inputs = context_inputs(model, ctx, no_rows, no_rows, patches[:0])
        model(positions=prefix_positions, attention=SpanAttention(None, cache, p + s), logits_rows=no_rows, **inputs)
        cache.advance(p + s)
    registers = _register_patch(cfg, m, device)
    register_positions = torch.arange(p + s + length, p + s + length + m, device=device)
    last = torch.empty(0, dtype=torch.long, device=device)
    steps: list[ImageStep] = []
    rows_run = (p + s) * len(branches)
    for step, stage in enumerate(plan.stages):
        decode = stage.positions.to(device)
        guided = sampling.guided_at(step, plan.num_steps)
        branch_logits = []
        for b, cache in enumerate(caches):
            decodes = b == 0 or guided  # an unguided companion only writes its commit rows
            n_dec, n_reg = (decode.numel(), m) if decodes else (0, 0)
            n_img = last.numel() + n_dec + n_reg
            if n_img == 0:
                continue
            codes = torch.cat([patches[last], mask_patch.repeat(n_dec, 1), registers[:n_reg]])
            positions = torch.cat([p + last, p + decode[:n_dec], register_positions[:n_reg]])
            spans = inference_step_spans(cache.length, n_img, last.numel())
            rows = torch.arange(n_img, device=device)
            logits = model.image_logits(torch.zeros_like(rows), positions, SpanAttention(spans, cache, last.numel()),
                                        logits_rows=rows[last.numel():last.numel() + n_dec],
                                        image_rows=rows, image_codes=codes)
            cache.advance(last.numel())
            rows_run += n_img
            if decodes:
                branch_logits.append(logits)
        logits = guide_logits(branch_logits, sampling)
        tokens, _ = sample_tokens(logits.reshape(-1, logits.shape[-1]), sampling.at_step(step, plan.num_steps),
                                  step_generator(sampling.seed, step, device))
        patches[decode] = tokens.view(-1, k)
        steps.append(ImageStep(decode.clone(), logits if record_logits else logits[:0]))
        last = decode
    return ImageResult(patches, steps, rows_run)


@torch.no_grad()
def generate_image_dense(model: LaViDaOMDM, prompt_ids: Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
                         suffix_ids: Tensor | None = None, source_rows: Tensor | None = None,
                         source_codes: Tensor | None = None,
                         understanding: tuple[Tensor, Tensor] | None = None,
                         uncond_prompt_ids: Tensor | None = None, code_width: int | None = None) -> ImageResult:
    """The vanilla (dense) MDM over positions: every step feeds [prompt | all positions (mask patches where not
    decoded) | suffix] with full attention (per-modality layers still split by modality), no cache, no registers;
    decode positions sample their 4 codes with the (seed, step) noise as generate_image_sparse does. Guidance
    branches (edit_branches, `uncond_prompt_ids` as in generate_image_sparse) each run the full pass at guided steps;
    `understanding` as in generate_image_sparse. The dense reference of the served dense path.

    `code_width`: `plan` is over single VQ codes of a grid that many codes wide (planners.publishers_code_plan, the
    publishers' own sampler): a step feeds the partly decoded patches as they are, samples the 4 codes of every
    position its codes touch, and commits only its own codes."""
    cfg = model.config
    device = prompt_ids.device
    k = cfg.codes_per_position
    length = plan.length if code_width is None else plan.length // k
    cond = image_context(cfg, prompt_ids, suffix_ids, source_rows, source_codes, understanding)
    branches = [cond]
    if sampling.cfg_scale > 0:
        uncond, image_only = edit_branches(cfg, cond, uncond_prompt_ids)
        branches += [uncond, image_only] if sampling.image_cfg_scale > 0 else [uncond]
    p, s = prompt_ids.numel(), cond.suffix_ids.numel()
    patches = torch.full((length, k), cfg.mask_code, dtype=torch.long, device=device)
    positions = torch.arange(p + length + s, device=device)
    # context_inputs lays rows out [prompt | suffix | canvas]; the pass runs them in sequence order
    # [prompt | canvas | suffix] (the served dense path's order, so the keys are summed in the same order)
    order = torch.cat([torch.arange(p, device=device), p + s + torch.arange(length, device=device),
                       p + torch.arange(s, device=device)])
    new_index = torch.empty_like(order)
    new_index[order] = torch.arange(order.numel(), device=device)
    canvas_rows = p + s + torch.arange(length, device=device)
    steps: list[ImageStep] = []
    rows_run = 0
    for step, stage in enumerate(plan.stages):
        decode = stage.positions.to(device)
        if code_width is not None:  # this step's codes -> the positions they sit in, and their slots there
            decode, taken = code_step(decode, code_width)
        ran = branches if sampling.guided_at(step, plan.num_steps) else branches[:1]
        branch_logits = []
        for ctx in ran:
            inputs = context_inputs(model, ctx, torch.zeros(length, dtype=torch.long, device=device), canvas_rows,
                                    patches)
            inputs["input_ids"] = inputs["input_ids"][order]
            inputs["image_rows"] = new_index[inputs["image_rows"]]
            if "text_embeds" in inputs:
                inputs["text_embeds"] = inputs["text_embeds"][order]
            branch_logits.append(model.image_logits(positions=positions, attention=SpanAttention(None),
                                                    logits_rows=p + decode, **inputs))
            rows_run += positions.numel()
        logits = guide_logits(branch_logits, sampling)
        tokens, _ = sample_tokens(logits.reshape(-1, logits.shape[-1]), sampling.at_step(step, plan.num_steps),
                                  step_generator(sampling.seed, step, device))
        new = tokens.view(-1, k)
        patches[decode] = new if code_width is None else torch.where(taken, new, patches[decode])
        steps.append(ImageStep(decode.clone(), logits))
    return ImageResult(patches, steps, rows_run)


@torch.no_grad()
def image_step_causal_logits(model: LaViDaOMDM, context: ImageContext | Tensor, patches: Tensor,
                             clean_blocks: Sequence[Tensor], masked_blocks: Sequence[Tensor],
                             num_registers: int, suffix_ids: Tensor | None = None) -> list[Tensor]:
    """One forward under Algorithm 1 (prompt + suffix | clean position blocks | masked blocks + image registers):
    the per-code logits of each masked block. The I2 oracle of generate_image_sparse (one branch: `context`, or
    plain prompt ids + `suffix_ids`)."""
    cfg = model.config
    ctx = context if isinstance(context, ImageContext) else image_context(cfg, context, suffix_ids)
    device = ctx.prompt_ids.device
    length = patches.shape[0]
    p, s = ctx.prompt_ids.numel(), ctx.suffix_ids.numel()
    # The packing is the engine's (build_step_causal_sequence): the suffix rides in block 0 with the prompt, and the
    # response "ids" are position indices, so the packed rows say which patch each image row carries.
    seq = build_step_causal_sequence(torch.cat([ctx.prompt_ids, ctx.suffix_ids]),
                                     torch.arange(length, device=device), list(clean_blocks), list(masked_blocks),
                                     num_registers, -1, -2)
    ids, positions = seq["ids"], seq["positions"].clone()
    # true positions: suffix after the image, image rows right after the prompt (registers already follow all)
    positions[p:p + s] = p + length + torch.arange(s, device=device)
    positions[p + s:] -= s * (positions[p + s:] < p + s + length)
    image_rows = torch.arange(p + s, ids.numel(), device=device)
    img_ids = ids[p + s:]
    codes = torch.empty(image_rows.numel(), cfg.codes_per_position, dtype=torch.long, device=device)
    clean = img_ids >= 0
    codes[clean] = patches[img_ids[clean]]
    codes[img_ids == -1] = cfg.mask_code
    n_reg = int((img_ids == -2).sum())
    codes[img_ids == -2] = _register_patch(cfg, n_reg, device)
    inputs = context_inputs(model, ctx, torch.zeros_like(img_ids), image_rows, codes)
    rows = torch.cat(seq["masked_rows"]) if seq["masked_rows"] else torch.empty(0, dtype=torch.long)
    logits = model.image_logits(positions=positions, attention=SpanAttention(seq["spans"]), logits_rows=rows, **inputs)
    return list(torch.split(logits, [r.numel() for r in seq["masked_rows"]]))


# ---- checkpoints in the published layout ------------------------------------------------------------------

CONFIG_NAME = "config.json"
VQ_SUBFOLDER = "vqvae"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def load_config(folder: str | Path) -> LaViDaOConfig:
    """config.json (+ vqvae/config.json for the codebook size) of a LaViDa-O-format checkpoint."""
    folder = Path(folder)
    raw = _read_json(folder / CONFIG_NAME)
    archs = raw.get("architectures") or []
    if raw.get("model_type") != MODEL_TYPE and ARCHITECTURE not in archs:
        raise ValueError(f"{folder / CONFIG_NAME}: not a LaViDa-O checkpoint (model_type {raw.get('model_type')!r}, "
                         f"architectures {archs}); expected model_type {MODEL_TYPE!r} / {ARCHITECTURE}")
    vq = _read_json(folder / VQ_SUBFOLDER / CONFIG_NAME)
    if "num_vq_embeddings" not in vq:
        raise ValueError(f"{folder / VQ_SUBFOLDER / CONFIG_NAME} has no num_vq_embeddings")
    return LaViDaOConfig.from_dict(raw, num_vq_embeddings=int(vq["num_vq_embeddings"]))


def read_checkpoint_tensors(folder: str | Path) -> dict[str, tuple[Tensor, str]]:
    """Every tensor of the checkpoint with the file it came from; sharded (index) or single file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out: dict[str, tuple[Tensor, str]] = {}
    if (folder / INDEX_NAME).exists():
        weight_map = _read_json(folder / INDEX_NAME).get("weight_map")
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


__all__ = ["LaViDaOConfig", "LaViDaOMDM", "PatchIds", "ModalKVCache", "ModalityAttention", "codes_to_patches",
           "patches_to_codes", "generate_image_sparse", "generate_image_dense", "image_step_causal_logits",
           "ImageContext", "image_context", "edit_branches", "context_inputs", "load_lavida_o",
           "save_lavida_o", "write_tiny_checkpoint", "random_lavida_o"]
