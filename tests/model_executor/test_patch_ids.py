"""LaViDa-O image positions: the 2x2 patch layout and the packed ids the served engine carries."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig  # noqa: E402
from sparse_lavida_vllm.model_executor.patch_ids import codes_to_patches, patches_to_codes  # noqa: E402
from tests.model_executor.test_lavida_o_config import published_like_config  # noqa: E402
from tests.model_executor.test_lavida_o_model import (  # noqa: E402
    CODES,
    GRID,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread


def test_patch_layout_is_the_2x2_grid() -> None:
    codes = torch.arange(GRID * GRID)
    patches = codes_to_patches(codes, GRID, GRID)
    assert patches[0].tolist() == [0, 1, 8, 9] and patches[1].tolist() == [2, 3, 10, 11]
    assert patches[4].tolist() == [16, 17, 24, 25]
    assert torch.equal(patches_to_codes(patches, GRID, GRID), codes)


def test_patch_ids_pack_a_position_into_one_id_above_the_vocabulary() -> None:
    """The served engine's image rows: 4 codes (mask and register codes included) <-> one int64 id, two ranges."""
    from sparse_lavida_vllm.model_executor.patch_ids import PatchIds

    config = tiny_config()
    ids = PatchIds.of(config)
    table = CODES + 256
    patches = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4], [table - 1] * 4, [config.mask_code] * 4, [15, 0, 7, 18]])
    packed = ids.pack(patches)
    assert packed[0] == config.vocab_size and packed[1] == config.vocab_size + ((1 * table + 2) * table + 3) * table + 4
    assert bool((packed >= config.vocab_size).all()) and bool((packed < ids.source_base).all())
    assert torch.equal(ids.unpack(packed), patches)
    source = ids.pack(patches, source=True)  # an edit's source image without enc_use_image_branch: text stream
    assert bool((source >= ids.source_base).all()) and torch.equal(ids.unpack(source), patches)
    gen, text_stream = ids.kinds(torch.cat([torch.tensor([5]), packed, source]))
    assert gen.tolist() == [False] + [True] * 5 + [False] * 5 and text_stream.tolist() == [False] * 6 + [True] * 5
    assert ids.unpack(torch.tensor([ids.mask_id])).tolist() == [[config.mask_code] * 4]
    assert ids.unpack(torch.tensor([ids.register_id])).tolist() == [[config.register_code] * 4]
    image_branch = PatchIds.of(tiny_config(enc_use_image_branch=True))
    assert bool((image_branch.pack(patches, source=True) < image_branch.source_base).all())  # image-stream rows
    published = PatchIds.of(LaViDaOConfig.from_dict(published_like_config(), num_vq_embeddings=8192))
    assert published.source_base + published.span < 2**63  # int64 holds both ranges at the published sizes
    with pytest.raises(ValueError, match="codes must lie"):
        ids.pack(torch.tensor([[table, 0, 0, 0]]))
