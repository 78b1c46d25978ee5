"""PixelCodec: grey levels round-trip through token ids and PNG images; bad input names the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_lavida_vllm.multimodal import ImageCodec, PixelCodec


def test_round_trip_levels_and_image() -> None:
    codec = PixelCodec(16, 16, 16, token_offset=8)
    assert isinstance(codec, ImageCodec) and codec.grid == (16, 16) and codec.vocab_size == 16
    levels = np.arange(256).reshape(16, 16) % 16
    ids = codec.encode(levels / 15.0)
    assert ids.shape == (256,) and int(ids.min()) == 8 and int(ids.max()) == 23
    image = codec.decode(ids)
    assert image.size == (16, 16) and image.mode == "L"
    assert torch.equal(codec.encode(image), ids)  # decode -> encode is the identity on codes


def test_encode_resizes_pil_images() -> None:
    codec = PixelCodec(16, 16, 16)
    big = Image.fromarray(np.full((64, 32), 255, dtype=np.uint8))
    assert torch.equal(codec.encode(big), torch.full((256,), 15))


def test_bad_input_names_field() -> None:
    codec = PixelCodec(16, 16, 16, token_offset=8)
    with pytest.raises(ValueError, match="levels"):
        PixelCodec(levels=0)
    with pytest.raises(ValueError, match="shape"):
        codec.encode(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="token_ids"):
        codec.decode(torch.zeros(256, dtype=torch.long))  # id 0 is not an image code
    with pytest.raises(ValueError, match="token_ids"):
        codec.decode(torch.full((10,), 8))


def test_an_upscaled_decoded_image_encodes_back_to_its_tokens():
    """The images routes return integer-upscaled PNGs; uploading one for an edit must give the same tokens."""
    from PIL import Image

    codec = PixelCodec(16, 16, 16, token_offset=8)
    tokens = torch.randint(8, 24, (256,), generator=torch.Generator().manual_seed(0))
    for side, mode in ((64, "L"), (48, "RGB"), (16, "RGBA")):
        image = codec.decode(tokens).convert(mode).resize((side, side), Image.NEAREST)
        assert torch.equal(codec.encode(image), tokens), (side, mode)
