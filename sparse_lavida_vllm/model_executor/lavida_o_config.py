"""LaViDa-O / Sparse-LaViDa's config.json (`llava_llada`): text, generation and understanding keys, read and checked.

Names as in adobe-research/LaVida-O; what is not modelled is refused naming the key. The understanding keys (as
train.py writes them into config.json): `mm_vision_tower`, `mm_hidden_size`, `mm_projector_type`,
`mm_resampler_type`, `mm_spatial_pool_mode`, `mm_spatial_pool_stride`, `mm_spatial_pool_out_channels`,
`image_aspect_ratio`, `image_grid_pinpoints`, `mm_patch_merge_type`; plus our extension `vision_config` (SigLIP
sizes; absent = the publishers' hard-coded so400m config) so tiny checkpoints can exist. Other branches of the
publishers' code (square / pad / anyres_max / crop_split images, flat / maxpool / nobase merges, other resamplers
and projectors, 2-D pooling after the projector) are refused, naming the key (lavida_o_vision.py computes the
accepted branch).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ARCHITECTURE = "LlavaLladaForMaskedDiffusion"
MODEL_TYPE = "llava_llada"
# Constants the publishers hard-code (llava_llada.py / predict_t2i_edit.py), overridable from config.json.
IMAGE_TOKEN_ID = 126089  # <|reserved_token_5|>: one per generated image position
EDIT_IMAGE_TOKEN_ID = 126090  # <|reserved_token_6|>: one per position of an edit's source image
EXTRA_GEN_EMBEDDINGS = 256  # gen_embedding has num_vq_embeddings + 256 rows (the mask code lives there)
# build_gen_embedding's variants: "embed" = a table and a linear head; "dit" adds RMSNorm+Linear around them
# (Sequentials: gen_embedding.{0,1,2}, gen_embedding_2.{0,1}, gen_predictor.{0,1,2}); "dit2" adds gen_predictor_2.
GEN_MLP_TYPES = ("embed", "dit", "dit2")
# The keys UnderstandingConfig owns in config.json (everything else stays in LaViDaOConfig.extra, written back)
OWNED_KEYS = ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_resampler_type", "mm_spatial_pool_mode",
              "mm_spatial_pool_stride", "mm_spatial_pool_out_channels", "image_aspect_ratio", "image_grid_pinpoints",
              "mm_patch_merge_type", "vision_config")


@dataclass(frozen=True)
class VisionTowerConfig:
    """SigLIP sizes. Defaults: siglip_encoder.SigLipVisionConfig(), what SigLipVisionTower always builds
    (google/siglip-so400m-patch14-384). `num_hidden_layers` counts the hub model's layers: the last is dropped."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_hidden_layers < 2:
            raise ValueError(f"vision_config.num_hidden_layers must be >= 2 (the tower drops the last layer), got "
                             f"{self.num_hidden_layers}")
        if self.patch_size < 1 or self.image_size < self.patch_size:
            raise ValueError(f"vision_config.image_size ({self.image_size}) must hold at least one patch of "
                             f"patch_size ({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")

    @property
    def kept_layers(self) -> int:
        return self.num_hidden_layers - 1

    @classmethod
    def from_dict(cls, d: dict | None) -> VisionTowerConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise ValueError(f"vision_config has keys this model file does not read: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints: a list of (width, height) pairs, or its string form (train.py literal_evals both)."""
    if isinstance(value, str):
        if "x" in value:  # the "(1x1),...,(3x3)" range form: train.py expands it before saving, so it never lands here
            raise ValueError(f"image_grid_pinpoints {value!r}: the '(AxB)' range form is not supported; give the "
                             "(width, height) list train.py saves")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"image_grid_pinpoints {value!r} is not a list of (width, height) pairs") from exc
    try:
        out = tuple((int(w), int(h)) for w, h in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"image_grid_pinpoints {value!r} is not a list of (width, height) pairs") from exc
    if not out:
        raise ValueError("image_grid_pinpoints is empty")
    return out


