"""Evaluation of the demo model: digit-GenEval / digit-FID, style words, edit score, arithmetic exact match."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sparse_lavida_vllm.diffusion.planners import image_plan, text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import GenerateResult, SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.training.data import (
    EDITS,
    SIDE,
    TEXT_GEN_LENGTH,
    DemoData,
    apply_edit,
    edit_followed,
    final_number,
    ink_and_slant,
)
from sparse_lavida_vllm.training.tokenizer import IMAGE_TOKEN_OFFSET, NUM_LEVELS

if TYPE_CHECKING:
    from sparse_lavida_vllm.scheduler.params import DiffusionParams

SAMPLERS = ("dense", "sparse")
# max_tokens of the by-length arithmetic eval: every canvas the server builds for max_tokens 4..64 at its defaults
# (one block of 4, 8, 16 or 32 tokens, or two of 32)
ARITHMETIC_LENGTHS = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class EvalConfig:
    """What to sample and how; the defaults are the settings recorded in the model cards."""

    sampler: str = "sparse"
    num_registers: int | None = None  # None: the checkpoint's config.num_registers
    num_images: int = 120  # 8x8 images are cheap; at 60 the seed spread (~0.035) was too wide to rank SFT probes
    num_edits: int = 30  # 6 of each edit instruction
    num_text: int = 200  # sums are cheap (8 steps of ~20 rows): a tight spread for the 0.95 target
    num_text_per_length: int = 100  # held-out sums at each ARITHMETIC_LENGTHS canvas, the server's default plan
    image_steps: int = 16
    image_temperature: float = 0.8
    cfg_scale: float = 3.0  # the demo config's image default: +0.1 digit-GenEval over 1.0 in a probe
    text_block_length: int = 8
    text_steps: int = 8  # one token per step over the 8-token canvas
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("num_images", "num_edits", "num_text", "num_text_per_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_registers is not None and self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")


class DigitClassifier:
    """An MLP trained on the real (quantized) training digits; its hidden layer gives FID features."""

    def __init__(self, data: DemoData, seed: int = 0) -> None:
        from sklearn.neural_network import MLPClassifier

        x = self.prepare(data.levels)
        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=seed)
        self.mlp.fit(x[data.train_idx], data.labels[data.train_idx])
        self.held_out_accuracy = float(self.mlp.score(x[data.test_idx], data.labels[data.test_idx]))
        self.real_features = self.features(data.levels[data.test_idx])

    @staticmethod
    def prepare(levels: np.ndarray) -> np.ndarray:
        return np.asarray(levels, dtype=np.float64).reshape(len(levels), -1) / (NUM_LEVELS - 1)

    def predict(self, levels: np.ndarray) -> np.ndarray:
        return self.mlp.predict(self.prepare(levels))

    def features(self, levels: np.ndarray) -> np.ndarray:
        h = self.prepare(levels) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0]
        return np.maximum(h, 0)


@lru_cache(maxsize=2)
def _classifier(data_id: int, data: DemoData) -> DigitClassifier:
    return DigitClassifier(data)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def tokens_to_levels(tokens: Tensor) -> tuple[np.ndarray, int]:
    """Grey levels of a generated image; non-image tokens become 0 (black) and are counted."""
    levels = tokens.long().cpu() - IMAGE_TOKEN_OFFSET
    bad = (levels < 0) | (levels >= NUM_LEVELS)
    return levels.masked_fill(bad, 0).numpy().reshape(SIDE, SIDE), int(bad.sum())


def generate(model: LLaDAMDM, prompt: Tensor, plan, sampling: SamplingConfig, cfg: EvalConfig) -> GenerateResult:
    if cfg.sampler == "dense":
        return generate_dense(model, prompt, plan, sampling)
    m = model.config.num_registers if cfg.num_registers is None else cfg.num_registers
    return generate_sparse(model, prompt, plan, sampling, SparseOptions(num_registers=m))


# Image tokens only, as the served image routes sample by default (the codec's token_range): unrestricted, a sparse
# edit drew text tokens for ~70% of an inverted digit's pixels, which the server never returns.
IMAGE_TOKENS = (IMAGE_TOKEN_OFFSET, IMAGE_TOKEN_OFFSET + NUM_LEVELS)


def image_sampling(cfg: EvalConfig, i: int) -> tuple[SamplingConfig, torch.Generator]:
    seed = cfg.seed * 100_003 + i
    return (SamplingConfig(temperature=cfg.image_temperature, cfg_scale=cfg.cfg_scale, seed=seed,
                           token_range=IMAGE_TOKENS),
            torch.Generator().manual_seed(seed))


def t2i_order(data: DemoData, cfg: EvalConfig) -> np.ndarray:
    """The held-out digits whose captions the text-to-image eval draws at cfg.seed, in order."""
    return np.random.default_rng(cfg.seed).permutation(data.test_idx)[:cfg.num_images]


def eval_t2i(model: LLaDAMDM, data: DemoData, cfg: EvalConfig, progress=None) -> dict:
    """digit-GenEval: fraction of images the classifier reads as the prompted digit; digit-FID on its features."""
    clf = _classifier(id(data), data)
    order = t2i_order(data, cfg)
    images, correct, invalid, forward = [], 0, 0, 0
    for i, idx in enumerate(order):
        sampling, gen = image_sampling(cfg, i)
        plan = image_plan(SIDE, SIDE, cfg.image_steps, generator=gen)
        result = generate(model, data.t2i_prompt(data.captions[idx]), plan, sampling, cfg)
        levels, bad = tokens_to_levels(result.tokens)
        images.append(levels)
        invalid += bad
        forward += result.forward_tokens
        if progress:
            progress.update(1)
    images = np.stack(images)
    correct = int((clf.predict(images) == data.labels[order]).sum())
    return {"geneval": correct / len(order), "fid": frechet_distance(clf.features(images), clf.real_features),
            "style_agreement": style_agreement(data, order, images), "invalid_tokens": invalid,
            "forward_tokens_per_image": forward / len(order), "images": images}


def style_agreement(data: DemoData, order: np.ndarray, images: np.ndarray) -> float:
    """Fraction of style words the image follows (chance about 0.5): thick / thin = ink above / below the
    median ink of the real training digits of that class; slanted right / left = shear > 0 / < 0."""
    train_ink = np.array([ink_and_slant(data.levels[i])[0] for i in data.train_idx])
    train_labels = data.labels[data.train_idx]
    hits, words = 0, 0
    for idx, image in zip(order, images):
        caption = data.captions[idx].split()
        ink, slant = ink_and_slant(image) if image.any() else (0.0, 0.0)
        median = float(np.median(train_ink[train_labels == data.labels[idx]]))
        for word, ok in (("thick", ink > median), ("thin", ink < median), ("right", slant > 0), ("left", slant < 0)):
            if word in caption:
                words, hits = words + 1, hits + ok
    return hits / words if words else float("nan")


def eval_edit(model: LLaDAMDM, data: DemoData, cfg: EvalConfig, progress=None) -> dict:
    """Edit agreement: fraction of edits whose output is nearest to the requested edit's target (`edit_followed`),
    overall and per instruction; the classifier's agreement on output vs target; mean absolute pixel error (0..1)."""
    clf = _classifier(id(data), data)
    order = np.random.default_rng(cfg.seed + 1).permutation(data.test_idx)[:cfg.num_edits]
    outs, targets, followed, forward = [], [], [], 0
    for i, idx in enumerate(order):
        instruction = EDITS[i % len(EDITS)]
        sampling, gen = image_sampling(cfg, 50_000 + i)
        plan = image_plan(SIDE, SIDE, cfg.image_steps, generator=gen)
        result = generate(model, data.edit_prompt(data.levels[idx], instruction), plan, sampling, cfg)
        outs.append(tokens_to_levels(result.tokens)[0])
        targets.append(apply_edit(data.levels[idx], instruction))
        followed.append((instruction, edit_followed(data.levels[idx], outs[-1], instruction)))
        forward += result.forward_tokens
        if progress:
            progress.update(1)
    outs, targets = np.stack(outs), np.stack(targets)
    by_instruction = {e: float(np.mean([ok for name, ok in followed if name == e]))
                      for e in EDITS if any(name == e for name, _ in followed)}
    return {"edit_agreement": float(np.mean([ok for _, ok in followed])), "edit_by_instruction": by_instruction,
            "edit_classifier_agreement": float((clf.predict(outs) == clf.predict(targets)).mean()),
            "edit_pixel_error": float(np.abs(outs - targets).mean() / (NUM_LEVELS - 1)),
            "forward_tokens_per_edit": forward / len(order)}


