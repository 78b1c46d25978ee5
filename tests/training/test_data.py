"""Demo data: captions follow the pixels, edits are deterministic, held-out sums never reach training."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sparse_lavida_vllm.training.data import (
    DIGIT_WORDS,
    EDITS,
    SIDE,
    TEXT_GEN_LENGTH,
    TRAIN_GEN_LENGTHS,
    DemoData,
    apply_edit,
    arithmetic_problem,
    captions,
    edit_followed,
    final_number,
    is_held_out,
    load_digit_images,
    tokenizer_corpus,
)
from sparse_lavida_vllm.training.tokenizer import IMAGE_TOKEN_OFFSET, SPECIAL_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def data() -> DemoData:
    return DemoData(train_tokenizer(tokenizer_corpus(num_sums=500)))


def test_digits_are_8x8_with_16_levels() -> None:
    levels, labels = load_digit_images()
    assert levels.shape == (1797, SIDE, SIDE) == (1797, 8, 8) and levels.min() == 0 and levels.max() == 15
    assert sorted(set(labels.tolist())) == list(range(10))


def test_captions_name_the_digit_and_style() -> None:
    levels, labels = load_digit_images()
    caps = captions(levels[:200], labels[:200])
    assert all(DIGIT_WORDS[y] in c.split() for c, y in zip(caps, labels[:200]))
    assert any("thick" in c for c in caps) and any("thin" in c for c in caps)
    assert any("slanted" in c for c in caps)


def test_edits_are_deterministic_and_change_the_image() -> None:
    levels, _ = load_digit_images()
    src = levels[0]
    for instruction in EDITS:
        out = apply_edit(src, instruction)
        assert out.shape == src.shape and np.array_equal(out, apply_edit(src, instruction))
        assert not np.array_equal(out, src)
    assert np.array_equal(apply_edit(apply_edit(src, "invert the colours"), "invert the colours"), src)
    with pytest.raises(ValueError, match="instruction"):
        apply_edit(src, "rotate it")


def test_edit_followed_means_nearest_to_the_requested_target() -> None:
    levels, _ = load_digit_images()
    for src in levels[:20]:
        for instruction in EDITS:
            target = apply_edit(src, instruction)
            assert edit_followed(src, target, instruction)
            assert not edit_followed(src, src, instruction)  # doing nothing is not following
            others = [e for e in EDITS if not np.array_equal(apply_edit(src, e), target)]
            assert not edit_followed(src, apply_edit(src, others[0]), instruction)  # another edit is not this one
        noisy = np.clip(apply_edit(src, "shift it left") + (np.arange(64).reshape(8, 8) % 3 == 0), 0, 15)
        assert edit_followed(src, noisy, "shift it left")  # a few pixels off is still the edit


def test_held_out_sums_are_disjoint_from_training() -> None:
    rng = random.Random(0)
    train = {arithmetic_problem(rng)[0] for _ in range(3000)}
    held = {arithmetic_problem(rng, held_out=True)[0] for _ in range(300)}
    assert train.isdisjoint(held)
    q, r, answer = arithmetic_problem(random.Random(5))
    terms = tuple(int(x) for x in q.rstrip("=?").split("+"))
    assert not is_held_out(terms) and sum(terms) == answer and final_number(r) == str(answer)
    assert is_held_out((37, 48))  # the README's question is never trained on


def test_held_out_sums_are_about_ten_percent_and_leave_every_digit_pair_in_training() -> None:
    # The eval tests addition, not an unseen input: every (units, units) and (tens, tens) digit pair, with and
    # without a carry, occurs among the training sums.
    pairs = [(a, b) for a in range(100) for b in range(100)]
    held = [p for p in pairs if is_held_out(p)]
    assert 0.08 < len(held) / len(pairs) < 0.12
    train = [p for p in pairs if not is_held_out(p)]
    assert {(a % 10, b % 10) for a, b in train} == {(x, y) for x in range(10) for y in range(10)}
    assert {(a // 10, b // 10, a % 10 + b % 10 >= 10) for a, b in train} == {
        (x, y, c) for x in range(10) for y in range(10) for c in (False, True)}


def test_operands_are_two_digit_tokens_and_answers_right_aligned(data: DemoData) -> None:
    tokens = data.tok.encode("Q: 4+85=? A:").tokens
    assert tokens[tokens.index("+") - 2:tokens.index("+")] == ["0", "4"]  # the normalizer pads lone digits
    assert data.tok.encode("Q: 100+5=? A:").tokens[3:6] == ["1", "0", "0"]
    for answer in ("7", "85", "185"):
        ids = data.answer_ids(answer, TEXT_GEN_LENGTH)
        assert data.tok.id_to_token(int(ids[3])) == answer[-1]  # units digit always at canvas position 3
        assert data.tok.decode(ids.tolist()).strip() == answer
    with pytest.raises(ValueError, match="gen_length"):
        data.answer_ids("1000", TEXT_GEN_LENGTH)


@pytest.mark.parametrize("gen_length", TRAIN_GEN_LENGTHS)
def test_a_training_answer_fills_its_canvas_then_eos(data: DemoData, gen_length: int) -> None:
    """'▁' + the answer right-aligned in 3 places, then [EOS] to the canvas: none on the 4-token canvas (the
    server's max_tokens 4), which the answer fills exactly."""
    rng = random.Random(gen_length)
    for _ in range(20):
        text = data.sample("text", rng, gen_length=gen_length)
        ids = text.response.tolist()
        assert len(ids) == gen_length and ids[4:] == [data.eos] * (gen_length - 4) and data.eos not in ids[:4]
        assert data.tok.decode(ids[:4]).strip() == str(text.label)
    assert data.answer_ids("185", 4).tolist() == [data.tok.token_to_id(t) for t in ("▁", "1", "8", "5")]
    with pytest.raises(ValueError, match="gen_length"):
        data.answer_ids("185", 3)


def test_examples_have_fixed_shapes(data: DemoData) -> None:
    rng = random.Random(0)
    t2i, edit, text = (data.sample(t, rng) for t in ("t2i", "edit", "text"))
    assert t2i.response.shape == (SIDE * SIDE,) and int(t2i.response.min()) >= IMAGE_TOKEN_OFFSET
    assert edit.prompt.numel() > SIDE * SIDE and edit.response.shape == (SIDE * SIDE,)
    assert text.response.numel() in TRAIN_GEN_LENGTHS
    held = data.sample("text", rng, split="test")
    assert held.response.shape == (TEXT_GEN_LENGTH,)
    body = text.response[text.response != data.eos].tolist()
    assert final_number(data.tok.decode(body)) == str(text.label)
    assert [data.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
