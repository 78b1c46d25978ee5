"""Image requests in a real engine: I4 with CFG companions, one batch for n images, I5 for both branches, validation."""

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
SPAN = (1, 4)  # "source image" tokens of the edit cases
CODEBOOK = (100, 116)
INPAINT = [-1 if i % 3 else 120 for i in range(16)]  # keep every third token, repaint the rest

# (name, request knobs): guided and unguided, sparse and dense, an interval, a three-way edit, inpainting
CASES = [
    ("plain", dict(sparse=True, guidance_scale=0.0)),
    ("cfg", dict(sparse=True, guidance_scale=2.0)),
    ("cfg_dense", dict(sparse=False, guidance_scale=2.0)),
    ("cfg_interval", dict(sparse=True, guidance_scale=2.0, guidance_interval=[0.25, 0.75])),
    ("edit_3way", dict(sparse=True, guidance_scale=1.0, image_guidance_scale=1.5, source_span=list(SPAN))),
    ("inpaint", dict(sparse=True, guidance_scale=1.0, init_canvas=INPAINT)),
    ("inpaint_dense", dict(sparse=False, guidance_scale=1.0, init_canvas=INPAINT)),
    ("cosine_temp", dict(sparse=True, guidance_scale=1.0, temperature_schedule="cosine", min_temperature=0.5,
                         schedule="cosine", order="random")),
]


def knobs(case: dict) -> dict:
    return {"kind": "image", "height": 4, "width": 4, "steps": 4, "num_registers": 3, "token_range": list(CODEBOOK),
            **case}


def params(case: dict, seed: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=16, temperature=1.0, seed=seed, extra_args=knobs(case), detokenize=False)


def reference(folder, case: dict, seed: int) -> list[int]:
    """The reference sampler's image for the same request (I4's oracle), every branch built independently."""
    model, mask = load_pretrained(folder), TINY.mask_token_id
    sampling = SamplingConfig(temperature=1.0, seed=seed, cfg_scale=case["guidance_scale"],
                              image_cfg_scale=case.get("image_guidance_scale", 0.0),
                              cfg_interval=tuple(case.get("guidance_interval", (0.0, 1.0))), token_range=CODEBOOK,
                              temperature_schedule=case.get("temperature_schedule", "constant"),
                              min_temperature=case.get("min_temperature", 0.0))
    init = torch.tensor(case["init_canvas"]) if "init_canvas" in case else None
    plan = image_plan(4, 4, 4, case.get("schedule", "shift"), case.get("order", "stratified"), 5.0,
                      torch.Generator().manual_seed(seed), None if init is None else init == -1)
    response = None if init is None else torch.where(init == -1, torch.tensor(mask), init)
    image_only = None
    if "source_span" in case:
        image_only = torch.tensor([t if SPAN[0] <= i < SPAN[1] else mask for i, t in enumerate(PROMPT)])
    prompt = torch.tensor(PROMPT)
    if case["sparse"]:
        result = generate_sparse(model, prompt, plan, sampling, SparseOptions(3), response_init=response,
                                 image_only_prompt_ids=image_only)
    else:
        result = generate_dense(model, prompt, plan, sampling, response_init=response,
                                image_only_prompt_ids=image_only)
    return result.tokens.tolist()


def test_i4_images_with_cfg_companions_equal_the_reference_in_one_batch():
    llm, folder = shared_llm()
    sched = engine_scheduler(llm)
    sched.batch_sizes.clear()
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * len(CASES),
                        [params(case, seed) for seed, (_, case) in enumerate(CASES)], use_tqdm=False)
    for seed, ((name, case), out) in enumerate(zip(CASES, outs)):
        assert list(out.outputs[0].token_ids) == reference(folder, case, seed), name
        assert out.outputs[0].finish_reason == "length"
    # all eight (and their companions) shared every engine step; the pool is small, so some may queue
    assert max(sched.batch_sizes) >= 4
    inpainted = outs[[n for n, _ in CASES].index("inpaint")].outputs[0].token_ids
    assert all(inpainted[i] == 120 for i in range(16) if INPAINT[i] != -1)  # never a given token changed
    assert sched.num_free_blocks() == sched.num_blocks_total  # I5: every branch's blocks came back


