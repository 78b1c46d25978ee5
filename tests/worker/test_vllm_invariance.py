"""The choice of vLLM's own batch-invariant mode: the invariant runner on CUDA; never on CPU (MKL tile check)."""

import os

import pytest

from sparse_lavida_vllm.worker.worker import VLLM_BATCH_INVARIANT, enable_vllm_invariance, wants_vllm_invariance


def test_vllm_invariant_mode_serves_the_invariant_runner_on_cuda_only(monkeypatch):
    monkeypatch.setenv(VLLM_BATCH_INVARIANT, "0")  # recorded, so the test's own setting is undone after it
    monkeypatch.delenv(VLLM_BATCH_INVARIANT)
    assert wants_vllm_invariance(None, "cuda") and wants_vllm_invariance({"batch_invariant": True}, "cuda")
    assert not wants_vllm_invariance({"batch_invariant": False}, "cuda")
    assert not wants_vllm_invariance({"flat_batch": True}, "cuda")
    assert not wants_vllm_invariance({}, "cpu")  # the CPU path keeps its MKL tile check
    assert not enable_vllm_invariance({}, "cpu") and VLLM_BATCH_INVARIANT not in os.environ
    assert not enable_vllm_invariance({"batch_invariant": False}, "cuda") and VLLM_BATCH_INVARIANT not in os.environ
    assert enable_vllm_invariance({}, "cuda") and os.environ[VLLM_BATCH_INVARIANT] == "1"
    with pytest.raises(ValueError, match="batch_invariant"):
        wants_vllm_invariance({"batch_invariant": "false"}, "cuda")
