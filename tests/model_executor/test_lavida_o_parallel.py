"""LaViDa-O under tensor parallelism: two real gloo ranks hold Megatron-style shards of both streams (text and image
`*_vision` weights) and reproduce the single-rank model's logits (fp32, <= 1e-5) and tokens: images (sparse with CFG,
a three-way edit, dense), an image question (the replicated SigLIP tower), the I2 oracle; both ranks bit for bit."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")  # write_tiny_checkpoint writes vqvae/

from sparse_lavida_vllm.diffusion.planners import image_plan, text_plan  # noqa: E402
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig  # noqa: E402
from sparse_lavida_vllm.drivers.lavida_o_image import (  # noqa: E402
    generate_image_dense,
    generate_image_sparse,
    image_step_causal_logits,
)
from sparse_lavida_vllm.drivers.text import SparseOptions  # noqa: E402
from sparse_lavida_vllm.drivers.understanding import generate_understanding  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_config import check_lavida_divisible  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_model import LaViDaOMDM, lavida_shard_dim  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_vision import IMAGE_TOKEN_INDEX, understanding_prompt  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import (  # noqa: E402
    load_lavida_o,
    random_lavida_o,
    write_tiny_checkpoint,
)
from sparse_lavida_vllm.model_executor.model import narrow_shard  # noqa: E402
from sparse_lavida_vllm.model_executor.parallel import SingleRank, TorchDistributedTP  # noqa: E402
from tests.model_executor.test_lavida_o_model import EDIT, IMG  # noqa: E402
from tests.model_executor.test_lavida_o_vision import config, picture  # noqa: E402
from tests.parallel_helpers import run_ranks  # noqa: E402

# two spawned gloo ranks per module (the `ranks` fixture): both gone, nothing left in /dev/shm
pytestmark = pytest.mark.usefixtures("module_leaves_nothing")

WORLD = 2
PROMPT = torch.tensor([5, 9, 17, 3, IMG, 22])
EDIT_PROMPT = torch.tensor([5, 9] + [EDIT] * 4 + [17, 3])
SOURCE = torch.randint(0, 16, (4, 4), generator=torch.Generator().manual_seed(2))  # 4 positions of 2x2 codes


def run_everything(model: LaViDaOMDM) -> dict:
    """Logits and tokens of real passes on one rank (or on the whole model)."""
    plan = image_plan(4, 4, 4, "shift", "stratified", 3.0, torch.Generator().manual_seed(0))
    out = {}
    cfg = generate_image_sparse(model, PROMPT, plan, SamplingConfig(temperature=1.0, seed=5, cfg_scale=2.0),
                                num_registers=3, suffix_ids=torch.tensor([1]))
    out["cfg"] = (cfg.patches, [s.logits for s in cfg.steps])
    edit = generate_image_sparse(model, EDIT_PROMPT, plan, SamplingConfig(temperature=1.0, seed=7, cfg_scale=1.0,
                                                                          image_cfg_scale=1.5),
                                 num_registers=3, source_rows=torch.arange(2, 6), source_codes=SOURCE)
    out["edit"] = (edit.patches, [s.logits for s in edit.steps])
    dense = generate_image_dense(model, PROMPT, plan, SamplingConfig(temperature=1.0, seed=9, cfg_scale=1.0))
    out["dense"] = (dense.patches, [])
    prompt = understanding_prompt(model, torch.tensor([3, IMAGE_TOKEN_INDEX, 4, 5]), [picture(50, 23, 3)])
    answer = generate_understanding(model, prompt, text_plan(8, 4, 4), SamplingConfig(temperature=0.8, seed=11),
                                    SparseOptions(num_registers=2))
    # the tower's rows (replicated) and the whole prompt's logits with them (sharded blocks)
    with torch.no_grad():
        logits = model(torch.zeros(prompt.ids.numel(), dtype=torch.long), torch.arange(prompt.ids.numel()),
                       text_embeds=prompt.embeds)
    out["understanding"] = (answer.tokens, [prompt.embeds, logits])
    patches = torch.randint(0, 16, (16, 4), generator=torch.Generator().manual_seed(4))
    clean, masked = [torch.tensor([0, 3, 9]), torch.tensor([5, 12])], [torch.tensor([1, 2, 4, 6, 15])]
    out["alg1"] = image_step_causal_logits(model, PROMPT, patches, clean, masked, num_registers=3)
    return out


def _collect(folder: str, tp: TorchDistributedTP) -> dict:
    """One rank's share of the comparison: its results, its shards, and the refusal of an indivisible shape."""
    model = load_lavida_o(folder, tp=tp)
    out = run_everything(model)
    out["tp"] = (tp.rank, tp.world_size, model.local_kv_heads)
    out["state"] = {n: p.detach().clone() for n, p in model.state_dict().items()}
    out["random"] = random_lavida_o(config(), seed=9, tp=tp).state_dict()
    try:
        LaViDaOMDM(replace(config(), mlp_hidden_size_gen=25), tp)
    except ValueError as e:
        out["error"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-rank run over a tiny checkpoint with a tower; each rank's results, and the single-rank model."""
    tmp = tmp_path_factory.mktemp("lavida-tp")
    write_tiny_checkpoint(tmp / "ck", config(), seed=1, std=0.2)
    return run_ranks(partial(_collect, str(tmp / "ck")), tmp, WORLD), load_lavida_o(tmp / "ck")


def test_two_ranks_reproduce_the_single_rank_images_and_answers(ranks):
    results, whole = ranks
    torch.set_num_threads(1)
    single = run_everything(whole)
    rank0 = results[0]
    for got, want in zip(rank0["alg1"], single["alg1"], strict=True):
        assert (got - want).abs().max().item() <= 1e-5
    for name in ("cfg", "edit", "dense", "understanding"):
        tokens, logits = rank0[name]
        assert torch.equal(tokens, single[name][0]), name
        for got, want in zip(logits, single[name][1], strict=True):
            assert (got - want).abs().max().item() <= 1e-5, name
        # the all-reduce leaves every rank with the same sums: both ranks sample the same tokens from the same seed
        assert torch.equal(results[1][name][0], tokens), name
        assert all(torch.equal(a, b) for a, b in zip(results[1][name][1], logits, strict=True)), name


def test_each_rank_holds_its_shard_of_both_streams(ranks):
    results, whole = ranks
    full = whole.state_dict()
    c = whole.config
    hd, b = c.head_dim, "model.transformer.blocks.0."
    sharded = {"q_proj": (0, c.n_heads * hd), "k_proj": (0, c.n_kv_heads * hd), "v_proj": (0, c.n_kv_heads * hd),
               "ff_proj": (0, c.mlp_hidden_size), "up_proj": (0, c.mlp_hidden_size), "attn_out": (1, c.d_model),
               "ff_out": (1, c.mlp_hidden_size), "q_proj_vision": (0, c.n_heads * hd),
               "k_proj_vision": (0, c.n_kv_heads * hd), "v_proj_vision": (0, c.n_kv_heads * hd),
               "ff_proj_vision": (0, c.mlp_hidden_size_gen), "up_proj_vision": (0, c.mlp_hidden_size_gen),
               "ff_out_vision": (1, c.mlp_hidden_size_gen)}
    for rank, out in enumerate(results):
        assert out["tp"] == (rank, WORLD, c.n_kv_heads // WORLD)
        state = out["state"]
        for leaf, (dim, size) in sharded.items():
            name = f"{b}{leaf}.weight"
            assert lavida_shard_dim(name) == dim and state[name].shape[dim] == size // WORLD, name
        for name, tensor in state.items():  # contiguous slices of the checkpoint; the rest replicated
            assert torch.equal(tensor, narrow_shard(name, full[name], lavida_shard_dim(name), rank, WORLD)), name
        replicated = [n for n in full if lavida_shard_dim(n) is None]
        assert any(n.startswith("model.vision_tower.") for n in replicated)
        assert {"model.gen_embedding.weight", "model.gen_predictor.weight", "model.transformer.ff_out.weight",
                "model.downsample_gen.downsample.conv.weight", "model.upsample_gen.upsample.conv.weight",
                b + "attn_norm_vision.weight", b + "ff_norm_vision.weight"} <= set(replicated)
        assert all(torch.equal(state[n], full[n]) for n in replicated)
    for name, tensor in full.items():  # the ranks' slices tile the checkpoint
        dim = lavida_shard_dim(name)
        if dim is not None:
            assert torch.equal(torch.cat([out["state"][name] for out in results], dim=dim), tensor)
    whole_random = random_lavida_o(config(), seed=9).state_dict()  # random_lavida_o(tp=): slices of the same draw
    for rank, out in enumerate(results):
        for name, tensor in out["random"].items():
            assert torch.equal(tensor, narrow_shard(name, whole_random[name], lavida_shard_dim(name), rank, WORLD))


def test_indivisible_shapes_name_the_field(ranks):
    results, _ = ranks
    assert "mlp_hidden_size_gen (25)" in results[0]["error"] and "world size (2)" in results[0]["error"]
    with pytest.raises(ValueError, match="n_heads"):
        check_lavida_divisible(config(), 3)
    check_lavida_divisible(config(), 2)
    model = random_lavida_o(config(), seed=2)
    assert isinstance(model.tp, SingleRank) and model.local_kv_heads == model.config.n_kv_heads
    assert lavida_shard_dim("model.transformer.ff_out.weight") is None  # the LM head, not a block's ff_out
    assert lavida_shard_dim("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") is None
