"""The LLaDA-architecture model: config checks, logits rows, GQA, and the checkpoint round trip."""

import json

import pytest
import torch

from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model, read_state_dict, save_pretrained

CONFIG = MDMConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                   mask_token_id=78, register_token_id=79)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = random_model(CONFIG, seed=1, std=0.1)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["SparseLLaDAModelLM"]
    loaded = load_pretrained(tmp_path)
    ids, pos = torch.randint(0, 78, (12,)), torch.arange(12)
    assert torch.equal(model(ids, pos), loaded(ids, pos))
    assert loaded.config == CONFIG


def test_parameter_names_follow_llada():
    names = set(random_model(CONFIG).state_dict())
    for name in ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
                 "model.transformer.blocks.1.q_proj.weight", "model.transformer.blocks.0.attn_out.weight",
                 "model.transformer.blocks.0.ff_proj.weight", "model.transformer.blocks.0.up_proj.weight",
                 "model.transformer.blocks.0.ff_out.weight", "model.transformer.blocks.0.attn_norm.weight"]:
        assert name in names


def test_logits_rows_select_rows_and_positions_matter():
    model = random_model(CONFIG, seed=2, std=0.1)
    ids, pos = torch.randint(0, 78, (10,)), torch.arange(10)
    full = model(ids, pos)
    rows = torch.tensor([7, 2])
    assert torch.allclose(model(ids, pos, logits_rows=rows), full[rows], atol=1e-6)
    assert torch.allclose(model(ids, pos + 3), full, atol=1e-4)  # RoPE is relative: a common shift is free
    swapped = pos.clone()
    swapped[[0, 9]] = swapped[[9, 0]]
    assert not torch.allclose(model(ids, swapped), full, atol=1e-3)  # but each row's own position matters
    perm = torch.randperm(10)
    assert torch.allclose(model(ids[perm], pos[perm]), full[perm], atol=1e-5)  # row order is free


def test_sharded_checkpoint_and_mismatch_errors(tmp_path):
    model = random_model(CONFIG, seed=3)
    save_pretrained(model, tmp_path)
    state = read_state_dict(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    from safetensors.torch import save_file
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:5]}, str(tmp_path / "a.safetensors"))
    save_file({k: state[k] for k in keys[5:]}, str(tmp_path / "b.safetensors"))
    index = {"weight_map": {k: ("a.safetensors" if i < 5 else "b.safetensors") for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.randint(0, 78, (6,))
    assert torch.equal(load_pretrained(tmp_path)(ids, torch.arange(6)), model(ids, torch.arange(6)))
    save_file({k: state[k] for k in keys[:5]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs,field", [
    ({"d_model": 65}, "d_model"), ({"n_kv_heads": 3}, "n_heads"), ({"mask_token_id": 999}, "mask_token_id"),
    ({"num_registers": -1}, "num_registers"), ({"n_layers": 0}, "n_layers"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MDMConfig(**{**CONFIG.__dict__, **kwargs})