@dataclass(frozen=True)
class UnderstandingConfig:
    """The understanding keys of a `llava_llada` config.json; only LaViDa-O's branch of llava_arch is accepted."""

    mm_vision_tower: str
    mm_hidden_size: int
    image_grid_pinpoints: tuple[tuple[int, int], ...]
    mm_projector_type: str = "mlp2x_gelu"
    mm_resampler_type: str | None = "spatial_pool"
    mm_spatial_pool_mode: str | None = "conv"
    mm_spatial_pool_stride: int | None = 2
    image_aspect_ratio: str = "anyres"
    mm_patch_merge_type: str = "spatial_unpad"
    vision: VisionTowerConfig = VisionTowerConfig()

    def __post_init__(self) -> None:
        def refuse(key: str, value: Any, supported: str) -> None:
            raise ValueError(f"{key}={value!r} is not supported by this model file ({supported}, what LaViDa-O's "
                             "released training and inference scripts use)")

        if "siglip" not in self.mm_vision_tower:  # multimodal_encoder/builder.py dispatches on the name
            refuse("mm_vision_tower", self.mm_vision_tower, "a SigLIP tower: the name must contain 'siglip'")
        if self.mm_projector_type != "mlp2x_gelu":
            refuse("mm_projector_type", self.mm_projector_type, "only 'mlp2x_gelu'")
        if self.mm_hidden_size != self.vision.hidden_size:
            raise ValueError(f"mm_hidden_size ({self.mm_hidden_size}) must equal the vision tower's hidden_size "
                             f"({self.vision.hidden_size})")
        if self.mm_resampler_type not in (None, "spatial_pool"):
            refuse("mm_resampler_type", self.mm_resampler_type, "'spatial_pool' or none")
        if self.mm_resampler_type == "spatial_pool":
            if self.mm_spatial_pool_mode != "conv":
                refuse("mm_spatial_pool_mode", self.mm_spatial_pool_mode, "only 'conv' for the spatial_pool resampler")
            if not self.mm_spatial_pool_stride or self.mm_spatial_pool_stride < 1:
                raise ValueError(f"mm_spatial_pool_stride must be >= 1, got {self.mm_spatial_pool_stride}")
        if self.image_aspect_ratio != "anyres":
            refuse("image_aspect_ratio", self.image_aspect_ratio, "only 'anyres'")
        if self.mm_patch_merge_type != "spatial_unpad":
            refuse("mm_patch_merge_type", self.mm_patch_merge_type, "only 'spatial_unpad'")
        tile = self.tile_size
        for w, h in self.image_grid_pinpoints:
            if w < 1 or h < 1 or w % tile or h % tile:  # the grid shape (//) and the tiles (crops) would disagree
                raise ValueError(f"image_grid_pinpoints entry ({w}, {h}) must be positive multiples of the tile "
                                 f"size {tile}")

    # ---- derived sizes ----

    @property
    def tile_size(self) -> int:
        return self.vision.image_size

    @property
    def patches_per_side(self) -> int:
        # a 'valid' conv: 384 px / patch 14 -> 27 patches, the last 6 pixels unseen (num_patches_per_side)
        return self.vision.image_size // self.vision.patch_size

    @property
    def pooled_side(self) -> int:
        """Tokens per tile side after the resampler (Conv2d with kernel = stride floors: 27 -> 13)."""
        p = self.patches_per_side
        return p if self.mm_resampler_type is None else (p - self.mm_spatial_pool_stride) // \
            self.mm_spatial_pool_stride + 1

    # ---- config.json ----

    @classmethod
    def from_dict(cls, d: dict) -> UnderstandingConfig | None:
        """From config.json; None when it declares no vision tower. Absent keys take the publishers' code defaults
        (llava_arch's getattr defaults), so a config that relies on them is refused by name."""
        if not d.get("mm_vision_tower"):
            return None
        vision = VisionTowerConfig.from_dict(d.get("vision_config"))
        resampler = d.get("mm_resampler_type")
        out_channels = d.get("mm_spatial_pool_out_channels")
        if resampler == "spatial_pool" and out_channels not in (None, vision.hidden_size):
            # SpatialPool asserts this for mode conv
            raise ValueError(f"mm_spatial_pool_out_channels ({out_channels}) must equal the vision tower's "
                             f"hidden_size ({vision.hidden_size})")
        if d.get("mm_hidden_size") is None:
            raise ValueError("mm_hidden_size is missing from config.json (the projector's input width)")
        if d.get("image_grid_pinpoints") is None:
            raise ValueError("image_grid_pinpoints is missing from config.json (anyres needs the tile resolutions)")
        return cls(mm_vision_tower=str(d["mm_vision_tower"]), mm_hidden_size=int(d["mm_hidden_size"]),
                   image_grid_pinpoints=_pinpoints(d["image_grid_pinpoints"]),
                   mm_projector_type=d.get("mm_projector_type", "linear"),  # build_vision_projector's default
                   mm_resampler_type=resampler, mm_spatial_pool_mode=d.get("mm_spatial_pool_mode"),
                   mm_spatial_pool_stride=d.get("mm_spatial_pool_stride"),
                   image_aspect_ratio=d.get("image_aspect_ratio", "square"),
                   mm_patch_merge_type=d.get("mm_patch_merge_type", "flat"), vision=vision)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"mm_vision_tower": self.mm_vision_tower, "mm_hidden_size": self.mm_hidden_size,
                             "mm_projector_type": self.mm_projector_type, "mm_resampler_type": self.mm_resampler_type,
                             "image_aspect_ratio": self.image_aspect_ratio,
                             "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
                             "mm_patch_merge_type": self.mm_patch_merge_type}
        if self.mm_resampler_type == "spatial_pool":
            d.update(mm_spatial_pool_mode=self.mm_spatial_pool_mode, mm_spatial_pool_stride=self.mm_spatial_pool_stride,
                     mm_spatial_pool_out_channels=self.vision.hidden_size)
        if self.vision != VisionTowerConfig():  # the published config has none: the tower is hard-coded
            d["vision_config"] = {f.name: getattr(self.vision, f.name) for f in fields(self.vision)}
        return d



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
        """From a published config.json; refuses what lavida_o_model.py does not model, naming the key."""
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


