"""LaViDa-O's config.json: the published keys read, written back, and refused by name."""

from __future__ import annotations

import pytest

from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread


def published_like_config() -> dict:
    """The shape of a LaViDa-O config.json: LLaDA keys, llava keys, dual-tower keys, Sparse-LaViDa flags."""
    return {
        "architectures": ["LlavaLladaForMaskedDiffusion"], "model_type": "llava_llada", "d_model": 4096,
        "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4,
        "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
        "include_bias": False, "weight_tying": False, "block_type": "llama", "layer_norm_type": "rms",
        "activation_type": "silu", "rope": True, "d_model_gen": 2048, "mlp_hidden_size_gen": 8192,
        "dual_tower": True, "dual_tower_layers": 16, "downsample": True, "enc_use_image_branch": True,
        "mm_vqvae": "/mnt/localssd/Meissonic/vqvae", "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1152, "block_causal": True,
        "num_register_tokens": "64,64", "num_register_groups": "25,25", "gen_enc_add_pos_emb": True,
        # what train.py writes for scripts/train/base.sh's understanding flags
        "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "mm_vision_select_layer": -2,
        "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
        "mm_resampler_type": "spatial_pool", "mm_spatial_pool_mode": "conv", "mm_spatial_pool_stride": 2,
        "mm_spatial_pool_out_channels": 1152, "mm_newline_position": "grid",
    }


def test_config_reads_the_published_keys() -> None:
    c = LaViDaOConfig.from_dict(published_like_config(), num_vq_embeddings=8192)
    assert (c.d_model, c.d_model_gen, c.mlp_hidden_size_gen, c.dual_tower_layers) == (4096, 2048, 8192, 16)
    assert c.first_split_layer == 17  # the code splits when layer_id > dual_tower_layers
    assert c.mask_code == 8193 and c.codes_per_position == 4 and c.image_token_id == 126089
    assert c.num_register_tokens == (64, 64) and c.registers("image") == 64 and c.num_register_groups == (25, 25)
    assert c.register_token_id is None and c.register_code is None  # never invented
    assert c.understanding.mm_projector_type == "mlp2x_gelu" and c.understanding.pooled_side == 13
    assert c.extra["mm_vision_select_layer"] == -2  # read by no code path of SigLipVisionTower: kept as read
    back = c.to_dict()
    assert back["num_register_tokens"] == "64,64" and back["mm_vision_tower"] == "google/siglip-so400m-patch14-384"
    assert LaViDaOConfig.from_dict(back, num_vq_embeddings=8192) == c
    # the publishers' defaults: d_model_gen / mlp_hidden_size_gen < 0 mean "as the text tower"
    plain = LaViDaOConfig.from_dict({**published_like_config(), "d_model_gen": -1, "mlp_hidden_size_gen": -1,
                                     "dual_tower": False}, num_vq_embeddings=8192)
    assert plain.d_model_gen == 4096 and plain.mlp_hidden_size_gen == 12288 and plain.first_split_layer == 32
    ratio = LaViDaOConfig.from_dict({**published_like_config(), "mlp_hidden_size": None}, num_vq_embeddings=8192)
    assert ratio.mlp_hidden_size == 4 * 4096
    for key, value in (("gen_mlp_type", "unitok"), ("extra_gen_dit", True), ("weight_tying", True),
                       ("layer_norm_type", "default"), ("activation_type", "gelu"), ("unified_gen_enc", True)):
        with pytest.raises(ValueError, match=key):
            LaViDaOConfig.from_dict({**published_like_config(), key: value}, num_vq_embeddings=8192)
