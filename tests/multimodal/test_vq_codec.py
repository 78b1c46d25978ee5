"""VQCodec on a tiny seeded diffusers VQModel saved as a checkpoint's `vqvae/`: LaViDa-O's calls, PIL in/out, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from sparse_lavida_vllm.multimodal import ImageCodec, PixelCodec  # noqa: E402
from sparse_lavida_vllm.multimodal.factory import load_image_codec  # noqa: E402
from sparse_lavida_vllm.multimodal.vq import VQCodec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread

CODES = 64
SIZE = 16  # pixels; 3 encoder blocks -> 4x downsampling -> 4x4 grid
GRID = SIZE // 4
N = GRID * GRID


def tiny_vq(lookup_from_codebook: bool = True) -> diffusers.VQModel:
    torch.manual_seed(0)
    model = diffusers.VQModel(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        num_vq_embeddings=CODES,
        sample_size=SIZE,
        mid_block_add_attention=False,
        lookup_from_codebook=lookup_from_codebook,
    )
    # The default codebook init (uniform +-1/n) is so small that every latent snaps to a handful of codes;
    # spread it like a trained codebook so encode exercises many codes.
    model.quantize.embedding.weight.data.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    tiny_vq().save_pretrained(root / "vqvae")
    return root


@pytest.fixture(scope="module")
def codec(checkpoint: Path) -> VQCodec:
    return VQCodec(checkpoint)


def test_loads_with_config_geometry(codec: VQCodec) -> None:
    assert isinstance(codec, ImageCodec)
    assert codec.downsample == 4 and codec.grid == (GRID, GRID) and codec.num_tokens == N and codec.vocab_size == CODES
    assert codec.image_size == (SIZE, SIZE)


def test_encode_is_lavida_o_call_on_unit_range_pixels(codec: VQCodec) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    ids = codec.encode(Image.fromarray(array))
    assert ids.dtype == torch.long and ids.shape == (N,)
    assert int(ids.min()) >= 0 and int(ids.max()) < CODES and len(ids.unique()) > 3
    assert torch.equal(codec.encode(array), ids) and torch.equal(codec.encode(Image.fromarray(array)), ids)
    # Same as LaViDa-O's encode_image_gen on [0, 1] pixels (VaeImageProcessor(do_normalize=False)) ...
    x = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = codec.vqvae.encode(x).latents
        direct = codec.vqvae.quantize(latents)[2][2].reshape(1, GRID, GRID)
        # ... and [2][2] really is the nearest codebook entry per latent position, row-major.
        flat = latents.permute(0, 2, 3, 1).reshape(-1, 4)
        nearest = torch.cdist(flat, codec.vqvae.quantize.embedding.weight).argmin(dim=1)
    assert torch.equal(direct.reshape(-1), ids) and torch.equal(nearest, ids)


def test_decode_is_lavida_o_call(codec: VQCodec) -> None:
    codes = torch.randint(0, CODES, (N,), generator=torch.Generator().manual_seed(1))
    image = codec.decode(codes)
    assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE) and image.mode == "RGB"
    with torch.no_grad():
        sample = codec.vqvae.decode(codes[None], force_not_quantize=True, shape=(1, GRID, GRID, 4)).sample.clip(0, 1)
    expected = (sample[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(image), expected)
    assert expected.std() > 0  # a decoder that ignores its codes would make the equality vacuous
    other = codes.clone()
    other[: N // 2] = (other[: N // 2] + 1) % CODES
    assert not np.array_equal(np.asarray(codec.decode(other)), expected)


def test_round_trip_shapes_and_determinism(codec: VQCodec) -> None:
    codes = torch.randint(0, CODES, (2, N), generator=torch.Generator().manual_seed(2))
    images = codec.decode_batch(codes)
    assert [im.size for im in images] == [(SIZE, SIZE)] * 2
    # One decoder pass for the batch matches decoding each image alone up to float noise (conv kernels differ
    # with batch size, ~1e-6), which uint8 truncation can turn into an off-by-one on a rare pixel.
    single = torch.cat([codec.decode_pixels(c) for c in codes])
    assert torch.allclose(codec.decode_pixels(codes), single, atol=1e-4)
    for im, c in zip(images, codes):
        assert np.abs(np.asarray(im).astype(int) - np.asarray(codec.decode(c)).astype(int)).max() <= 1
    again = codec.encode_batch(images)
    assert again.shape == (2, N) and int(again.min()) >= 0 and int(again.max()) < CODES
    assert torch.equal(again, codec.encode_batch(images)) and torch.equal(again[1], codec.encode(images[1]))
    # decode(encode(image)) is a fixed-size RGB image again and the pipeline is deterministic end to end.
    twice = codec.decode(again[0])
    assert twice.size == (SIZE, SIZE) and np.array_equal(np.asarray(twice), np.asarray(codec.decode(again[0])))


def test_token_offset_shifts_ids(checkpoint: Path, codec: VQCodec) -> None:
    shifted = VQCodec(checkpoint, token_offset=1000)
    image = Image.fromarray(np.full((SIZE, SIZE, 3), 90, dtype=np.uint8))
    assert torch.equal(shifted.encode(image), codec.encode(image) + 1000)
    codes = torch.arange(N) % CODES
    assert np.array_equal(np.asarray(shifted.decode(codes + 1000)), np.asarray(codec.decode(codes)))
    with pytest.raises(ValueError, match=r"\[1000, 1064\)"):
        shifted.decode(codes)


def test_resizes_and_crops_or_pads_any_input(checkpoint: Path, codec: VQCodec) -> None:
    wide = Image.new("RGB", (96, 48), (255, 255, 255))
    assert codec.fit_image(wide).size == (SIZE, SIZE) and codec.encode(wide.convert("L")).shape == (N,)
    padded = VQCodec(checkpoint, fit="pad").fit_image(wide)
    pixels = np.asarray(padded)
    assert padded.size == (SIZE, SIZE) and pixels[0].max() == 0 and pixels[SIZE // 2].min() == 255
    tall = VQCodec(checkpoint, resolution=(16, 8))
    assert tall.image_size == (8, 16) and tall.grid == (4, 2)
    assert tall.encode(wide).shape == (8,) and tall.decode(torch.zeros(8)).size == (8, 16)


def test_errors_name_the_problem(tmp_path: Path, checkpoint: Path, codec: VQCodec) -> None:
    with pytest.raises(ValueError, match=str(tmp_path / "vqvae")):
        VQCodec(tmp_path)
    with pytest.raises(ValueError, match=f"{N} tokens"):
        codec.decode(torch.zeros(N - 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\).*max 64"):
        codec.decode(torch.full((N,), CODES))
    with pytest.raises(ValueError, match=r"\[0, 64\).*min -1"):
        codec.decode(torch.full((N,), -1))
    with pytest.raises(ValueError, match="multiple of the VQ downsampling factor 4"):
        VQCodec(checkpoint, resolution=18)
    with pytest.raises(ValueError, match="shape"):
        codec.encode(np.zeros((SIZE, 2 * SIZE, 3), dtype=np.uint8))
    tiny_vq(lookup_from_codebook=False).save_pretrained(tmp_path / "raw" / "vqvae")
    with pytest.raises(ValueError, match="lookup_from_codebook"):
        VQCodec(tmp_path / "raw")


def test_factory_picks_each_type(checkpoint: Path) -> None:
    pixel = load_image_codec({"type": "pixel", "height": 4, "width": 6, "levels": 8, "token_offset": 3}, None)
    assert isinstance(pixel, PixelCodec) and pixel.grid == (4, 6) and pixel.token_offset == 3
    vq = load_image_codec({"type": "vq", "subfolder": "vqvae", "resolution": [8, 16], "token_offset": 0}, checkpoint)
    assert isinstance(vq, VQCodec) and vq.grid == (2, 4) and vq.token_offset == 0
    with pytest.raises(ValueError, match="codec.type"):
        load_image_codec({"type": "jpeg"}, checkpoint)
    with pytest.raises(ValueError, match="codec.type"):
        load_image_codec({}, checkpoint)
    with pytest.raises(ValueError, match="resolutoin"):
        load_image_codec({"type": "vq", "resolutoin": SIZE}, checkpoint)
    with pytest.raises(ValueError, match="checkpoint directory"):
        load_image_codec({"type": "vq"}, None)
    with pytest.raises(ValueError, match=str(checkpoint / "vq")):
        load_image_codec({"type": "vq", "subfolder": "vq"}, checkpoint)
