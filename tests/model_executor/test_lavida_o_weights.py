"""LaViDa-O checkpoints in the published layout: round trip, one error per bad file or tensor, the VQ decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

from sparse_lavida_vllm.diffusion.planners import image_plan  # noqa: E402
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig  # noqa: E402
from sparse_lavida_vllm.drivers.lavida_o_image import (  # noqa: E402
    generate_image_sparse,
)
from sparse_lavida_vllm.model_executor.lavida_o_config import load_config  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import (  # noqa: E402
    load_lavida_o,
    write_tiny_checkpoint,
)
from sparse_lavida_vllm.model_executor.patch_ids import patches_to_codes  # noqa: E402
from tests.model_executor.test_lavida_o_model import (  # noqa: E402
    CODES,
    GRID,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread


@pytest.fixture()
def checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = write_tiny_checkpoint(tmp_path / "ckpt", tiny_config(), seed=3, max_shard_tensors=20)
    return tmp_path / "ckpt", model


def test_loader_round_trip_in_the_published_layout(checkpoint) -> None:
    folder, written = checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.transformer.blocks.0.q_proj_vision.weight" in index["weight_map"]
    assert "model.downsample_gen.downsample.conv.weight" in index["weight_map"]
    assert json.loads((folder / "vqvae" / "config.json").read_text())["num_vq_embeddings"] == CODES
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "llava_llada" and raw["num_register_tokens"] == "2,3"
    assert "num_vq_embeddings" not in raw  # that belongs to vqvae/config.json
    loaded = load_lavida_o(folder)
    assert loaded.config == written.config
    for name, tensor in written.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # namespaces this file does not model (understanding tower, projector, the VQ copy) are skipped
    shard = folder / index["weight_map"]["model.transformer.wte.weight"]
    extra = load_file(str(shard))
    extra["model.mm_projector.0.weight"] = torch.zeros(2, 2)
    save_file(extra, str(shard))
    load_lavida_o(folder)


def _rewrite(folder: Path, name: str, tensor: torch.Tensor | None) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][name]
    state = load_file(str(folder / shard))
    if tensor is None:
        del state[name]
    else:
        state[name] = tensor
    save_file(state, str(folder / shard))
    return shard


def test_loader_errors_name_the_file_or_tensor(checkpoint) -> None:
    folder, _ = checkpoint
    name = "model.transformer.blocks.1.ff_out_vision.weight"
    shard = _rewrite(folder, name, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=rf"{name} in .*{shard} has shape \(3, 3\).*\(16, 24\)"):
        load_lavida_o(folder)
    _rewrite(folder, name, None)
    with pytest.raises(ValueError, match=rf"tensor {name}: .*maps it to {shard}"):
        load_lavida_o(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor {name} is missing"):
        load_lavida_o(folder)
    _rewrite(folder, "model.gen_predictor.weight", None)  # keep the index consistent for the next case
    other = sorted(set(index["weight_map"].values()))[-1]
    (folder / other).unlink()
    with pytest.raises(ValueError, match=rf"shard .*{other} .*missing"):
        load_lavida_o(folder)


def test_loader_refuses_unknown_tensors_and_wrong_folders(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    write_tiny_checkpoint(folder, tiny_config(), seed=1)
    state = load_file(str(folder / "model.safetensors"))
    state["model.transformer.blocks.0.attn_out_vision.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="attn_out_vision.weight in .* is not a parameter"):
        load_lavida_o(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        load_lavida_o(folder)
    (folder / "vqvae" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"vqvae/config.json is missing"):
        load_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "llada", "architectures": ["LLaDAModelLM"]}))
    with pytest.raises(ValueError, match="not a LaViDa-O checkpoint"):
        load_config(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config.json is missing"):
        load_config(folder)


# ---- a text-to-image request end to end on the reference path -------------------------------------------------

def test_text_to_image_decodes_through_the_checkpoints_vq(tmp_path: Path) -> None:
    from sparse_lavida_vllm.multimodal.vq import VQCodec

    folder = tmp_path / "ckpt"
    write_tiny_checkpoint(folder, tiny_config(), seed=2)
    model = load_lavida_o(folder)
    codec = VQCodec(folder, resolution=GRID * 4)  # the tiny VQ downsamples 4x: 32 px -> 8x8 codes
    assert codec.grid == (GRID, GRID) and codec.vocab_size == CODES
    prompt = torch.randint(2, 45, (5,), generator=torch.Generator().manual_seed(3))
    plan = image_plan(GRID // 2, GRID // 2, 4, "shift", "stratified", generator=torch.Generator().manual_seed(4))
    result = generate_image_sparse(model, prompt, plan, SamplingConfig(temperature=1.0, seed=5))
    codes = patches_to_codes(result.patches, GRID, GRID)
    image = codec.decode(codes)
    assert image.size == (GRID * 4, GRID * 4) and image.mode == "RGB"
    again = generate_image_sparse(model, prompt, plan, SamplingConfig(temperature=1.0, seed=5))
    assert torch.equal(again.patches, result.patches)  # (seed, step) noise: reproducible
