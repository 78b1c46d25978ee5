"""LaViDa-O requests exactly as the publishers build them, checked against an independent reading of their code
written here (adobe-research/LaVida-O: llava/eval/predict_t2i_edit.py `text_to_image`, llava/conversation.py
`conv_templates["llada"]`, llava/mm_utils.py `tokenizer_image_token`, llava/eval/pmj.py, the `shift` schedule of
llava/model/language_model/llada/generate.py, llava/eval/1024_eval*.yaml), on a tiny checkpoint in the published
layout with LLaDA-8B-Instruct's tokenizer files (its chat template, BOS, `<|eot_id|>`, reserved tokens)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from transformers import AutoTokenizer  # noqa: E402

from sparse_lavida_vllm.diffusion.planners import (  # noqa: E402
    code_slots,
    image_plan,
    pmj_code_order,
    publishers_code_plan,
    publishers_counts,
)
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig  # noqa: E402
from sparse_lavida_vllm.drivers.lavida_o_image import generate_image_dense  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_vision import edit_understanding  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import load_lavida_o, write_tiny_checkpoint  # noqa: E402
from sparse_lavida_vllm.model_executor.patch_ids import codes_to_patches  # noqa: E402
from sparse_lavida_vllm.multimodal.lavida_o_layout import LaViDaOLayout  # noqa: E402
from tests.entrypoints.test_lavida_o_serving import sparse_lavida_config  # noqa: E402
from tests.serving_helpers import BOS, EOS, EOT, MASK, save_llada_instruct_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# ids of the tiny LLaDA-Instruct tokenizer: reserved tokens k sit at BOS + k (serving_helpers)
GEN, ENC = BOS + 5, BOS + 6  # <|reserved_token_5|> (126089 published), <|reserved_token_6|> (126090)
SIZE = (32, 32)  # 8x8 codes, 4x4 positions
THEIR_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                "the user provides, and assist the user with a variety of tasks using natural language.")


def their_ids(tok, question: str, n_positions: int) -> list[int]:
    """conv_templates['llada'] with the user question and the assistant's `<|reserved_token_5|>` x n, rendered by
    the tokenizer's chat template with the generation prompt, then tokenizer_image_token (-200 per `<image>`)."""
    messages = [{"role": "system", "content": THEIR_SYSTEM}, {"role": "user", "content": question},
                {"role": "assistant", "content": "<|reserved_token_5|>" * n_positions}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chunks = [tok(c).input_ids for c in text.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == tok.bos_token_id else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        ids += ([-200] if i else []) + chunk[offset:]
    return ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("published") / "lavida-o"
    config = sparse_lavida_config(mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, image_token_id=GEN,
                                  edit_image_token_id=ENC, register_token_id=None, num_register_tokens=(),
                                  num_register_groups=(), register_code=None, block_causal=False)
    write_tiny_checkpoint(root, config, seed=0, std=0.3)
    save_llada_instruct_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def tok(folder):
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def layout(folder, tok) -> LaViDaOLayout:
    return LaViDaOLayout.load(folder, tok)


def test_text_to_image_prompt_is_theirs_token_for_token(layout, tok):
    caption = "a red cube on a table"
    micro = "ORIGINAL WIDTH : 32; ORIGINAL HEIGHT : 32; TOP : 0; LEFT : 0; SCORE : 7.110;"  # 1024_eval.yaml's SCORE
    theirs = their_ids(tok, f"Generate an image with the caption:\n {caption} {micro}", 16)
    prompt = layout.t2i_prompt(caption, SIZE)
    assert prompt + [GEN] * 16 + list(layout.suffix) == theirs  # the canvas holds the 16 positions
    assert theirs.count(EOT) == 3 and theirs[0] == BOS and theirs.count(BOS) == 1  # predict_t2i_edit's assert
    assert tok.decode(layout.suffix) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.decode(prompt).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_uncond_branch_masks_through_the_user_turn_only(layout, tok):
    """predict_t2i_edit: is_prompt[:, :is_eot[1] + 1] become the mask embedding; the assistant header stays."""
    prompt = layout.t2i_prompt("a red cube", SIZE)
    theirs = their_ids(tok, "x", 1)  # any request: the cut is the user turn's <|eot_id|>, the second one
    cut = [i for i, t in enumerate(prompt) if t == EOT][1] + 1
    assert [t for t in theirs if t == EOT][:2] == [EOT, EOT]
    uncond = layout.uncond_ids(prompt)
    assert uncond == [MASK] * cut + prompt[cut:]
    assert tok.decode(uncond[cut:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _source(seed: int = 3):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_edit_prompt_is_theirs_with_the_token_after_image_dropped(layout, tok, folder):
    """The edit's user turn is `<image> ` + the source placeholders + "\\n " + the instruction (no micro-conditioning);
    tokenizer_image_token drops the first token after `<image>` (the space) because the rendering starts with BOS."""
    source = _source()
    patches = layout.encode(source, SIZE)
    edit = layout.edit_prompt("make it blue", patches, source)
    theirs = their_ids(tok, f"<image> {'<|reserved_token_6|>' * 16}\n make it blue ", 16)
    assert edit.reference_ids() + [GEN] * 16 + list(layout.suffix) == theirs
    image_at = theirs.index(-200)
    assert theirs[image_at + 1] == ENC  # no space between the SigLIP rows and the VQ rows
    # the expanded prompt (SigLIP rows spliced in, as the model sees it): the source span and the uncond cut
    model = load_lavida_o(folder)
    ids, (rows, _) = edit_understanding(model, torch.tensor(edit.reference_ids()), edit.image)
    assert ids.numel() == edit.num_prompt_tokens
    start, end = edit.source_span
    assert ids[start:end].tolist() == [ENC] * 16 and rows.tolist() == list(range(image_at, image_at + edit.image_rows))
    uncond = layout.uncond_ids(edit)
    cut = [i for i, t in enumerate(ids.tolist()) if t == EOT][1] + 1
    assert len(uncond) == edit.num_prompt_tokens and uncond == [MASK] * cut + ids[cut:].tolist()


def test_image_only_branch_masks_everything_but_the_source(layout):
    """edit_mode 0: inputs_embeds_uncond_enc[~is_gen_enc] = mask: every prompt row but the source's VQ rows, and the
    text after the image too; the scheduler's companions (ImageParams.branches) say the same."""
    from vllm import SamplingParams

    from sparse_lavida_vllm.scheduler.image_params import parse_image_params

    source = _source()
    edit = layout.edit_prompt("make it blue", layout.encode(source, SIZE), source)
    extra = layout.request_args(SIZE, source_span=edit.source_span, source_codes=edit.source_codes,
                                uncond_prompt_ids=layout.uncond_ids(edit))
    params = parse_image_params(SamplingParams(temperature=0.8, seed=1, extra_args=extra), extra,
                                edit.num_prompt_tokens, 4096, 0, default_sparse=False)  # plain LaViDa-O: dense
    prompt = list(range(1000, 1000 + edit.num_prompt_tokens))  # stands for the expanded prompt
    (cond, cond_suffix), (uncond, uncond_suffix), (image_only, image_suffix) = params.branches(prompt, MASK)
    start, end = edit.source_span
    assert cond == prompt and uncond == layout.uncond_ids(edit) and uncond_suffix == cond_suffix == list(layout.suffix)
    assert image_only == [t if start <= i < end else MASK for i, t in enumerate(prompt)]
    assert image_suffix == [MASK] * len(layout.suffix)


def test_default_knobs_are_their_eval_yamls(layout):
    """1024_eval.yaml (guidance 4, 64 steps, shift 5, temperature 0.8, stratified) and 1024_eval_edit.yaml
    (guidance 1.2, image guidance 1.4) for a request that names none; steps are capped by the positions."""
    t2i = layout.request_args((1024, 1024))
    assert (t2i["guidance_scale"], t2i["steps"], t2i["shift"], t2i["schedule"], t2i["order"]) == \
        (4.0, 64, 5.0, "shift", "stratified")
    assert layout.defaults["temperature"] == 0.8 and "image_guidance_scale" not in t2i
    edit = layout.request_args((1024, 1024), source_span=(3, 5), source_codes=[0] * 8)
    assert (edit["guidance_scale"], edit["image_guidance_scale"], edit["steps"]) == (1.2, 1.4, 64)
    assert layout.request_args(SIZE)["steps"] == 16
    assert layout.request_args(SIZE, guidance_scale=0.0, steps=4)["guidance_scale"] == 0.0  # per request


# ---- their sampler's plan: the PMJ order and the shift schedule, per VQ code --------------------------------------

def their_pmj(n: int, seed: int) -> list[int]:
    """llava/eval/pmj.py stratified_random(n, seed, shuffle_blocks=True), read and written again here."""
    rng = random.Random(seed)
    occupied = [[False] * n for _ in range(n)]
    seq, blocks, size = [], [(0, 0, n)], n
    while size > 1:
        half = size // 2
        children = []
        for x0, y0, _ in blocks:
            children += [(x0, y0, half), (x0 + half, y0, half), (x0, y0 + half, half), (x0 + half, y0 + half, half)]
        rng.shuffle(children)
        for x0, y0, s in children:
            if not any(occupied[y][x] for y in range(y0, y0 + s) for x in range(x0, x0 + s)):
                x, y = rng.randrange(x0, x0 + s), rng.randrange(y0, y0 + s)
                occupied[y][x] = True
                seq.append(y * n + x)
        blocks, size = children, half
    rest = [y * n + x for y in range(n) for x in range(n) if not occupied[y][x]]
    rng.shuffle(rest)
    return seq + rest


def their_counts(total: int, steps: int, shift: float) -> list[int]:
    """get_num_transfer_tokens_sch(mask, steps, schedule='shift', schedule_kwargs={'shift': shift})[0]."""
    steps = int(min(steps, total))
    t = torch.linspace(0, 1, steps + 1)
    sigmas = shift * t / (1 + (shift - 1) * t)
    sample = (sigmas * torch.tensor([total])).to(torch.int64)
    sample = torch.clamp(sample[1:] - sample[:-1], 1, None)
    delta, j = int(sample.sum()) - total, 0
    while delta > 0:
        j = j % len(sample)
        if sample[j] == 1:
            j += 1
            continue
        delta -= 1
        sample[j] -= 1
        j += 1
    return sample.flip(-1).tolist()


def test_their_stratified_shift_plan_for_64_steps_on_a_64x64_code_grid():
    plan = publishers_code_plan(64, 64, shift=5.0)
    order, counts = their_pmj(64, 42), their_counts(4096, 64, 5.0)
    assert pmj_code_order(64) == order
    assert [len(s.positions) for s in plan.stages] == counts == publishers_counts(4096, 64, 5.0)
    assert torch.cat([s.positions for s in plan.stages]).tolist() == order
    assert counts[0] == 13 and counts[-1] == 301 and sum(counts) == 4096 and plan.num_steps == 64
    for side, steps, shift in ((8, 16, 5.0), (16, 20, 3.0), (32, 64, 5.0), (4, 100, 1.0)):
        assert publishers_counts(side * side, steps, shift) == their_counts(side * side, steps, shift)
        assert pmj_code_order(side, 7) == their_pmj(side, 7)


def test_unseeded_plans_do_not_touch_the_global_rng():
    torch.manual_seed(1)
    a = image_plan(8, 8, 8, generator=None)
    torch.manual_seed(2)
    b = image_plan(8, 8, 8, generator=None)
    assert [s.positions.tolist() for s in a.stages] == [s.positions.tolist() for s in b.stages]


def test_code_slots_follow_codes_to_patches():
    codes = torch.arange(64)
    position, slot = code_slots(codes, 8)
    patches = codes_to_patches(codes, 8, 8)
    assert all(int(patches[p, s]) == c for c, p, s in zip(codes.tolist(), position.tolist(), slot.tolist()))


def test_per_code_driver_commits_only_its_codes_and_equals_the_position_driver_on_whole_patches(folder, layout):
    """generate_image_dense(code_width=...): a plan whose steps hold whole 2x2 patches gives the position driver's
    image (greedy); the publishers' plan leaves patches partly decoded between steps and fills every code."""
    model = load_lavida_o(folder)
    prompt = torch.tensor(layout.t2i_prompt("a red cube", SIZE))
    suffix = torch.tensor(layout.suffix)
    greedy = SamplingConfig(temperature=0.0, seed=3, cfg_scale=4.0)
    uncond = torch.tensor(layout.uncond_ids(prompt.tolist()))
    by_position = image_plan(4, 4, 4, "shift", "raster", 5.0)
    patch_codes = torch.tensor([0, 1, 8, 9])  # a position's codes on the 8-wide code grid, row-major in the patch
    whole = type(by_position)(64, tuple(
        type(s)(torch.cat([16 * (p // 4) + 2 * (p % 4) + patch_codes for p in s.positions]), (4 * len(s.positions),))
        for s in by_position.stages))
    a = generate_image_dense(model, prompt, by_position, greedy, suffix, uncond_prompt_ids=uncond)
    b = generate_image_dense(model, prompt, whole, greedy, suffix, uncond_prompt_ids=uncond, code_width=8)
    assert torch.equal(a.patches, b.patches)
    theirs = publishers_code_plan(8, 16, 5.0)
    c = generate_image_dense(model, prompt, theirs, greedy, suffix, uncond_prompt_ids=uncond, code_width=8)
    assert bool((c.patches < model.config.num_vq_embeddings).all())  # every code decoded, none left masked
    first = code_slots(theirs.stages[0].positions, 8)[0]
    assert c.steps[0].decode.tolist() == sorted(set(first.tolist()))  # logits only where this step's codes sit
    assert len(c.steps) == 16


# ---- through the engine: a prompt-only request gets the publishers' prompt, branches, sampler and knobs -----------

def _generate_image(folder: Path, out: Path, *args: str) -> None:
    import os
    import subprocess
    import sys

    from tests.serving_helpers import VLLM_ENV

    run = subprocess.run([sys.executable, "-m", "sparse_lavida_vllm.cli", "generate-image", *args, "--model",
                          str(folder), "--size", "32x32", "--seed", "4", "--dtype", "float32", "--max-model-len", "512",
                          "-o", str(out), "--quiet"], env={**os.environ, **VLLM_ENV}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def _same_picture(path: Path, expected) -> None:
    import numpy as np
    from PIL import Image

    got = np.asarray(Image.open(path), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1  # same codes, decoded in another process


@pytest.mark.slow
def test_prompt_only_requests_run_the_publishers_sampler_through_the_engine(folder, layout, tmp_path):
    """`sparse-lavida generate-image` with no knobs on a plain LaViDa-O checkpoint (dense by default): their prompt,
    their uncond branch, their per-code stratified plan with the shift schedule, guidance 4, 64 steps (capped at the
    16 positions), temperature 0.8; an edit: guidance 1.2 and image guidance 1.4 with the SigLIP copy. The PNGs are
    the per-code PyTorch driver's canvases, decoded."""
    model = load_lavida_o(folder)
    suffix = torch.tensor(layout.suffix)
    caption = "a yellow square"
    _generate_image(folder, tmp_path / "t2i.png", caption)
    prompt = layout.t2i_prompt(caption, SIZE)
    t2i = generate_image_dense(model, torch.tensor(prompt), publishers_code_plan(8, 16, 5.0),
                               SamplingConfig(temperature=0.8, seed=4, cfg_scale=4.0), suffix,
                               uncond_prompt_ids=torch.tensor(layout.uncond_ids(prompt)), code_width=8)
    _same_picture(tmp_path / "t2i.png", layout.decode(layout.patch_ids.pack(t2i.patches), SIZE))

    source = _source()
    source.save(tmp_path / "source.png")
    _generate_image(folder, tmp_path / "edit.png", "make it blue", "--image", str(tmp_path / "source.png"))
    edit = layout.edit_prompt("make it blue", layout.encode(source, SIZE), source)
    ids, understanding = edit_understanding(model, torch.tensor(edit.reference_ids()), edit.image)
    start, end = edit.source_span
    edited = generate_image_dense(model, ids, publishers_code_plan(8, 16, 5.0),
                                  SamplingConfig(temperature=0.8, seed=4, cfg_scale=1.2, image_cfg_scale=1.4), suffix,
                                  torch.arange(start, end), layout.encode(source, SIZE), understanding,
                                  uncond_prompt_ids=torch.tensor(layout.uncond_ids(edit)), code_width=8)
    _same_picture(tmp_path / "edit.png", layout.decode(layout.patch_ids.pack(edited.patches), SIZE))
