"""LaViDa-O image understanding: SigLIP tower, spatial-pool resampler, `mlp2x_gelu` projector, anyres tiles.

What this file models, with names and semantics as in adobe-research/LaVida-O (the publishers' code wins over
anything written about it elsewhere):

* `multimodal_encoder/siglip_encoder.py` `SigLipVisionTower`: a SigLIP vision model whose *last encoder layer is
  deleted* (`load_model`: `del encoder.layers[-1:]`, `head = nn.Identity()`), read at `hidden_states[-1]`, i.e. the
  last kept layer before `post_layernorm`: layer -2 of the hub model, all patches (SigLIP has no CLS token). The
  tower ignores `mm_vision_select_layer` / `mm_vision_select_feature` and hard-codes its config
  (`SigLipVisionConfig()`: so400m, 384 px, patch 14, 27 layers). Checkpoint names:
  `model.vision_tower.vision_tower.vision_model.{embeddings,encoder.layers.N,post_layernorm}.*` (26 layers).
* `multimodal_resampler/spatial_pool.py` `SpatialPool` (`mm_resampler_type` "spatial_pool"), mode "conv": a
  stride x stride Conv2d (bias) over the P x P patch grid of each tile, before the projector (27 x 27 -> 13 x 13:
  the odd row and column are dropped). `model.vision_resampler.pool.{weight,bias}`.
* `multimodal_projector/builder.py` `mlp2x_gelu`: Linear(mm_hidden_size, d_model), GELU, Linear(d_model, d_model):
  `model.mm_projector.{0,2}.{weight,bias}`.
* `mm_utils.py` `process_anyres_image` (with `DEBUG_FIX_PADDING=1`, which LaViDa-O's demo, eval and training
  scripts all set): tiles of the best `image_grid_pinpoints` resolution (`select_best_resolution`,
  `resize_and_pad_image`: bicubic, black padding, `divide_to_patches` row-major) after a base view = the image padded
  to a square with the processor's mean grey (127) and resized to the tile size.
* `llava_arch.py` `encode_images` (tower -> resampler -> projector) and `prepare_inputs_labels_for_multimodal`
  with `NOT_ALWASY_DO_2DPOOL=1` (set by the same scripts: no `get_2dPool` after the projector),
  `mm_patch_merge_type` "spatial_unpad", `image_aspect_ratio` "anyres": the base tile's tokens, then the tile grid
  assembled spatially (`get_anyres_image_grid_shape`), cropped back to the image's aspect (`unpad_image`), with
  `model.image_newline` appended to every row. The result replaces the prompt's `<image>` (`IMAGE_TOKEN_INDEX`
  -200 after `tokenizer_image_token`); positions simply run on (arange over the spliced sequence).
* Understanding features are *text-stream* rows of the dual tower: `LlavaLladaForMaskedDiffusion.forward` puts only
  generation placeholders (126089) and, with `enc_use_image_branch`, edit placeholders (126090) into
  `modality_indices`. So an understanding prompt is a text-only sequence given as embeddings and runs through the
  engine's text samplers (`drivers.text`) unchanged, dense or sparse (`drivers.understanding.ImagePromptModel`).

The config.json keys of this half (`UnderstandingConfig`, and which branches are refused) are read in
lavida_o_config.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig, UnderstandingConfig

if TYPE_CHECKING:
    from PIL import Image

IMAGE_TOKEN_INDEX = -200  # llava.constants: what tokenizer_image_token puts where the prompt says "<image>"
# What a prompt says where an image goes (llava.constants.DEFAULT_IMAGE_TOKEN): the chat renderer writes it for an
# image part and LaViDaOLayout.edit_prompt for an edit's source; vLLM's multimodal processor
# (worker/lavida_o_processor.py) expands its ids into the image's rows.
IMAGE_PLACEHOLDER = "<image>"
# SigLipImageProcessor's constants (the publishers hard-code them; the tile size is the tower's image_size)
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
BASE_PAD_GREY = int(IMAGE_MEAN * 255)  # expand2square(image, tuple(int(x * 255) for x in image_mean)) -> 127
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
UNDERSTANDING_PREFIXES = ("model.vision_tower.", "model.mm_projector.", "model.vision_resampler.",
                          "model.image_newline")


class UnderstandingModel(Protocol):
    """What this half reads of a LaViDaOMDM: its config and its module namespace (`model.model`). Structural, so
    this module needs no import of the model, which imports this one to build the tower."""

    config: LaViDaOConfig
    model: nn.Module


# ---- anyres geometry (mm_utils / llava_arch) ----------------------------------------------------------------

def select_best_resolution(image_size: tuple[int, int], resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """mm_utils.select_best_resolution: the (width, height) that keeps most of the image, then wastes least."""
    width, height = image_size
    best, best_effective, best_wasted = resolutions[0], 0, float("inf")
    for w, h in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def anyres_grid(config: UnderstandingConfig, image_size: tuple[int, int]) -> tuple[int, int]:
    """get_anyres_image_grid_shape: (tiles across, tiles down) for an image of (width, height)."""
    w, h = select_best_resolution(image_size, config.image_grid_pinpoints)
    return w // config.tile_size, h // config.tile_size


def unpad_slices(grid_height: int, grid_width: int, image_size: tuple[int, int]) -> tuple[slice, slice]:
    """llava_arch.unpad_image on a (grid_height, grid_width) feature grid: the rows and columns that hold the image
    (the tiles were cut from the image letterboxed into the best resolution). Same float/int arithmetic."""
    width, height = image_size
    if width / height > grid_width / grid_height:  # padding was added above and below
        new_height = int(height * (grid_width / width))
        pad = (grid_height - new_height) // 2
        return slice(pad, grid_height - pad), slice(0, grid_width)
    new_width = int(width * (grid_height / height))
    pad = (grid_width - new_width) // 2
    return slice(0, grid_height), slice(pad, grid_width - pad)


def num_image_rows(config: UnderstandingConfig, image_size: tuple[int, int]) -> int:
    """How many prompt rows one image becomes (base tile + unpadded grid with a newline per row), without running
    the tower: what a serving front end needs to size the placeholder."""
    side = config.pooled_side
    cols, rows = anyres_grid(config, image_size)
    rs, cs = unpad_slices(rows * side, cols * side, image_size)
    height, width = len(range(rows * side)[rs]), len(range(cols * side)[cs])
    return side * side + height * (width + 1)


# ---- pixels -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTiles:
    """One image as the tower sees it: (1 + tiles, 3, S, S) normalised pixels (base view first, then the tiles
    row-major) and the original (width, height), which the unpadding needs."""

    pixel_values: Tensor
    image_size: tuple[int, int]


def _to_pixels(image: Image.Image) -> Tensor:
    """SigLipImageProcessor.preprocess on an S x S view: rescale 1/255 (float64 -> float32, as transformers does),
    normalise with mean = std = 0.5, channels first. Its resize to (S, S) is a no-op on S x S views."""
    import numpy as np

    arr = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def preprocess_image(config: UnderstandingConfig, image: Image.Image) -> ImageTiles:
    """mm_utils.process_anyres_image with DEBUG_FIX_PADDING=1 (LaViDa-O's setting) for one PIL image."""
    from PIL import Image as PILImage

    bicubic = PILImage.Resampling.BICUBIC  # PIL's default for resize(), which the publishers call without one
    image = image.convert("RGB")
    width, height = image.size
    tile = config.tile_size
    target_w, target_h = select_best_resolution((width, height), config.image_grid_pinpoints)
    # resize_and_pad_image: fill one side exactly (ceil on the other, capped), centre on black
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = PILImage.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), bicubic), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    tiles = [canvas.crop((x, y, x + tile, y + tile))  # divide_to_patches: row-major
             for y in range(0, target_h, tile) for x in range(0, target_w, tile)]
    # the base view: expand2square with the mean grey, then a plain resize to the tile size
    side = max(width, height)
    square = PILImage.new("RGB", (side, side), (BASE_PAD_GREY,) * 3)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    base = square.resize((tile, tile), bicubic)
    return ImageTiles(torch.stack([_to_pixels(v) for v in [base, *tiles]]), (width, height))


