"""Request rules per model family: what the scheduler and the API server refuse beyond the knobs, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparse_lavida_vllm.model_executor.lavida_o_config import ARCHITECTURE as LAVIDA_O
from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig, UnderstandingConfig, VisionTowerConfig
from sparse_lavida_vllm.model_executor.patch_ids import PatchIds
from sparse_lavida_vllm.multimodal.request_rules import (
    EDITS_UNPUBLISHED,
    NO_IMAGE_INPUTS,
    PER_CODE_ONLY,
    LaViDaORules,
    RequestRules,
    request_rules,
)
from sparse_lavida_vllm.scheduler.params import parse_params

CODES = 16
PROMPT = 12
SPAN = (4, 8)  # an edit's source positions in the prompt


def lavida_config(**kw) -> LaViDaOConfig:
    """A tiny LaViDa-O config (2x2 codes per position, image registers with a register code)."""
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                rope_theta=500000.0, mask_token_id=60, eos_token_id=1, pad_token_id=1, d_model_gen=16,
                mlp_hidden_size_gen=24, dual_tower=True, dual_tower_layers=0, downsample=True,
                num_vq_embeddings=CODES, image_token_id=50, edit_image_token_id=51, num_register_tokens=(2, 3),
                num_register_groups=(25, 25), block_causal=True, register_token_id=61, register_code=CODES + 2)
    return LaViDaOConfig(**{**base, **kw})


class Sampling:
    """The fields parse_params reads off a request's SamplingParams."""

    def __init__(self, **extra) -> None:
        self.extra_args = {"kind": "image", "height": 2, "width": 2, "sparse": False, **extra}
        self.temperature, self.top_p, self.top_k, self.seed = 1.0, 1.0, 0, 0


def image(**extra):
    return parse_params(Sampling(**extra), PROMPT, 512, 0, default_sparse=False, has_register_token=False)


def text():
    return parse_params(type("Text", (), {"max_tokens": 4, "extra_args": None})(), PROMPT, 512, 0)


def test_token_canvas_rules_refuse_image_inputs_the_per_code_sampler_and_source_codes():
    rules = RequestRules()
    assert rules.patch_ids is None and rules.image_registers is None
    assert rules.refusal(text(), []) is None and rules.refusal(image(), []) is None
    assert rules.refusal(text(), [(0, 3)]) == ("messages", NO_IMAGE_INPUTS)
    assert rules.per_code_refusal() == PER_CODE_ONLY
    assert rules.refusal(image(per_code=True), []) == ("per_code", PER_CODE_ONLY)
    field, message = rules.refusal(image(source_span=list(SPAN), source_codes=[1, 2, 3, 4]), [])
    assert field == "source_codes" and "LaViDa-O checkpoints only" in message


def test_lavida_o_rules_check_packed_positions_source_codes_and_image_inputs():
    config = lavida_config()
    rules = LaViDaORules(config)
    ids = PatchIds.of(config)
    assert rules.patch_ids == ids and rules.image_registers == (config.registers("image"), True)
    assert rules.per_code_refusal() is None and rules.refusal(image(per_code=True), []) is None
    packed = ids.pack(torch.zeros(1, 4, dtype=torch.long)).tolist()
    assert rules.refusal(image(init_canvas=[-1, *packed, -1, -1]), []) is None
    assert rules.refusal(image(init_canvas=[-1, 5, -1, -1]), [])[0] == "init_canvas"
    assert rules.refusal(image(token_range=[0, CODES]), [])[0] == "token_range"
    good = [1] * 4 * (SPAN[1] - SPAN[0])
    assert rules.refusal(image(source_span=list(SPAN), source_codes=good), []) is None
    field, message = rules.refusal(image(source_span=list(SPAN), source_codes=good[:4]), [])
    assert field == "source_codes" and "4 codes per source position (16), got 4" in message
    field, message = rules.refusal(image(source_span=list(SPAN), source_codes=[CODES] * len(good)), [])
    assert field == "source_codes" and f"< {ids.codebook}" in message
    unpublished = LaViDaORules(lavida_config(gen_enc_add_pos_emb=True))
    assert unpublished.refusal(image(source_span=list(SPAN), source_codes=good), []) == ("source_codes",
                                                                                          EDITS_UNPUBLISHED)
    # image inputs: refused without a vision tower (this config has none), before any other check
    assert rules.refusal(image(per_code=True), [(0, 3)]) == ("messages", NO_IMAGE_INPUTS)
    one_code = LaViDaORules(lavida_config(downsample=False))  # one code per position: no per-code sampler
    assert one_code.per_code_refusal() == PER_CODE_ONLY
    assert one_code.refusal(image(per_code=True), []) == ("per_code", PER_CODE_ONLY)


def test_lavida_o_with_a_tower_takes_image_inputs_on_chats_and_edits_only():
    tower = UnderstandingConfig(
        mm_vision_tower="google/siglip-so400m-patch14-384", mm_hidden_size=24,
        image_grid_pinpoints=((30, 60), (60, 30), (60, 60)), mm_resampler_type="spatial_pool",
        mm_spatial_pool_mode="conv", mm_spatial_pool_stride=2,
        vision=VisionTowerConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=30, patch_size=4))
    rules = LaViDaORules(lavida_config(understanding=tower))
    good = [1] * 4 * (SPAN[1] - SPAN[0])
    assert rules.refusal(text(), [(0, 3)]) is None
    assert rules.refusal(image(), [(0, 3)])[0] == "messages"  # text-to-image takes no image input
    assert rules.refusal(image(source_span=list(SPAN), source_codes=good), [(0, 4)]) is None
    assert rules.refusal(image(source_span=list(SPAN), source_codes=good), [(0, 5)]) == (
        "source_span", "source_span overlaps the source image's understanding rows")
    assert rules.refusal(image(source_span=list(SPAN), source_codes=good), [(7, 3)])[0] == "source_span"


def test_request_rules_are_lavida_os_only_when_it_is_served_whole(tmp_path: Path):
    config = lavida_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert type(request_rules("LLaDAModelLM", tmp_path)) is RequestRules
    assert type(request_rules(LAVIDA_O, tmp_path)) is RequestRules  # no vqvae/: the text path
    (tmp_path / "vqvae").mkdir()
    (tmp_path / "vqvae" / "config.json").write_text(json.dumps({"num_vq_embeddings": CODES}))
    rules = request_rules(LAVIDA_O, tmp_path)
    assert isinstance(rules, LaViDaORules) and rules.patch_ids == PatchIds.of(config)
