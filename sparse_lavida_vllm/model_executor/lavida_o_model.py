"""LaViDa-O / Sparse-LaViDa (`llava_llada`): the LLaDA tower plus the Elastic-MoT generation branch, over flat rows.

What this file models (its config.json: lavida_o_config.py; checkpoints: lavida_o_weights.py; the drivers that run
it: drivers/lavida_o_image.py), with names as in adobe-research/LaVida-O (`llava_llada.py`, `llada/modeling_llada.py`,
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
  lavida_o_vision.py; this file builds its modules (lavida_o_weights.py loads them).

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lavida_vllm.diffusion.masks import spans_to_mask
from sparse_lavida_vllm.model_executor.attention import AttentionBackend, KVCache, SpanAttention, sdpa_with_mask
from sparse_lavida_vllm.model_executor.lavida_o_config import (
    EXTRA_GEN_EMBEDDINGS,
    LaViDaOConfig,
    check_lavida_divisible,
)
from sparse_lavida_vllm.model_executor.lavida_o_vision import build_understanding
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

UPSAMPLE_NORM_EPS = 1e-6  # Simple_UVitBlock's layer_norm_eps (also the gen MLPs' nn.RMSNorm eps)


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
            # on this checkpoint run through drivers.text unchanged.
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

