"""Algorithm 1, the inference step mask, and their span forms."""

import pytest
import torch

from sparse_lavida_vllm.diffusion.masks import (
    build_step_causal_sequence,
    inference_step_spans,
    spans_to_mask,
    step_causal_mask,
    step_causal_spans,
)


def test_fig8_training_mask_matches_the_paper():
    # Fig. 8b: P0 P1 P2 | X1 X3 | X0 | M2 M5 R3 | M4 R4 ; clean blocks C1, C2 (M=2), masked C3, C4 (N=2)
    blocks = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4])
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # P0
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # P1
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # P2
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # X1
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # X3
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # X0
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # M2
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # M5
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # R3
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1],  # M4
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1],  # R4
    ], dtype=torch.bool)
    assert torch.equal(step_causal_mask(blocks, 2, 2), expected)
    assert torch.equal(spans_to_mask(step_causal_spans(blocks, 2), len(blocks)), expected)


def test_fig8_inference_step_3_mask():
    # step 3 of process #1: cache = P0 P1 P2 X1 X3 (5); rows = X0 (commit), M2, M5, R
    mask = spans_to_mask(inference_step_spans(cache_len=5, num_rows=4, num_commit=1), 9)
    expected = torch.tensor([
        [1, 1, 1, 1, 1, 1, 0, 0, 0],  # X0 cannot see M2, M5, R
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("seed", range(5))
def test_spans_equal_algorithm1_on_random_sorted_blocks(seed):
    g = torch.Generator().manual_seed(seed)
    m, n = int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    blocks = torch.sort(torch.randint(0, m + n + 1, (40,), generator=g)).values
    assert torch.equal(spans_to_mask(step_causal_spans(blocks, m), 40), step_causal_mask(blocks, m, n))


def test_unsorted_blocks_rejected_for_spans_and_out_of_range_rejected():
    with pytest.raises(ValueError, match="sorted"):
        step_causal_spans(torch.tensor([0, 2, 1]), 1)
    with pytest.raises(ValueError, match="blocks"):
        step_causal_mask(torch.tensor([0, 5]), 1, 1)
    with pytest.raises(ValueError, match="num_commit"):
        inference_step_spans(0, 3, 4)


def test_build_sequence_mask_is_algorithm1_with_registers_per_masked_block():
    prompt = torch.tensor([5, 6, 7])
    response = torch.arange(10, 16)
    seq = build_step_causal_sequence(prompt, response, [torch.tensor([1, 3]), torch.tensor([0])],
                                     [torch.tensor([2, 5]), torch.tensor([4])], num_registers=1,
                                     mask_token_id=99, register_token_id=98)
    assert seq["ids"].tolist() == [5, 6, 7, 11, 13, 10, 99, 99, 98, 99, 98]
    assert seq["positions"].tolist() == [0, 1, 2, 4, 6, 3, 5, 8, 9, 7, 9]  # registers at P+L = 9
    assert seq["blocks"].tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4]
    assert [r.tolist() for r in seq["masked_rows"]] == [[6, 7], [9]]
    assert torch.equal(spans_to_mask(seq["spans"], 11), step_causal_mask(seq["blocks"], 2, 2))
