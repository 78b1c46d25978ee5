"""The demo data, made from what ships in packages: digit images (T2I, edits) and synthetic arithmetic."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lavida_vllm.multimodal.codec import PixelCodec
from sparse_lavida_vllm.training.tokenizer import (
    EDIT,
    EOS,
    IMAGE,
    IMAGE_TOKEN_OFFSET,
    NUM_LEVELS,
    T2I,
)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EDITS = ("make it thicker", "shift it left", "shift it right", "invert the colours", "flip it upside down")
TASKS = ("t2i", "edit", "text")
TEXT_GEN_LENGTH = 8  # eval / serving canvas: " 198" is 4 tokens, the rest [EOS]
ANSWER_WIDTH = 3  # sums of two numbers 0..99 have at most 3 digits
# every canvas the server builds for max_tokens 4..64 at its defaults (one block of 4/8/16/32, or two of 32): an
# answer trained only on 8 and 16 lost its hundreds digit at 32 (16/20 sums right, issue 24)
TRAIN_GEN_LENGTHS = (4, 8, 16, 32, 64)
SIDE = 8  # scikit-learn's digits are 8x8: their own resolution, one token per pixel
SHIFT = 2  # pixels an edit's "shift it left/right" moves the digit
DEMO_ROOT = Path(__file__).resolve().parents[1] / "assets" / "demo"  # the shipped dense/ and sparse/ checkpoints


def make_codec() -> PixelCodec:
    return PixelCodec(SIDE, SIDE, NUM_LEVELS, IMAGE_TOKEN_OFFSET)


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten 8x8 digits (ink 0..16) as grey levels 0..15, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    levels = make_codec().quantize(np.clip(digits.images / 16.0, 0.0, 1.0))
    return levels, digits.target.astype(np.int64)


def split_indices(n: int, seed: int = 0, held_out: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train / held-out split (the classifier and the eval prompts use the held-out part)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - held_out)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def ink_and_slant(levels: np.ndarray) -> tuple[float, float]:
    """Total ink and the shear dx/dy of the ink's principal axis (positive = top leans right)."""
    w = levels.astype(np.float64)
    total = w.sum()
    ys, xs = np.mgrid[0:levels.shape[0], 0:levels.shape[1]]
    my, mx = (w * ys).sum() / total, (w * xs).sum() / total
    cov = (w * (xs - mx) * (ys - my)).sum() / total
    var_y = (w * (ys - my) ** 2).sum() / total
    return float(total), float(-cov / var_y)  # y grows downward: a top-right lean has negative cov


def captions(levels: np.ndarray, labels: np.ndarray) -> list[str]:
    """'a thick handwritten digit seven slanted right': label words plus styles computed from the pixels."""
    stats = np.array([ink_and_slant(im) for im in levels])
    out = []
    for i, label in enumerate(labels):
        same = stats[labels == label, 0]
        lo, hi = np.quantile(same, [1 / 3, 2 / 3])
        ink, slant = stats[i]
        words = ["a"]
        if ink >= hi:
            words.append("thick")
        elif ink <= lo:
            words.append("thin")
        words += ["handwritten", "digit", DIGIT_WORDS[label]]
        if slant > 0.15:
            words += ["slanted", "right"]
        elif slant < -0.15:
            words += ["slanted", "left"]
        out.append(" ".join(words))
    return out


def apply_edit(levels: np.ndarray, instruction: str) -> np.ndarray:
    """The deterministic target image of an edit instruction."""
    top = NUM_LEVELS - 1
    if instruction == "make it thicker":
        x = torch.tensor(levels, dtype=torch.float32)[None, None]
        return F.max_pool2d(x, 3, stride=1, padding=1)[0, 0].long().numpy()
    if instruction in ("shift it left", "shift it right"):
        shift = -SHIFT if instruction.endswith("left") else SHIFT
        out = np.zeros_like(levels)
        if shift < 0:
            out[:, :shift] = levels[:, -shift:]
        else:
            out[:, shift:] = levels[:, :-shift]
        return out
    if instruction == "invert the colours":
        return top - levels
    if instruction == "flip it upside down":
        return levels[::-1].copy()
    raise ValueError(f"instruction must be one of {EDITS}, got {instruction!r}")


def edit_followed(source: np.ndarray, output: np.ndarray, instruction: str) -> bool:
    """Was the instruction followed: is the output nearest (mean absolute pixel difference) to this
    instruction's target among the unedited source and the targets of every instruction (ties count)?

    A digit classifier cannot judge edits of 8x8 digits: most targets (2 px shifts, thickening, inversion) are
    not legible digits to it, so agreement of its readings measures its noise, not the edit."""
    candidates = {"": source, **{name: apply_edit(source, name) for name in EDITS}}
    distance = {name: float(np.abs(output.astype(np.int64) - target).mean()) for name, target in candidates.items()}
    return distance[instruction] <= min(distance.values())


