"""Image previews (ImageParams.preview_steps) in a real engine: each snapshot is the reference sampler's canvas after
that step, the final image is the one a request without previews gets, and a bad knob names the field."""

import pytest
import torch

from sparse_lavida_vllm.diffusion.planners import image_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.weights import load_pretrained
from sparse_lavida_vllm.scheduler.params import DiffusionParamError, parse_params
from tests.serving_helpers import TINY, engine_scheduler, set_vllm_env, shared_llm

set_vllm_env()

PROMPT = [5, 6, 7, 8, 9, 10, 11]
CODEBOOK = (100, 116)
INPAINT = [-1 if i % 3 else 120 for i in range(16)]
L = 16  # a 4x4 canvas


def knobs(case: dict) -> dict:
    return {"kind": "image", "height": 4, "width": 4, "steps": 4, "num_registers": 3, "token_range": list(CODEBOOK),
            **case}


def params(case: dict, seed: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=L, temperature=1.0, seed=seed, extra_args=knobs(case), detokenize=False)


def reference_canvases(folder, case: dict, seed: int) -> list[list[int]]:
    """The reference sampler's canvas after every step (mask where not decoded yet); the last one is the image."""
    model, mask = load_pretrained(folder), TINY.mask_token_id
    init = torch.tensor(case["init_canvas"]) if "init_canvas" in case else None
    plan = image_plan(4, 4, 4, "shift", "stratified", 5.0, torch.Generator().manual_seed(seed),
                      None if init is None else init == -1)
    sampling = SamplingConfig(temperature=1.0, seed=seed, cfg_scale=case["guidance_scale"], token_range=CODEBOOK)
    response = None if init is None else torch.where(init == -1, torch.tensor(mask), init)
    if case["sparse"]:
        result = generate_sparse(model, torch.tensor(PROMPT), plan, sampling, SparseOptions(3), response_init=response)
    else:
        result = generate_dense(model, torch.tensor(PROMPT), plan, sampling, response_init=response)
    canvas = torch.full((L,), mask) if response is None else response.clone()
    canvases = []
    for step in result.steps:
        canvas[step.chosen] = result.tokens[step.chosen]
        canvases.append(canvas.tolist())
    assert canvases[-1] == result.tokens.tolist()
    return canvases


@pytest.mark.parametrize("case", [dict(sparse=True, guidance_scale=0.0), dict(sparse=False, guidance_scale=2.0),
                                  dict(sparse=True, guidance_scale=1.0, init_canvas=INPAINT)])
def test_previews_are_the_reference_canvases_and_leave_the_image_unchanged(case):
    llm, folder = shared_llm()
    sched = engine_scheduler(llm)
    previews = [0, 2]
    seed = 21
    with_previews, without = llm.generate([{"prompt_token_ids": PROMPT}] * 2,
                                          [params({**case, "preview_steps": previews}, seed), params(case, seed)],
                                          use_tqdm=False)
    ids = list(with_previews.outputs[0].token_ids)  # cumulative: every snapshot, then the image
    assert len(ids) == (len(previews) + 1) * L
    frames = [ids[i * L:(i + 1) * L] for i in range(len(previews) + 1)]
    expected = reference_canvases(folder, case, seed)
    assert frames == [expected[s] for s in previews] + [expected[-1]]
    assert frames[-1] == list(without.outputs[0].token_ids)  # previews never change the sampling
    assert with_previews.outputs[0].finish_reason == "length"
    metrics = with_previews.kv_transfer_params["sparse_lavida_metrics"]
    assert metrics["output_tokens"] == L  # the snapshots are not the request's output tokens
    assert sched.num_free_blocks() == sched.num_blocks_total


class _Params:
    """The SamplingParams fields parse_params reads."""

    def __init__(self, extra: dict) -> None:
        self.extra_args, self.temperature, self.top_k, self.top_p, self.seed = extra, 1.0, 0, 1.0, 1


@pytest.mark.parametrize("value", [[3], [-1], [1, 0], [1, 1], "0", [True], [0.5]])
def test_bad_preview_steps_name_the_field(value):
    with pytest.raises(DiffusionParamError) as err:
        parse_params(_Params({"kind": "image", "height": 4, "width": 4, "steps": 4, "preview_steps": value}), 7, 128,
                     4)
    assert err.value.field == "preview_steps"


def test_good_preview_steps_are_kept():
    extra = {"kind": "image", "height": 4, "width": 4, "steps": 4, "preview_steps": [0, 1, 2]}
    assert parse_params(_Params(extra), 7, 128, 4).preview_steps == (0, 1, 2)
    assert parse_params(_Params({**extra, "preview_steps": []}), 7, 128, 4).preview_steps == ()