# ---- modules and features -----------------------------------------------------------------------------------

def build_understanding(model_ns: nn.Module, config: UnderstandingConfig, d_model: int) -> None:
    """Attach the understanding modules under LaViDaOMDM.model with the published parameter names."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = config.vision
    hf_config = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                   num_hidden_layers=v.kept_layers, num_attention_heads=v.num_attention_heads,
                                   num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                                   hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, vision_use_head=False)
    siglip = SiglipVisionModel(hf_config)
    model_ns.vision_tower = nn.Module()
    if hasattr(siglip, "vision_model"):  # transformers 4.x nests the transformer under .vision_model already
        model_ns.vision_tower.vision_tower = siglip
    else:  # transformers 5.x: the model *is* the transformer; nest it so names match the checkpoint
        model_ns.vision_tower.vision_tower = nn.Module()
        model_ns.vision_tower.vision_tower.vision_model = siglip
    if config.mm_resampler_type == "spatial_pool":
        model_ns.vision_resampler = nn.Module()
        stride = config.mm_spatial_pool_stride
        model_ns.vision_resampler.pool = nn.Conv2d(v.hidden_size, v.hidden_size, kernel_size=stride, stride=stride)
    model_ns.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, d_model), nn.GELU(),
                                          nn.Linear(d_model, d_model))
    model_ns.image_newline = nn.Parameter(torch.zeros(d_model))  # "unpad" merge types create it


def dropped_by_publishers(name: str, config: UnderstandingConfig) -> bool:
    """Tensors a checkpoint may hold that SigLipVisionTower.load_model throws away: the last encoder layer and the
    attention-pooling head."""
    last = f"{TOWER_PREFIX}encoder.layers.{config.vision.kept_layers}."
    return name.startswith((last, f"{TOWER_PREFIX}head."))


def _understanding(model: UnderstandingModel) -> UnderstandingConfig:
    config = model.config.understanding
    if config is None:
        raise ValueError("this checkpoint's config.json declares no vision tower (mm_vision_tower): no image "
                         "understanding")
    return config


def encode_tiles(model: UnderstandingModel, pixel_values: Tensor) -> Tensor:
    """llava_arch.encode_images: (T, 3, S, S) -> (T, tokens per tile, d_model): tower, resampler, projector."""
    config = _understanding(model)
    ns = model.model
    s = config.tile_size
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (config.vision.num_channels, s, s):
        raise ValueError(f"pixel_values must have shape (tiles, {config.vision.num_channels}, {s}, {s}), got "
                         f"{tuple(pixel_values.shape)}")
    siglip = ns.vision_tower.vision_tower.vision_model
    dtype = ns.mm_projector[0].weight.dtype
    x = siglip.embeddings(pixel_values.to(device=ns.image_newline.device, dtype=dtype))
    # the encoder's output is the last kept layer before post_layernorm: the publishers' hidden_states[-1]
    x = siglip.encoder(inputs_embeds=x).last_hidden_state
    if config.mm_resampler_type == "spatial_pool":
        p = config.patches_per_side
        grid = x.view(x.shape[0], p, p, x.shape[-1]).permute(0, 3, 1, 2)  # patches are row-major
        x = ns.vision_resampler.pool(grid).flatten(2).transpose(1, 2)
    return ns.mm_projector(x)


def image_features(model: UnderstandingModel, tiles: ImageTiles) -> Tensor:
    """One image's prompt rows (n, d_model): the spatial_unpad / anyres branch of
    prepare_inputs_labels_for_multimodal (no 2-D pooling after the projector: NOT_ALWASY_DO_2DPOOL=1)."""
    config = _understanding(model)
    feats = encode_tiles(model, tiles.pixel_values)
    newline = model.model.image_newline.to(feats.dtype)
    if feats.shape[0] == 1:  # a lone view: its tokens and one newline
        return torch.cat([feats[0], newline[None]])
    base, rest = feats[0], feats[1:]
    side = config.pooled_side
    cols, rows = anyres_grid(config, tiles.image_size)
    if rest.shape[0] != cols * rows:
        raise ValueError(f"an image of size {tiles.image_size} is cut into {rows}x{cols} tiles by "
                         f"image_grid_pinpoints, but {rest.shape[0]} tiles were given")
    d = feats.shape[-1]
    grid = rest.view(rows, cols, side, side, d).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
    rs, cs = unpad_slices(rows * side, cols * side, tiles.image_size)
    grid = grid[rs, cs]
    grid = torch.cat([grid, newline.view(1, 1, d).expand(grid.shape[0], 1, d)], dim=1)  # newline ends every row
    return torch.cat([base, grid.reshape(-1, d)])


# ---- prompts with images ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnderstandingPrompt:
    """A prompt with its images spliced in: `ids` (rows,) are the text ids with IMAGE_TOKEN_INDEX on every image
    row (as LLaVA's new_input_ids), `embeds` (rows, d_model) every row's input embedding."""

    ids: Tensor
    embeds: Tensor


def understanding_prompt(model: UnderstandingModel, prompt_ids: Tensor,
                         images: Sequence[ImageTiles | Image.Image]) -> UnderstandingPrompt:
    """prompt ids holding one IMAGE_TOKEN_INDEX per `<image>` -> rows with each image's features at its place."""
    config = _understanding(model)
    slots = (prompt_ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(slots) != len(images):
        raise ValueError(f"the prompt has {len(slots)} image placeholders ({IMAGE_TOKEN_INDEX}) but {len(images)} "
                         "images were given")
    if bool((prompt_ids[prompt_ids != IMAGE_TOKEN_INDEX] < 0).any()):
        raise ValueError(f"prompt ids must be >= 0 apart from the image placeholder {IMAGE_TOKEN_INDEX}")
    wte = model.model.transformer["wte"]
    ids, embeds, start = [], [], 0
    with torch.no_grad():
        for slot, image in zip(slots, images):
            tiles = image if isinstance(image, ImageTiles) else preprocess_image(config, image)
            feats = image_features(model, tiles)
            text = prompt_ids[start:slot]
            ids += [text, torch.full((feats.shape[0],), IMAGE_TOKEN_INDEX, dtype=torch.long, device=text.device)]
            embeds += [wte(text), feats.to(wte.weight.dtype)]
            start = slot + 1
        ids.append(prompt_ids[start:])
        embeds.append(wte(prompt_ids[start:]))
    return UnderstandingPrompt(torch.cat(ids), torch.cat(embeds))


def edit_understanding(model: UnderstandingModel, prompt_ids: Tensor,
                       image: ImageTiles | Image.Image) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """An edit prompt holding one IMAGE_TOKEN_INDEX (predict_t2i_edit's `<image>` before the source's VQ
    placeholders) -> (the prompt with the source's SigLIP rows spliced in, (those rows, their features)), the
    `understanding` argument of drivers.lavida_o_image.generate_image_sparse / generate_image_dense. The rows are
    text-stream rows as in a chat prompt (the publishers' `modality_indices` name only the VQ rows)."""
    if int((prompt_ids == IMAGE_TOKEN_INDEX).sum()) != 1:
        raise ValueError(f"an edit prompt holds exactly one image placeholder ({IMAGE_TOKEN_INDEX})")
    spliced = understanding_prompt(model, prompt_ids, [image])
    rows = (spliced.ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
    return spliced.ids, (rows, spliced.embeds[rows])



__all__ = ["IMAGE_TOKEN_INDEX", "IMAGE_PLACEHOLDER", "ImageTiles", "UnderstandingModel", "UnderstandingPrompt",
           "select_best_resolution", "anyres_grid", "unpad_slices", "num_image_rows", "preprocess_image",
           "build_understanding", "encode_tiles", "image_features", "understanding_prompt", "edit_understanding",
           "dropped_by_publishers"]