def response_text(data: DemoData, tokens: Tensor) -> str:
    """The decoded response up to its first [EOS] (what the server returns as text)."""
    ids = tokens.tolist()
    return data.tok.decode(ids[:ids.index(data.eos)] if data.eos in ids else ids)


def eval_text(model: LLaDAMDM, data: DemoData, cfg: EvalConfig, progress=None) -> dict:
    """Exact match of the final number on held-out sums (never seen in training)."""
    rng = random.Random(cfg.seed)
    correct, forward = 0, 0
    samples = []
    for i in range(cfg.num_text):
        ex = data.text_example(rng, held_out=True)
        plan = text_plan(TEXT_GEN_LENGTH, cfg.text_block_length, cfg.text_steps)
        result = generate(model, ex.prompt, plan, SamplingConfig(seed=cfg.seed + i), cfg)
        text = response_text(data, result.tokens)
        correct += final_number(text) == str(ex.label)
        forward += result.forward_tokens
        if len(samples) < 5:
            samples.append({"prompt": data.tok.decode(ex.prompt.tolist()), "response": text})
        if progress:
            progress.update(1)
    n = max(cfg.num_text, 1)
    return {"arithmetic_accuracy": correct / n, "forward_tokens_per_answer": forward / n, "text_samples": samples}


