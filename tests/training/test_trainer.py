"""The trainer: its batched mask is Algorithm 1, and one step of each kind lowers the loss on a fixed batch."""

from __future__ import annotations

import pytest
import torch

from sparse_lavida_vllm.diffusion.masks import step_causal_mask, step_causal_spans
from sparse_lavida_vllm.model_executor.attention import SpanAttention
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import random_model
from sparse_lavida_vllm.training.data import Example
from sparse_lavida_vllm.training.trainer import (
    BatchedMaskAttention,
    TrainConfig,
    batch_loss,
    collate,
    pack_dense,
    pack_sparse,
    random_split,
)

CONFIG = MDMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=96,
                   mask_token_id=3, register_token_id=4, eos_token_id=2, pad_token_id=0, num_registers=4)


def examples(n: int, seed: int = 0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, length = 3 + i % 4, 12 + 3 * (i % 3)
        out.append(Example("t2i", torch.randint(5, 64, (p,), generator=gen),
                           torch.randint(5, 64, (length,), generator=gen)))
    return out


def test_sparse_pack_mask_is_algorithm_1() -> None:
    gen = torch.Generator().manual_seed(0)
    seen_blocks = set()
    for ex in examples(12):
        packed = pack_sparse(ex, CONFIG, gen, num_registers=3, prompt_drop=0.0)
        m, n = packed.num_clean_blocks, packed.num_masked_blocks
        blocks = packed.blocks
        seen_blocks.add((m, n))
        p = ex.prompt.numel()
        assert bool((blocks[:p] == 0).all()) and bool((blocks[p:] > 0).all())
        is_mask = packed.ids == CONFIG.mask_token_id
        is_reg = packed.ids == CONFIG.register_token_id
        assert bool((blocks[is_mask | is_reg] > m).all()) and bool((blocks[p:][~(is_mask | is_reg)[p:]] <= m).all())
        assert int(is_reg.sum()) == 3 * n  # one register set per masked block
        assert torch.equal(packed.mask, step_causal_mask(blocks, m, n))
        # the batched form carries the same mask, pads excluded
        _, _, mask, _, _, _ = collate([packed, pack_dense(ex, CONFIG, gen, prompt_drop=0.0)], CONFIG.pad_token_id)
        t = packed.ids.numel()
        assert torch.equal(mask[0, :t, :t], step_causal_mask(blocks, m, n)) and not bool(mask[0, :t, t:].any())
    assert len(seen_blocks) > 3  # M and N really vary


def test_batched_attention_matches_per_sample_span_attention() -> None:
    model = random_model(CONFIG, seed=1, std=0.1)
    gen = torch.Generator().manual_seed(1)
    samples = [pack_sparse(ex, CONFIG, gen, num_registers=2, prompt_drop=0.0) for ex in examples(3)]
    ids, positions, mask, rows, _, _ = collate(samples, CONFIG.pad_token_id)
    batched = model(ids, positions, BatchedMaskAttention(mask), rows)
    n = mask.shape[1]
    offset = 0
    for i, s in enumerate(samples):
        spans = step_causal_spans(s.blocks, s.num_clean_blocks)  # the core backend as the reference
        single = model(s.ids, s.positions, SpanAttention(spans), s.loss_rows)
        k = s.loss_rows.numel()
        torch.testing.assert_close(batched[offset:offset + k], single, atol=1e-5, rtol=1e-5)
        assert bool((rows[offset:offset + k] // n == i).all())
        offset += k


def test_random_split_covers_positions() -> None:
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(20)
    parts = random_split(pos, 4, gen)
    assert len(parts) == 4 and all(p.numel() for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, pos)
    with pytest.raises(ValueError, match="parts"):
        random_split(pos, 21, gen)


@pytest.mark.parametrize("mode", ["dense", "sparse", "sparse_full"])
def test_one_step_reduces_loss_on_fixed_batch(mode: str) -> None:
    torch.manual_seed(0)
    model = random_model(CONFIG, seed=0, std=0.05).train()
    gen = torch.Generator().manual_seed(3)
    exs = examples(8)
    if mode == "dense":
        samples = [pack_dense(ex, CONFIG, gen, prompt_drop=0.0) for ex in exs]
    else:
        samples = [pack_sparse(ex, CONFIG, gen, 4, step_causal=mode == "sparse", prompt_drop=0.0) for ex in exs]
    if mode == "sparse":
        assert any(s.mask is not None and not bool(s.mask.all()) for s in samples)
    else:
        assert all(s.mask is None for s in samples)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = batch_loss(model, samples, CONFIG.pad_token_id)
    opt.zero_grad()
    before.backward()
    opt.step()
    after = batch_loss(model, samples, CONFIG.pad_token_id)
    assert float(after) < float(before) - 1e-3


def test_each_text_batch_is_one_canvas_and_shrinks_as_it_grows() -> None:
    """A text batch draws one canvas from TRAIN_GEN_LENGTHS (every canvas the server builds for max_tokens 4..64)
    for all its rows: 128 rows up to 16 tokens, 64 at 32, 32 at 64; image batches keep batch_size rows."""
    import random

    from sparse_lavida_vllm.training.data import DEMO_ROOT, TRAIN_GEN_LENGTHS, DemoData, text_prompt
    from sparse_lavida_vllm.training.tokenizer import load_tokenizer
    from sparse_lavida_vllm.training.trainer import demo_model_config, make_batch, text_batch_rows

    data = DemoData(load_tokenizer(DEMO_ROOT / "dense"))
    cfg = TrainConfig(mode="dense")
    config = demo_model_config(data.tok.get_vocab_size())
    prompt_len = data.encode_text(text_prompt("37+48=?")).numel()  # every question is 2-digit padded: one length
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    rows_at: dict[int, int] = {}
    for _ in range(200):
        task, batch = make_batch(cfg, data, config, rng, gen)
        lengths = {p.ids.numel() - (prompt_len if task == "text" else 0) for p in batch}
        if task != "text":
            assert len(batch) == cfg.batch_size
            continue
        assert len(lengths) == 1, lengths  # one canvas per batch: no padding
        canvas = lengths.pop()
        assert canvas in TRAIN_GEN_LENGTHS and len(batch) == text_batch_rows(cfg, canvas)
        rows_at[canvas] = len(batch)
        if len(rows_at) == len(TRAIN_GEN_LENGTHS):
            break
    assert rows_at == {4: 128, 8: 128, 16: 128, 32: 64, 64: 32}


def test_train_config_names_bad_field() -> None:
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="causal")
    with pytest.raises(ValueError, match="num_registers"):
        TrainConfig(num_registers=-1)


def _shipped(kind: str) -> tuple[TrainConfig, list[dict], str | None]:
    """A shipped run's config, loss log and init: the dense run from scratch (its stage 1 when the recipe has
    stages) or the sparse SFT (from dense)."""
    import json

    from sparse_lavida_vllm.training.data import DEMO_ROOT

    folder = DEMO_ROOT / kind
    staged = kind == "dense" and (folder / "train_summary_stage1.json").exists()
    summary_name, log_name = (("train_summary_stage1.json", "train_log_stage1.jsonl") if staged else
                              ("train_summary.json", "train_log.jsonl"))
    summary = json.loads((folder / summary_name).read_text())
    tc = summary["train_config"]
    log = [json.loads(line) for line in (folder / log_name).read_text().splitlines()]
    init = str(DEMO_ROOT / "dense") if kind == "sparse" else None
    return TrainConfig(**{**tc, "task_weights": tuple(tc["task_weights"])}), log, init


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_recipe_reproduces_the_shipped_loss_log(kind: str, tmp_path) -> None:
    # The recipe's first steps, re-run from the shipped tokenizer (and, for sparse, the shipped dense init), give
    # the logged losses: the data order, masks and init are seeded; stop_at keeps the run's lr schedule.
    from dataclasses import replace

    from sparse_lavida_vllm.training.data import DEMO_ROOT
    from sparse_lavida_vllm.training.trainer import train

    torch.set_num_threads(1)
    cfg, log, init = _shipped(kind)
    steps = 4
    train(replace(cfg, stop_at=steps), tmp_path / kind, tokenizer_folder=DEMO_ROOT / "dense", init=init,
          progress=False)
    import json

    fresh = [json.loads(line) for line in (tmp_path / kind / "train_log.jsonl").read_text().splitlines()]
    assert [r["task"] for r in fresh] == [r["task"] for r in log[:steps]]
    for new, old in zip(fresh, log[:steps], strict=True):
        assert new["loss"] == pytest.approx(old["loss"], abs=2e-4), (new, old)


def test_recipe_is_deterministic_given_the_tokenizer(tmp_path) -> None:
    from safetensors.torch import load_file

    from sparse_lavida_vllm.training.data import DEMO_ROOT
    from sparse_lavida_vllm.training.trainer import train

    torch.set_num_threads(1)
    cfg = TrainConfig(mode="dense", steps=2, batch_size=2, warmup=1)
    for run in ("a", "b"):
        train(cfg, tmp_path / run, tokenizer_folder=DEMO_ROOT / "dense", progress=False)
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (DEMO_ROOT / "dense" / "tokenizer.json").read_text()


def test_tokenizer_is_built_deterministically_from_the_corpus() -> None:
    from sparse_lavida_vllm.training.data import DEMO_ROOT, tokenizer_corpus
    from sparse_lavida_vllm.training.tokenizer import load_tokenizer, train_tokenizer

    built = train_tokenizer(tokenizer_corpus())
    shipped = load_tokenizer(DEMO_ROOT / "dense")
    assert built.get_vocab() == shipped.get_vocab()
    text = "Q: 37+48=? A: a thick handwritten digit seven slanted right make it thicker"
    assert built.encode(text).ids == shipped.encode(text).ids
    assert len(built.encode("a thin handwritten digit seven").ids) == 5  # one piece per word


@pytest.mark.parametrize(("argv", "field"), [
    (["train", "sparse", "--init", "unused", "--out", "unused", "--max-clean-blocks", "0"], "max_clean_blocks"),
    (["train", "dense", "--out", "unused", "--task-weights", "1,1"], "task_weights"),
    (["train", "dense", "--out", "unused", "--task-weights", "a,b,c"], "task_weights"),
    (["eval", "unused", "--num-images", "-1"], "num_images"),
])
def test_cli_names_the_bad_flag(argv: list[str], field: str) -> None:
    # a bad training or eval flag ends the command with one line naming the field, before any model is loaded
    from sparse_lavida_vllm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert field in str(exc.value) and str(exc.value).startswith("sparse-lavida ")