def is_held_out(terms: tuple[int, ...]) -> bool:
    """About 10% of all sums are never trained on: the arithmetic eval draws only from them.

    The split hashes the whole sum (a multiplicative hash, then xor-shift), so every pair of units digits and
    every carry pattern still occurs in training: the held-out sums test addition, not a digit pair that was
    never shown (a linear rule in the digits, the old split, withheld 10 units-digit pairs entirely).
    """
    key = 0
    for t in terms:
        key = key * 100 + t
    h = (key * 0x9E3779B1) & 0xFFFFFFFF
    h ^= h >> 15
    return h % 10 == 3


def arithmetic_problem(rng: random.Random, held_out: bool = False) -> tuple[str, str, int]:
    """A two-term sum of numbers 0..99 and its answer text. Returns (question, response, answer).

    `held_out` picks from the held-out sums, otherwise from the training sums.
    """
    while True:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if is_held_out((a, b)) == held_out:
            return f"{a}+{b}=?", f"{a + b}", a + b


def text_prompt(question: str) -> str:
    return f"Q: {question} A:"


def final_number(text: str) -> str:
    """The last run of digits in a response ('' if none): exact-match compares this."""
    parts = "".join(ch if ch.isdigit() else " " for ch in text).split()
    return parts[-1] if parts else ""


def tokenizer_corpus(seed: int = 0, num_sums: int = 4000) -> list[str]:
    """Every kind of text the model sees, for training the Unigram model."""
    levels, labels = load_digit_images()
    rng = random.Random(seed)
    corpus = captions(levels, labels) + list(EDITS)
    for _ in range(num_sums):
        q, r, _ = arithmetic_problem(rng)
        corpus.append(f"{text_prompt(q)} {r}")
    return corpus


@dataclass(frozen=True)
class Example:
    """One supervised pair: prompt ids and the clean response ids (the MDM denoises the response)."""

    task: str
    prompt: Tensor
    response: Tensor
    label: int = -1  # digit label (images) or the answer (text)


class DemoData:
    """Builds token-level examples of the three tasks from the seeded split."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tok = tokenizer
        self.codec = make_codec()
        self.levels, self.labels = load_digit_images()
        self.captions = captions(self.levels, self.labels)
        self.train_idx, self.test_idx = split_indices(len(self.labels), seed)
        self.eos = tokenizer.token_to_id(EOS)
        self.t2i, self.edit, self.image = (tokenizer.token_to_id(t) for t in (T2I, EDIT, IMAGE))

    def encode_text(self, text: str) -> Tensor:
        return torch.tensor(self.tok.encode(text).ids, dtype=torch.long)

    def image_ids(self, levels: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(levels).reshape(-1)) + IMAGE_TOKEN_OFFSET

    def t2i_prompt(self, caption: str) -> Tensor:
        return torch.cat([torch.tensor([self.t2i]), self.encode_text(caption)])

    def edit_prompt(self, source: np.ndarray, instruction: str) -> Tensor:
        return torch.cat([torch.tensor([self.edit, self.image]), self.image_ids(source), self.encode_text(instruction)])

    def t2i_example(self, i: int) -> Example:
        return Example("t2i", self.t2i_prompt(self.captions[i]), self.image_ids(self.levels[i]), int(self.labels[i]))

    def edit_example(self, i: int, instruction: str) -> Example:
        src = self.levels[i]
        return Example("edit", self.edit_prompt(src, instruction), self.image_ids(apply_edit(src, instruction)),
                       int(self.labels[i]))

    def text_example(self, rng: random.Random, held_out: bool = False, gen_length: int = TEXT_GEN_LENGTH) -> Example:
        q, r, answer = arithmetic_problem(rng, held_out)
        return Example("text", self.encode_text(text_prompt(q)), self.answer_ids(r, gen_length), answer)

    def answer_ids(self, answer: str, gen_length: int) -> Tensor:
        """'▁' + the answer right-aligned in ANSWER_WIDTH places (leading places are '▁', decoded as spaces)
        + [EOS] padding (LLaDA's) to gen_length: the units digit is always at the same canvas position."""
        space = self.tok.token_to_id("▁")
        body = [space] * (1 + ANSWER_WIDTH - len(answer)) + [self.tok.token_to_id(ch) for ch in answer]
        if len(answer) > ANSWER_WIDTH or len(body) > gen_length:
            raise ValueError(f"answer {answer!r} does not fit gen_length {gen_length}")
        return torch.tensor(body + [self.eos] * (gen_length - len(body)), dtype=torch.long)

    def sample(self, task: str, rng: random.Random, split: str = "train", gen_length: int | None = None) -> Example:
        """One example; a training text example's canvas is `gen_length` (default: drawn from TRAIN_GEN_LENGTHS)."""
        pool = self.train_idx if split == "train" else self.test_idx
        if task == "t2i":
            return self.t2i_example(int(rng.choice(pool)))
        if task == "edit":
            return self.edit_example(int(rng.choice(pool)), rng.choice(EDITS))
        if task == "text":
            if split == "train":
                return self.text_example(rng, gen_length=gen_length or rng.choice(TRAIN_GEN_LENGTHS))
            return self.text_example(rng, held_out=True)
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