def server_text_params(gen_length: int) -> DiffusionParams:
    """What `sparse-lavida serve` runs for a text request of max_tokens = gen_length, temperature 0 and no knobs:
    scheduler/params.py's own defaults (block 32 when it divides gen_length, else gen_length; half the tokens as
    steps when the block is even; greedy, low-confidence remasking)."""
    from sparse_lavida_vllm.scheduler.params import parse_params

    return parse_params(SimpleNamespace(max_tokens=gen_length, temperature=0.0, seed=0), prompt_len=0,
                        max_model_len=gen_length, default_num_registers=0, has_register_token=False)


def length_key(gen_length: int) -> str:
    return f"arithmetic_at_{gen_length}_tokens"


LENGTH_KEYS = tuple(length_key(g) for g in ARITHMETIC_LENGTHS)


def eval_text_by_length(model: LLaDAMDM, data: DemoData, cfg: EvalConfig, progress=None) -> dict:
    """Exact match on held-out sums at each max_tokens in ARITHMETIC_LENGTHS with the server's default plan and the
    checkpoint's sampler (cfg.sampler): the same cfg.num_text_per_length sums at every length."""
    out = {}
    for gen_length in ARITHMETIC_LENGTHS:
        params = server_text_params(gen_length)
        rng = random.Random(cfg.seed)
        correct = 0
        for _ in range(cfg.num_text_per_length):
            ex = data.text_example(rng, held_out=True)
            result = generate(model, ex.prompt, params.plan(), params.sampling, cfg)
            correct += final_number(response_text(data, result.tokens)) == str(ex.label)
            if progress:
                progress.update(1)
        out[length_key(gen_length)] = correct / max(cfg.num_text_per_length, 1)
    return out


METRICS = ("geneval", "fid", "style_agreement", "edit_agreement", "edit_classifier_agreement", "edit_pixel_error",
           "arithmetic_accuracy", *LENGTH_KEYS, "forward_tokens_per_image",
           "forward_tokens_per_edit", "forward_tokens_per_answer")
EVAL_SEEDS = 3


def summarize(runs: list[dict]) -> dict:
    """Each metric over the seeds: mean, spread (sample std; 0 for one seed) and the per-seed values."""
    out = {}
    for key in METRICS:
        values = [r[key] for r in runs if key in r]
        if values:
            arr = np.asarray(values, dtype=np.float64)
            out[key] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                        "values": [round(float(v), 4) for v in arr]}
    return out


def evaluate_seeds(model: LLaDAMDM, data: DemoData, cfg: EvalConfig, num_seeds: int = EVAL_SEEDS,
                   show_progress: bool = True) -> dict:
    """`evaluate` at seeds cfg.seed, cfg.seed + 1, ...: each seed draws other prompts, sums and sampling noise."""
    runs = [evaluate(model, data, replace(cfg, seed=cfg.seed + k), show_progress) for k in range(num_seeds)]
    return {"eval_config": asdict(cfg), "seeds": [cfg.seed + k for k in range(num_seeds)],
            "classifier_held_out_accuracy": runs[0]["classifier_held_out_accuracy"], "metrics": summarize(runs),
            "text_samples": runs[0].get("text_samples", []), **_by_instruction(runs)}


def _by_instruction(runs: list[dict]) -> dict:
    """Per-instruction edit agreement, averaged over the seeds that drew the instruction."""
    names = [e for e in EDITS if any(e in r.get("edit_by_instruction", {}) for r in runs)]
    if not names:
        return {}
    return {"edit_by_instruction": {e: round(float(np.mean([r["edit_by_instruction"][e] for r in runs
                                                             if e in r.get("edit_by_instruction", {})])), 4)
                                    for e in names}}


def evaluate(model: LLaDAMDM, data: DemoData, cfg: EvalConfig, show_progress: bool = True) -> dict:
    """All metrics for one (model, sampler) pair; `images` holds the generated T2I grids."""
    from tqdm import tqdm

    total = cfg.num_images + cfg.num_edits + cfg.num_text + cfg.num_text_per_length * len(ARITHMETIC_LENGTHS)
    with tqdm(total=total, desc=f"eval {cfg.sampler}", disable=not show_progress, mininterval=2) as bar:
        clf = _classifier(id(data), data)
        out = {"eval_config": asdict(cfg), "classifier_held_out_accuracy": clf.held_out_accuracy}
        if cfg.num_images:
            out.update(eval_t2i(model, data, cfg, bar))
        if cfg.num_edits:
            out.update(eval_edit(model, data, cfg, bar))
        if cfg.num_text:
            out.update(eval_text(model, data, cfg, bar))
        if cfg.num_text_per_length:
            out.update(eval_text_by_length(model, data, cfg, bar))
    return out
