"""Tensor parallelism: two real gloo ranks hold Megatron-style shards and reproduce the single-rank model."""

from functools import partial

import pytest
import torch

from sparse_lavida_vllm.diffusion.planners import text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_sparse, step_causal_logits
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM, check_divisible, shard_dim, shard_weight
from sparse_lavida_vllm.model_executor.parallel import SingleRank, TorchDistributedTP
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model, save_pretrained
from tests.parallel_helpers import run_ranks

# two spawned gloo ranks per module (the `ranks` fixture): both gone, nothing left in /dev/shm
pytestmark = pytest.mark.usefixtures("module_leaves_nothing")

# GQA (4 query heads read 2 K/V heads) so each of the 2 ranks holds 2 query heads and 1 K/V head
CONFIG = MDMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128,
                   mask_token_id=62, register_token_id=63, eos_token_id=1)
WORLD = 2
PROMPT = torch.tensor([5, 9, 17, 3, 40, 22])
RESPONSE = torch.tensor([7, 8, 11, 30, 31, 12, 44, 50])
CLEAN = [torch.tensor([0, 3]), torch.tensor([5])]  # C_1, C_2 of an Algorithm 1 sequence
MASKED = [torch.tensor([1, 2, 4, 6, 7])]  # the masked block D_3
CASES = {"greedy": SamplingConfig(seed=0),
         "sampled": SamplingConfig(temperature=0.8, top_k=20, seed=3)}


def run_everything(model: LLaDAMDM) -> dict:
    """What the comparison needs from one rank (or from the whole model): logits and tokens of real passes."""
    out = {"alg1": step_causal_logits(model, PROMPT, RESPONSE, CLEAN, MASKED, num_registers=2)}
    for name, sampling in CASES.items():
        result = generate_sparse(model, PROMPT, text_plan(16, 8, 8), sampling, SparseOptions(num_registers=2),
                                 record_logits=True)
        out[name] = (result.tokens, [s.logits for s in result.steps])
    return out


def _collect(folder: str, tp: TorchDistributedTP) -> dict:
    """One rank's share of the comparison: its results, its shards, and the refusal of an indivisible shape."""
    model = load_pretrained(folder, tp=tp)
    out = run_everything(model)
    out["tp"] = (tp.rank, tp.world_size, model.local_kv_heads)
    out["shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out["state"] = {n: p.detach().clone() for n, p in model.state_dict().items()}
    out["random"] = random_model(CONFIG, seed=9, tp=tp).state_dict()
    try:
        LLaDAMDM(MDMConfig(n_heads=3, n_kv_heads=3, d_model=96), tp)
    except ValueError as e:
        out["error"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-rank run over a saved random checkpoint; each rank's results, and the single-rank model."""
    tmp = tmp_path_factory.mktemp("tp")
    save_pretrained(random_model(CONFIG, seed=1, std=0.1), tmp / "ck")
    return run_ranks(partial(_collect, str(tmp / "ck")), tmp, WORLD), load_pretrained(tmp / "ck")


def test_two_ranks_reproduce_the_single_rank_logits_and_tokens(ranks):
    results, whole = ranks
    single = run_everything(whole)
    rank0 = results[0]
    for got, want in zip(rank0["alg1"], single["alg1"], strict=True):
        assert (got - want).abs().max().item() <= 1e-5
    for name in CASES:
        tokens, logits = rank0[name]
        assert torch.equal(tokens, single[name][0]), name
        for got, want in zip(logits, single[name][1], strict=True):
            assert (got - want).abs().max().item() <= 1e-5
    # every rank ends the all-reduce with the same sums, so all of them decode the same tokens
    for name in CASES:
        assert torch.equal(results[1][name][0], rank0[name][0])
        assert all(torch.equal(a, b) for a, b in zip(results[1][name][1], rank0[name][1], strict=True))


def test_each_rank_holds_its_megatron_shard(ranks):
    results, whole = ranks
    full = whole.state_dict()
    hd = CONFIG.head_dim
    for rank, out in enumerate(results):
        assert out["tp"] == (rank, WORLD, CONFIG.n_kv_heads // WORLD)
        shapes = out["shapes"]
        b = "model.transformer.blocks.0."
        assert shapes[b + "q_proj.weight"] == (CONFIG.n_heads // WORLD * hd, CONFIG.d_model)
        assert shapes[b + "k_proj.weight"] == (CONFIG.n_kv_heads // WORLD * hd, CONFIG.d_model)
        assert shapes[b + "v_proj.weight"] == (CONFIG.n_kv_heads // WORLD * hd, CONFIG.d_model)
        assert shapes[b + "attn_out.weight"] == (CONFIG.d_model, CONFIG.n_heads // WORLD * hd)
        assert shapes[b + "ff_proj.weight"] == (CONFIG.mlp_hidden_size // WORLD, CONFIG.d_model)
        assert shapes[b + "up_proj.weight"] == (CONFIG.mlp_hidden_size // WORLD, CONFIG.d_model)
        assert shapes[b + "ff_out.weight"] == (CONFIG.d_model, CONFIG.mlp_hidden_size // WORLD)
        for name in ("model.transformer.wte.weight", "model.transformer.ln_f.weight",
                     "model.transformer.ff_out.weight", b + "attn_norm.weight"):
            assert shapes[name] == tuple(full[name].shape)  # replicated
        # the shards are the contiguous slices of the checkpoint, and the ranks' slices tile it
        for name, tensor in out["state"].items():
            assert torch.equal(tensor, shard_weight(name, full[name], rank, WORLD))
    for name, tensor in full.items():
        dim = shard_dim(name)
        if dim is not None:
            assert torch.equal(torch.cat([out["state"][name] for out in results], dim=dim), tensor)
    # random_model(tp=...) gives each rank its slice of the same seeded weights
    whole_random = random_model(CONFIG, seed=9).state_dict()
    for rank, out in enumerate(results):
        for name, tensor in out["random"].items():
            assert torch.equal(tensor, shard_weight(name, whole_random[name], rank, WORLD))


def test_indivisible_shapes_name_the_field(ranks):
    results, _ = ranks
    assert "n_heads (3)" in results[0]["error"] and "world size (2)" in results[0]["error"]
    with pytest.raises(ValueError, match="n_kv_heads"):
        check_divisible(MDMConfig(n_heads=4, n_kv_heads=1), 2)
    with pytest.raises(ValueError, match="mlp_hidden_size"):
        check_divisible(MDMConfig(mlp_hidden_size=250), 4)
    check_divisible(CONFIG, 2)


def test_single_rank_is_the_default_and_leaves_the_model_whole():
    model = random_model(CONFIG, seed=2)
    assert isinstance(model.tp, SingleRank) and model.local_kv_heads == CONFIG.n_kv_heads
    full = torch.randn(CONFIG.n_heads * CONFIG.head_dim, CONFIG.d_model)
    assert shard_weight("model.transformer.blocks.0.q_proj.weight", full, 0, 1) is full
    assert shard_dim("model.transformer.ff_out.weight") is None  # the LM head, not the block's ff_out
    assert shard_dim("model.transformer.blocks.1.ff_out.weight") == 1
