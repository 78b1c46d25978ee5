"""LaViDa-O image understanding vs a straightforward re-implementation of the publishers' path.

The reference here shares no code with lavida_o_vision.py: anyres tiling on numpy arrays, the SigLIP tower as
transformers' SiglipVisionModel with *all* hub layers read at hidden_states[-2] (what deleting the last layer and
reading hidden_states[-1] amounts to), the stride-2 conv pool as explicit sums over the 2x2 taps, the projector as
matrix products, the anyres grid / unpad / newline by hand, and the LM forward through test_lavida_o_model's PubBlock.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sparse_lavida_vllm.drivers.understanding import ImagePromptModel  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_config import (  # noqa: E402
    LaViDaOConfig,
    UnderstandingConfig,
    VisionTowerConfig,
)
from sparse_lavida_vllm.model_executor.lavida_o_vision import (  # noqa: E402
    IMAGE_TOKEN_INDEX,
    image_features,
    num_image_rows,
    preprocess_image,
    understanding_prompt,
)
from sparse_lavida_vllm.model_executor.lavida_o_weights import (  # noqa: E402
    load_lavida_o,
    random_lavida_o,
    write_tiny_checkpoint,
)
from tests.model_executor.test_lavida_o_config import published_like_config  # noqa: E402
from tests.model_executor.test_lavida_o_model import PubBlock, PubRMS, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread

TILE = 30  # 30 px / patch 4 -> 7x7 patches (2 px unseen), pooled 3x3: the odd shapes of 384 / 14 -> 27 -> 13
PINPOINTS = ((30, 60), (60, 30), (60, 60), (90, 30), (30, 90))  # base.sh's pinpoints scaled by 30 / 384
TOWER = "model.vision_tower.vision_tower.vision_model."


def vision(resampler: str | None = "spatial_pool") -> UnderstandingConfig:
    return UnderstandingConfig(
        mm_vision_tower="google/siglip-so400m-patch14-384", mm_hidden_size=24, image_grid_pinpoints=PINPOINTS,
        mm_resampler_type=resampler, mm_spatial_pool_mode="conv" if resampler else None,
        mm_spatial_pool_stride=2 if resampler else None,
        vision=VisionTowerConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=TILE, patch_size=4))


def config(resampler: str | None = "spatial_pool") -> LaViDaOConfig:
    return tiny_config(understanding=vision(resampler))


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


# ---- the reference ------------------------------------------------------------------------------------------

def ref_best(size: tuple[int, int]) -> tuple[int, int]:
    """The pinpoint that shows most of the image, then wastes least (first one on ties)."""
    w, h = size

    def merit(res: tuple[int, int]) -> tuple[int, int]:
        s = min(res[0] / w, res[1] / h)
        shown = min(int(w * s) * int(h * s), w * h)
        return shown, -(res[0] * res[1] - shown)

    return max(PINPOINTS, key=merit)


def ref_pixels(image: Image.Image) -> torch.Tensor:
    """process_anyres_image (DEBUG_FIX_PADDING=1) on numpy: base view, then the letterboxed tiles row-major."""
    w, h = image.size
    tw, th = ref_best((w, h))
    if tw / w < th / h:
        nw, nh = tw, min(math.ceil(h * (tw / w)), th)
    else:
        nw, nh = min(math.ceil(w * (th / h)), tw), th
    canvas = np.zeros((th, tw, 3), dtype=np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(image.resize((nw, nh), Image.Resampling.BICUBIC))
    side = max(w, h)
    square = np.full((side, side, 3), 127, dtype=np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = np.asarray(image)
    views = [np.asarray(Image.fromarray(square).resize((TILE, TILE), Image.Resampling.BICUBIC))]
    views += [canvas[r:r + TILE, c:c + TILE] for r in range(0, th, TILE) for c in range(0, tw, TILE)]
    px = torch.tensor(np.stack(views), dtype=torch.float64) / 255
    return ((px.float() - 0.5) / 0.5).permute(0, 3, 1, 2)


def ref_features(state: dict, cfg: UnderstandingConfig, image: Image.Image, d_model: int) -> torch.Tensor:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = cfg.vision
    hub = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        vision_use_head=False)).eval()
    target = hub.vision_model if hasattr(hub, "vision_model") else hub  # transformers 4.x / 5.x
    tower_state = {k[len(TOWER):]: t for k, t in state.items() if k.startswith(TOWER)}
    missing, unexpected = target.load_state_dict(tower_state, strict=False)
    assert not unexpected and missing and all(k.startswith(f"encoder.layers.{v.num_hidden_layers - 1}.")
                                              for k in missing)  # only the hub's last layer: never read
    px = ref_pixels(image)
    with torch.no_grad():
        x = hub(px, output_hidden_states=True).hidden_states[-2]  # mm_vision_select_layer -2
        p = v.image_size // v.patch_size
        x = x.view(px.shape[0], p, p, -1)
        if cfg.mm_resampler_type == "spatial_pool":
            n = p // 2
            weight, bias = state["model.vision_resampler.pool.weight"], state["model.vision_resampler.pool.bias"]
            pooled = bias.expand(px.shape[0], n, n, -1).clone()
            for a in range(2):
                for b in range(2):
                    pooled += x[:, a:2 * n:2, b:2 * n:2] @ weight[:, :, a, b].T
            x = pooled
        n = x.shape[1]
        x = x.reshape(px.shape[0], n * n, -1)
        x = F.gelu(x @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
        x = x @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
    w, h = image.size
    cols, rows = ref_best((w, h))[0] // TILE, ref_best((w, h))[1] // TILE
    grid = torch.zeros(rows * n, cols * n, d_model)
    for i in range(rows):
        for j in range(cols):
            grid[i * n:(i + 1) * n, j * n:(j + 1) * n] = x[1 + i * cols + j].view(n, n, d_model)
    gh, gw = grid.shape[:2]
    if w / h > gw / gh:
        pad = (gh - int(h * (gw / w))) // 2
        grid = grid[pad:gh - pad]
    else:
        pad = (gw - int(w * (gh / h))) // 2
        grid = grid[:, pad:gw - pad]
    newline = state["model.image_newline"]
    return torch.cat([x[0]] + [torch.cat([row, newline[None]]) for row in grid])


def ref_logits(state: dict, c: LaViDaOConfig, pieces: list[torch.Tensor]) -> torch.Tensor:
    """LLaDA's forward on inputs_embeds (every row in the text stream: no generation placeholders)."""
    blocks = torch.nn.ModuleList(PubBlock(i, c) for i in range(c.n_layers))
    for block in blocks:  # no image-stream rows: a split layer's text-to-text attention covers every row
        block.split = False
    blocks.load_state_dict({k[len("model.transformer.blocks."):]: t for k, t in state.items()
                            if k.startswith("model.transformer.blocks.")})
    ln_f = PubRMS(c.d_model, c.rms_norm_eps)
    ln_f.weight.data.copy_(state["model.transformer.ln_f.weight"])
    x = torch.cat(pieces)
    mod = torch.zeros(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for block in blocks:
            x = block(x, mod)
        return ln_f(x) @ state["model.transformer.ff_out.weight"].T


# ---- (a) features --------------------------------------------------------------------------------------------

# 2x1 tiles; 3x1 tiles with rows cut by the unpadding; 1x3 tiles, no pool (7x7 per tile), columns cut
@pytest.mark.parametrize("size, resampler", [((50, 23), "spatial_pool"), ((90, 12), "spatial_pool"),
                                             ((12, 80), None)])
def test_image_features_equal_the_reference(tmp_path: Path, size: tuple[int, int], resampler: str | None) -> None:
    """Tiles, tower (last layer dropped), conv pool, projector, anyres grid, unpad, newline: fp32 to 1e-5."""
    write_tiny_checkpoint(tmp_path, config(resampler), seed=5)
    model = load_lavida_o(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    image = picture(*size, seed=sum(size))
    tiles = preprocess_image(model.config.understanding, image)
    assert tiles.image_size == size
    assert (tiles.pixel_values - ref_pixels(image)).abs().max().item() <= 1e-6
    with torch.no_grad():
        got = image_features(model, tiles)
    want = ref_features(state, model.config.understanding, image, model.config.d_model)
    assert got.shape == want.shape and got.shape[0] == num_image_rows(model.config.understanding, size)
    assert (got - want).abs().max().item() <= 1e-5
    assert want.abs().max().item() > 1e-2  # not a comparison of near-zero tensors


# ---- (b) logits of a text + image prompt -----------------------------------------------------------------------

def test_prompt_logits_equal_the_reference(tmp_path: Path) -> None:
    """Two images of different shapes spliced at their placeholders; the LM head over every row, masks included."""
    c = config()
    write_tiny_checkpoint(tmp_path, c, seed=6)
    model = load_lavida_o(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    images = [picture(50, 23, seed=1), picture(20, 70, seed=2)]
    texts = [torch.tensor([3, 4, 5]), torch.tensor([6, 7]), torch.tensor([8, 9, 10, 11])]
    answer = torch.tensor([12, c.mask_token_id, 13, c.mask_token_id])
    placeholder = torch.tensor([IMAGE_TOKEN_INDEX])
    prompt = understanding_prompt(model, torch.cat([texts[0], placeholder, texts[1], placeholder, texts[2]]), images)
    rows = prompt.ids.numel() + answer.numel()
    with torch.no_grad():
        got = ImagePromptModel(model, prompt)(torch.cat([prompt.ids, answer]), torch.arange(rows))
    wte = state["model.transformer.wte.weight"]
    feats = [ref_features(state, c.understanding, im, c.d_model) for im in images]
    want = ref_logits(state, c, [wte[texts[0]], feats[0], wte[texts[1]], feats[1], wte[texts[2]], wte[answer]])
    assert got.shape == want.shape == (rows, c.vocab_size)
    assert (got - want).abs().max().item() <= 1e-5
    # the image rows matter: another picture changes the answer rows' logits
    other = understanding_prompt(model, prompt.ids[:0].new_tensor([3, IMAGE_TOKEN_INDEX, 4]), [picture(50, 23, 9)])
    same = understanding_prompt(model, prompt.ids[:0].new_tensor([3, IMAGE_TOKEN_INDEX, 4]), [images[0]])
    with torch.no_grad():
        a, b = (ImagePromptModel(model, p)(torch.cat([p.ids, answer]), torch.arange(p.ids.numel() + 4),
                                           logits_rows=p.ids.numel() + torch.arange(4)) for p in (other, same))
    assert (a - b).abs().max().item() > 1e-4


# ---- (c) the loader and the config ------------------------------------------------------------------------------

def _edit(folder: Path, name: str, tensor: torch.Tensor | None) -> None:
    state = load_file(str(folder / "model.safetensors"))
    if tensor is None:
        del state[name]
    else:
        state[name] = tensor
    save_file(state, str(folder / "model.safetensors"))


def test_loader_names_a_missing_or_misshapen_vision_tensor(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, config(), seed=7)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["mm_patch_merge_type"] == "spatial_unpad" and raw["image_grid_pinpoints"][0] == [30, 60]
    assert raw["vision_config"]["num_hidden_layers"] == 3  # the hub's count; the tower keeps 2
    assert LaViDaOConfig.from_dict(raw, num_vq_embeddings=16) == config()
    # what SigLipVisionTower.load_model throws away may be in a checkpoint: the last layer and the pooling head
    _edit(tmp_path, f"{TOWER}encoder.layers.2.mlp.fc1.weight", torch.zeros(40, 24))
    _edit(tmp_path, f"{TOWER}head.probe", torch.zeros(1, 1, 24))
    load_lavida_o(tmp_path)
    fc1 = f"{TOWER}encoder.layers.1.mlp.fc1.weight"
    _edit(tmp_path, fc1, torch.zeros(24, 40))
    with pytest.raises(ValueError, match=rf"tensor {fc1} in .*model.safetensors has shape \(24, 40\), config.json "
                                         r"implies \(40, 24\)"):
        load_lavida_o(tmp_path)
    _edit(tmp_path, fc1, None)
    with pytest.raises(ValueError, match=rf"tensor {fc1} is missing"):
        load_lavida_o(tmp_path)
    _edit(tmp_path, fc1, torch.zeros(40, 24))
    for name in ("model.mm_projector.2.weight", "model.image_newline", "model.vision_resampler.pool.bias"):
        state = load_file(str(tmp_path / "model.safetensors"))
        _edit(tmp_path, name, None)
        with pytest.raises(ValueError, match=rf"tensor {name} is missing"):
            load_lavida_o(tmp_path)
        _edit(tmp_path, name, state[name])
    load_lavida_o(tmp_path)


def test_config_refuses_other_branches_by_name() -> None:
    published = published_like_config()
    c = LaViDaOConfig.from_dict(published, num_vq_embeddings=8192)
    u = c.understanding
    assert (u.tile_size, u.patches_per_side, u.pooled_side, u.vision.kept_layers) == (384, 27, 13, 26)
    assert num_image_rows(u, (1024, 1024)) == 13 * 13 + 26 * 27  # 768 x 768: 2x2 tiles, no unpadding
    assert "vision_config" not in c.to_dict()  # the published config has none: the tower is hard-coded
    for key, value in (("image_aspect_ratio", "pad"), ("image_aspect_ratio", "anyres_max_9"),
                       ("mm_patch_merge_type", "flat"), ("mm_patch_merge_type", "spatial_unpad_nobase"),
                       ("mm_resampler_type", "perceiver"), ("mm_spatial_pool_mode", "average"),
                       ("mm_projector_type", "linear"), ("mm_vision_tower", "openai/clip-vit-large-patch14-336"),
                       ("mm_hidden_size", 1024), ("mm_spatial_pool_out_channels", 512),
                       ("image_grid_pinpoints", [[384, 700]]), ("image_grid_pinpoints", "(1x1),...,(3x3)")):
        with pytest.raises(ValueError, match=key):
            LaViDaOConfig.from_dict({**published, key: value}, num_vq_embeddings=8192)
    for key in ("image_aspect_ratio", "mm_patch_merge_type", "mm_projector_type"):  # the code's defaults: refused
        with pytest.raises(ValueError, match=key):
            LaViDaOConfig.from_dict({k: v for k, v in published.items() if k != key}, num_vq_embeddings=8192)
    no_pool = {k: v for k, v in published.items() if not k.startswith("mm_spatial_pool")}
    assert LaViDaOConfig.from_dict({**no_pool, "mm_resampler_type": None},
                                   num_vq_embeddings=8192).understanding.pooled_side == 27


def test_prompts_and_models_without_vision_are_refused() -> None:
    model = random_lavida_o(config(), seed=8)
    with pytest.raises(ValueError, match="2 image placeholders .* but 1 images"):
        understanding_prompt(model, torch.tensor([3, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]), [picture(30, 30, 0)])
    with pytest.raises(ValueError, match="declares no vision tower"):
        understanding_prompt(random_lavida_o(tiny_config()), torch.tensor([3, IMAGE_TOKEN_INDEX]),
                             [picture(30, 30, 0)])
