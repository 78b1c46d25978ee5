"""Orders, schedules, text blocks and confidence policies."""

import pytest
import torch

from sparse_lavida_vllm.diffusion.planners import (
    choose_tokens,
    image_plan,
    stratified_order,
    text_plan,
    token_counts,
)


@pytest.mark.parametrize("side", [1, 2, 4, 8, 32])
def test_stratified_prefixes_cover_every_cell_once(side):
    order = stratified_order(side, side, torch.Generator().manual_seed(side))
    assert sorted(order.tolist()) == list(range(side * side))
    rows, cols = order // side, order % side
    j = 0
    while 4 ** j <= side * side:
        cell = side >> j
        prefix = slice(0, 4 ** j)
        cells = (rows[prefix] // cell) * (side // cell) + cols[prefix] // cell
        assert sorted(cells.tolist()) == list(range(4 ** j)), f"level {j}"
        j += 1


def test_stratified_order_is_seeded():
    a = stratified_order(8, 8, torch.Generator().manual_seed(1))
    b = stratified_order(8, 8, torch.Generator().manual_seed(1))
    c = stratified_order(8, 8, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "shift"])
@pytest.mark.parametrize("length,steps", [(16, 16), (100, 7), (1024, 64), (4096, 64), (5, 1)])
def test_counts_sum_to_length_and_are_positive(schedule, length, steps):
    counts = token_counts(length, steps, schedule)
    assert len(counts) == steps and sum(counts) == length and min(counts) >= 1


def test_shift_schedule_matches_lavida_o_counts():
    counts = token_counts(4096, 64, "shift", shift=5.0)  # anchors: 13 at the first step, 301 at the last
    assert counts[0] == 13 and counts[-1] == 301
    assert counts == sorted(counts) or counts[-1] > counts[0]


@pytest.mark.parametrize("order", ["stratified", "random", "raster"])
def test_image_plan_covers_each_position_once(order):
    plan = image_plan(8, 8, 10, "cosine", order, generator=torch.Generator().manual_seed(0))
    positions = torch.cat([s.positions for s in plan.stages])
    assert sorted(positions.tolist()) == list(range(64))
    assert plan.num_steps == 10 and all(s.counts == (len(s.positions),) for s in plan.stages)


def test_text_plan_blocks_and_infilling_order():
    plan = text_plan(32, 8, 8)
    assert [s.positions.tolist() for s in plan.stages] == [list(range(b, b + 8)) for b in range(0, 32, 8)]
    assert all(s.counts == (4, 4) for s in plan.stages)
    masked = torch.zeros(32, dtype=torch.bool)
    masked[[3, 4, 20, 21, 22]] = True
    plan = text_plan(32, 8, 8, block_order=[2, 0, 3, 1], masked=masked)
    assert [s.positions.tolist() for s in plan.stages] == [[20, 21, 22], [3, 4]]
    assert [s.counts for s in plan.stages] == [(2, 1), (1, 1)]


@pytest.mark.parametrize("call,field", [
    (lambda: token_counts(10, 0), "steps"),
    (lambda: token_counts(10, 11), "steps"),
    (lambda: text_plan(30, 8, 4), "block_length"),
    (lambda: text_plan(32, 8, 6), "steps"),
    (lambda: text_plan(32, 8, 64), "steps"),
    (lambda: text_plan(32, 8, 4, block_order=[0, 0, 1, 2]), "block_order"),
    (lambda: stratified_order(4, 8), "square"),
    (lambda: stratified_order(6, 6), "height"),
    (lambda: image_plan(4, 4, 4, schedule="exp"), "schedule"),
    (lambda: image_plan(4, 4, 4, order="spiral"), "order"),
    (lambda: choose_tokens("greedy", torch.ones(3), 1), "remasking"),
])
def test_invalid_parameters_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_policies():
    conf = torch.tensor([0.1, 0.95, 0.5, 0.97])
    assert sorted(choose_tokens("low_confidence", conf, 2).tolist()) == [1, 3]
    assert sorted(choose_tokens("threshold", conf, 1, threshold=0.9).tolist()) == [1, 3]
    assert choose_tokens("threshold", conf, 1, threshold=0.99).tolist() == [3]  # at least one
    picked = choose_tokens("random", conf, 3, generator=torch.Generator().manual_seed(0))
    assert len(set(picked.tolist())) == 3