def check_lavida_divisible(config: LaViDaOConfig, world_size: int) -> None:
    """A ValueError naming the field when heads or an MLP width do not split evenly over the ranks."""
    names = ["n_heads", "n_kv_heads", "mlp_hidden_size"] + (["mlp_hidden_size_gen"] if config.dual_tower else [])
    for name in names:
        if getattr(config, name) % world_size:
            raise ValueError(f"{name} ({getattr(config, name)}) must be divisible by the tensor-parallel "
                             f"world size ({world_size})")


# ---- the checkpoint folder ------------------------------------------------------------------------------

CONFIG_NAME = "config.json"
VQ_SUBFOLDER = "vqvae"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def load_config(folder: str | Path) -> LaViDaOConfig:
    """config.json (+ vqvae/config.json for the codebook size) of a LaViDa-O-format checkpoint."""
    folder = Path(folder)
    raw = read_json(folder / CONFIG_NAME)
    archs = raw.get("architectures") or []
    if raw.get("model_type") != MODEL_TYPE and ARCHITECTURE not in archs:
        raise ValueError(f"{folder / CONFIG_NAME}: not a LaViDa-O checkpoint (model_type {raw.get('model_type')!r}, "
                         f"architectures {archs}); expected model_type {MODEL_TYPE!r} / {ARCHITECTURE}")
    vq = read_json(folder / VQ_SUBFOLDER / CONFIG_NAME)
    if "num_vq_embeddings" not in vq:
        raise ValueError(f"{folder / VQ_SUBFOLDER / CONFIG_NAME} has no num_vq_embeddings")
    return LaViDaOConfig.from_dict(raw, num_vq_embeddings=int(vq["num_vq_embeddings"]))
