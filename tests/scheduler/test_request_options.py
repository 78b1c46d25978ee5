"""Standard request fields through a real engine: metrics, min_tokens, n > 1, allowed ids, logit bias, refusals."""

import torch

from sparse_lavida_vllm.diffusion.planners import text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.weights import load_pretrained
from sparse_lavida_vllm.scheduler.output import METRICS_KEY
from tests.serving_helpers import reference_tokens, set_vllm_env, shared_llm

set_vllm_env()

PROMPT = [40, 72, 69, 76, 76, 79, 12]


def generate(llm, params):
    from vllm.inputs import TokensPrompt

    return llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)[0]


def test_metrics_ride_on_the_final_output_and_equal_the_reference_row_counts():
    from prometheus_client import REGISTRY
    from vllm import SamplingParams

    llm, folder = shared_llm()
    model = load_pretrained(folder)
    plan = text_plan(16, 8, 8)
    sampling = SamplingConfig()
    for sparse in (True, False):
        knobs = dict(gen_length=16, block_length=8, steps=8, num_registers=3, sparse=sparse)
        before = REGISTRY.get_sample_value("sparse_lavida:forward_tokens_total",
                                           {"mode": "sparse" if sparse else "dense"}) or 0.0
        out = generate(llm, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, extra_args=knobs))
        metrics = out.kv_transfer_params[METRICS_KEY]
        if sparse:
            ref = generate_sparse(model, torch.tensor(PROMPT), plan, sampling, SparseOptions(num_registers=3))
        else:
            ref = generate_dense(model, torch.tensor(PROMPT), plan, sampling)
        assert metrics["mode"] == ("sparse" if sparse else "dense")
        assert metrics["steps"] == 8 and metrics["output_tokens"] == 16
        assert metrics["forward_tokens"] == ref.forward_tokens
        assert metrics["dense_forward_tokens"] == 8 * (len(PROMPT) + 16)
        assert metrics["num_registers"] == (3 if sparse else 0)
        # the same numbers reach the Prometheus counters the server's /metrics shows
        after = REGISTRY.get_sample_value("sparse_lavida:forward_tokens_total", {"mode": metrics["mode"]})
        assert after - before == metrics["forward_tokens"]
    assert REGISTRY.get_sample_value("sparse_lavida:steps_total", {"mode": "sparse"}) >= 8


def test_min_tokens_bans_stop_tokens_before_it():
    from vllm import SamplingParams

    llm, folder = shared_llm()
    knobs = dict(gen_length=24, block_length=8, steps=12, num_registers=2)
    ref = reference_tokens(folder, PROMPT, 24, 8, 12, 2)
    stop = ref[9]
    first = ref.index(stop)
    plain = generate(llm, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop],
                                         extra_args=knobs)).outputs[0]
    assert len(plain.token_ids) == first + 1  # without min_tokens the text ends at the stop token
    min_tokens = first + 2
    out = generate(llm, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop],
                                       min_tokens=min_tokens, extra_args=knobs)).outputs[0]
    tokens = list(out.token_ids)
    assert len(tokens) >= min_tokens
    assert stop not in tokens[:min_tokens]
    assert out.finish_reason == ("stop" if tokens[-1] == stop else "length")


def test_n_choices_differ_without_a_seed_and_follow_seed_plus_index_with_one():
    from vllm import SamplingParams

    llm, folder = shared_llm()
    knobs = dict(gen_length=16, block_length=8, steps=8, num_registers=2)
    unseeded = generate(llm, SamplingParams(n=2, max_tokens=16, temperature=1.0, ignore_eos=True, extra_args=knobs))
    a, b = (list(c.token_ids) for c in unseeded.outputs)
    assert a != b  # each child draws its own seed (before: both used seed 0 and were identical)
    seeded = generate(llm, SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=7, ignore_eos=True,
                                          extra_args=knobs))
    for choice in seeded.outputs:  # vLLM gives child i the seed 7 + i
        assert list(choice.token_ids) == reference_tokens(folder, PROMPT, 16, 8, 8, 2, temperature=1.0,
                                                          seed=7 + choice.index)


def test_allowed_token_ids_and_logit_bias_steer_every_decoded_token():
    from vllm import SamplingParams

    llm, _ = shared_llm()
    knobs = dict(gen_length=16, block_length=8, steps=8, num_registers=2)
    allowed = [65, 66, 67]
    out = generate(llm, SamplingParams(max_tokens=16, temperature=1.0, seed=1, ignore_eos=True,
                                       allowed_token_ids=allowed, extra_args=knobs)).outputs[0]
    assert len(out.token_ids) == 16 and set(out.token_ids) <= set(allowed)
    out = generate(llm, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logit_bias={70: 100.0},
                                       extra_args=knobs)).outputs[0]
    assert list(out.token_ids) == [70] * 16


def test_penalties_are_refused_naming_the_field():
    import pytest
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm, _ = shared_llm()
    with pytest.raises(VLLMValidationError) as info:
        generate(llm, SamplingParams(max_tokens=8, repetition_penalty=1.3))
    assert info.value.parameter == "repetition_penalty"