def test_n_images_run_as_one_batch_and_equal_separate_seeded_requests():
    llm, folder = shared_llm()
    sched = engine_scheduler(llm)
    case = dict(CASES[1][1])
    sched.batch_sizes.clear()
    together = llm.generate([{"prompt_token_ids": PROMPT}] * 4, [params(case, 40 + i) for i in range(4)],
                            use_tqdm=False)
    assert sched.batch_sizes[0] == 4  # four requests (+ four uncond companions) in each engine step
    for i, out in enumerate(together):
        alone = llm.generate([{"prompt_token_ids": PROMPT}], [params(case, 40 + i)], use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == list(alone.outputs[0].token_ids) == reference(folder, case, 40 + i)


def test_aborting_a_guided_request_frees_both_branches():
    from vllm.inputs import TokensPrompt

    llm, _ = shared_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    edit = dict(CASES[4][1])
    for i in range(3):
        engine.add_request(f"g{i}", TokensPrompt(prompt_token_ids=PROMPT), params(edit, i))
    engine.step()
    engine.step()
    companions = [b.kv.request_id for s in sched.states.values() for b in s.branches[1:]]
    assert len(companions) == 6  # uncond + image-only per request, each with blocks of its own
    assert all(sched.kv_cache_manager.get_block_ids(c)[0] for c in companions)
    engine.abort_request(["g0", "g2"])
    while engine.has_unfinished_requests():
        engine.step()
    assert not sched.states and not sched.running
    assert sched.num_free_blocks() == sched.num_blocks_total  # I5 for requests and companions


class _Params:
    """The SamplingParams fields parse_params reads."""

    def __init__(self, extra: dict, **fields) -> None:
        self.extra_args, self.temperature, self.top_k, self.top_p, self.seed = extra, 1.0, 0, 1.0, 1
        for k, v in fields.items():
            setattr(self, k, v)


@pytest.mark.parametrize("extra, field", [
    ({"height": 0, "width": 4}, "height"),
    ({"height": 4, "width": True}, "width"),
    ({"height": 64, "width": 64}, "size"),
    ({"height": 4, "width": 4, "steps": 17}, "steps"),
    ({"height": 4, "width": 4, "steps": float("inf")}, "steps"),
    ({"height": 3, "width": 3}, "order"),  # stratified needs a power-of-two square
    ({"height": 4, "width": 4, "schedule": "zigzag"}, "schedule"),
    ({"height": 4, "width": 4, "guidance_scale": float("nan")}, "guidance_scale"),
    ({"height": 4, "width": 4, "image_guidance_scale": 1.0}, "image_guidance_scale"),  # no source image
    ({"height": 4, "width": 4, "guidance_interval": [0.9, 0.1]}, "guidance_interval"),
    ({"height": 4, "width": 4, "init_canvas": [1, 2]}, "init_canvas"),
    ({"height": 4, "width": 4, "init_canvas": [7] * 16}, "mask"),  # nothing to generate
    ({"height": 4, "width": 4, "uncond_prompt_ids": [1]}, "uncond_prompt_ids"),
    ({"height": 4, "width": 4, "source_span": [3, 99]}, "source_span"),
    ({"height": 4, "width": 4, "token_range": [9, 2]}, "token_range"),
    ({"height": 4, "width": 4, "block_length": 4}, "block_length"),  # a text knob on an image request
    ({"height": 4, "width": 4, "min_temperature": 2.0}, "min_temperature"),
])
def test_image_params_name_the_bad_field(extra, field):
    with pytest.raises(DiffusionParamError) as err:
        parse_params(_Params({"kind": "image", **extra}), 7, 128, 4)
    assert err.value.field == field


def test_unknown_kind_is_refused():
    with pytest.raises(DiffusionParamError) as err:
        parse_params(_Params({"kind": "video"}, max_tokens=4), 3, 128, 4)
    assert err.value.field == "kind"


def test_source_codes_are_refused_off_lavida_o():
    """LaViDa-O's source_codes knob on another checkpoint would be silently ignored: the request fails instead."""
    llm, _ = shared_llm()
    sched = engine_scheduler(llm)
    case = dict(sparse=True, guidance_scale=0.0, source_span=list(SPAN), source_codes=[1, 2, 3])
    out = llm.generate([{"prompt_token_ids": PROMPT}], [params(case, 0)], use_tqdm=False)[0]
    assert out.outputs[0].finish_reason not in ("length", "stop") and not out.outputs[0].token_ids
    assert sched.num_free_blocks() == sched.num_blocks_total
