"""Unmasking plans: which positions are decoded at which step (image grid orders, text blocks, policies).

A plan is a tuple of stages. Each stage owns a pool of response positions and a per-step token
count schedule; at every step of a stage the decode set is the pool's still-masked positions and
a confidence policy picks which of them to keep. An image step is a stage whose count equals its
pool (the partition C_k is fixed in advance); a text block is a stage of several steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine", "shift")
ORDERS = ("stratified", "random", "raster")
POLICIES = ("low_confidence", "threshold", "random")


@dataclass(frozen=True)
class Stage:
    positions: Tensor  # response-relative positions, long (n,)
    counts: tuple[int, ...]  # tokens to unmask per step; sums to len(positions)


@dataclass(frozen=True)
class UnmaskPlan:
    length: int  # response length L
    stages: tuple[Stage, ...]

    @property
    def num_steps(self) -> int:
        return sum(len(s.counts) for s in self.stages)


def seeded(generator: torch.Generator | None) -> torch.Generator:
    """`generator`, or one seeded 0: a plan never draws from torch's global RNG, so an unseeded call is reproducible
    and independent of whatever else ran in the process."""
    return torch.Generator().manual_seed(0) if generator is None else generator


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


# ---- image / grid orders -------------------------------------------------------------------

def stratified_order(height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """Progressive multi-jittered order over a square 2^n grid (flat indices, row-major).

    Every prefix of length 4^j holds exactly one position in each of the 4^j cells of size
    (H/2^j x W/2^j): level j keeps the position already chosen in each parent cell and adds one
    random position in each of the three empty child cells, in random order.
    """
    _check_positive("height", height)
    _check_positive("width", width)
    if height != width:
        raise ValueError(f"grid must be square for the stratified order, got height={height} width={width}")
    levels = int(round(math.log2(height)))
    if 2 ** levels != height:
        raise ValueError(f"height must be a power of two for the stratified order, got {height}")
    generator = seeded(generator)
    side = height
    first = torch.randint(0, side * side, (1,), generator=generator)
    chosen = [first]
    chosen_rc = torch.stack([first // side, first % side], dim=1)  # (n, 2): one point per current cell
    for j in range(1, levels + 1):
        cell = side >> j  # child cell size
        parent_cells = chosen_rc // (cell * 2)  # (n, 2): parent cell of each existing point
        own_child = (chosen_rc // cell) % 2  # which child holds the existing point
        # the three other children of every parent cell
        offsets = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
        kids = offsets.unsqueeze(0).expand(len(chosen_rc), 4, 2)
        empty = (kids != own_child.unsqueeze(1)).any(-1)
        kids = kids[empty].view(len(chosen_rc), 3, 2)
        origin = parent_cells.unsqueeze(1) * (cell * 2) + kids * cell  # top-left of each empty child
        jitter = torch.randint(0, cell, origin.shape, generator=generator)
        new_rc = (origin + jitter).reshape(-1, 2)
        new_rc = new_rc[torch.randperm(len(new_rc), generator=generator)]
        chosen.append(new_rc[:, 0] * side + new_rc[:, 1])
        chosen_rc = torch.cat([chosen_rc, new_rc])
    return torch.cat(chosen)


def grid_order(height: int, width: int, order: str = "stratified",
               generator: torch.Generator | None = None) -> Tensor:
    if order == "stratified":
        return stratified_order(height, width, generator)
    _check_positive("height", height)
    _check_positive("width", width)
    if order == "random":
        return torch.randperm(height * width, generator=seeded(generator))
    if order == "raster":
        return torch.arange(height * width)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


# ---- token-count schedules -----------------------------------------------------------------

def token_counts(length: int, steps: int, schedule: str = "linear", shift: float = 5.0) -> list[int]:
    """Split `length` tokens over `steps` steps (each >= 1) following a mask-ratio schedule.

    linear: equal counts; cosine: MaskGIT's cosine mask ratio; shift: LaViDa-O's time shift
    m(t) = s t / (1 + (s - 1) t), which unmasks few tokens early and many late.
    """
    _check_positive("length", length)
    _check_positive("steps", steps)
    if steps > length:
        raise ValueError(f"steps ({steps}) must be <= the number of tokens to decode ({length})")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = 1.0 - torch.arange(1, steps + 1, dtype=torch.float64) / steps  # time after each step, 1 -> 0
    if schedule == "linear":
        masked = t
    elif schedule == "cosine":
        masked = torch.sin(t * math.pi / 2)
    elif schedule == "shift":
        masked = shift * t / (1 + (shift - 1) * t)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    cumulative = torch.round(length * (1 - masked)).long().tolist()
    counts, done = [], 0
    for k, c in enumerate(cumulative):
        c = max(c, done + 1)  # at least one token per step
        c = min(c, length - (steps - 1 - k))  # leave at least one for every later step
        counts.append(c - done)
        done = c
    return counts


def equal_counts(length: int, steps: int) -> list[int]:
    """LLaDA's per-block split: equal shares, the remainder going to the first steps."""
    base, rem = divmod(length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


# ---- plans ---------------------------------------------------------------------------------

def image_plan(height: int, width: int, steps: int, schedule: str = "shift", order: str = "stratified",
               shift: float = 5.0, generator: torch.Generator | None = None,
               masked: Tensor | None = None) -> UnmaskPlan:
    """A fixed partition C_1..C_K of an HxW token grid: one single-step stage per step.

    `masked` (bool, H*W) restricts the plan to the positions to generate (inpainting: the rest is given);
    the grid order is kept, so a stratified plan still spreads each step over the masked region.
    """
    positions = grid_order(height, width, order, generator)
    if masked is not None:
        if masked.shape != (height * width,):
            raise ValueError(f"masked must have shape ({height * width},), got {tuple(masked.shape)}")
        positions = positions[masked.to(torch.bool)[positions]]
        if positions.numel() == 0:
            raise ValueError("masked must mark at least one position to generate")
    counts = token_counts(positions.numel(), steps, schedule, shift)
    stages = tuple(Stage(part, (len(part),)) for part in torch.split(positions, counts))
    return UnmaskPlan(height * width, stages)


def text_plan(gen_length: int, block_length: int, steps: int, block_order: list[int] | None = None,
              masked: Tensor | None = None) -> UnmaskPlan:
    """Semi-autoregressive blocks of `block_length`; `steps` are shared equally by the blocks.

    `block_order` gives any order of block indices (default left to right); `masked` (bool, L)
    marks the positions to generate when infilling (default: all), the rest being given.
    """
    _check_positive("gen_length", gen_length)
    _check_positive("block_length", block_length)
    _check_positive("steps", steps)
    if gen_length % block_length:
        raise ValueError(f"block_length ({block_length}) must divide gen_length ({gen_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    steps_per_block = steps // num_blocks
    if steps_per_block > block_length:
        raise ValueError(f"steps ({steps}) must be <= gen_length ({gen_length})")
    order = list(range(num_blocks)) if block_order is None else list(block_order)
    if sorted(order) != list(range(num_blocks)):
        raise ValueError(f"block_order must be a permutation of 0..{num_blocks - 1}, got {order}")
    if masked is None:
        masked = torch.ones(gen_length, dtype=torch.bool)
    if masked.shape != (gen_length,):
        raise ValueError(f"masked must have shape ({gen_length},), got {tuple(masked.shape)}")
    stages = []
    for b in order:
        pos = torch.arange(b * block_length, (b + 1) * block_length)
        pos = pos[masked[pos]]
        if len(pos):
            stages.append(Stage(pos, tuple(equal_counts(len(pos), min(steps_per_block, len(pos))))))
    return UnmaskPlan(gen_length, tuple(stages))


# ---- LaViDa-O's own per-code plan (the publishers' sampler) ---------------------------------

def pmj_code_order(side: int, seed: int = 42) -> list[int]:
    """LaViDa-O's stratified order over a side x side grid of VQ codes (row-major indices y * side + x), as their
    llava/eval/pmj.py `stratified_random(side, seed, shuffle_blocks=True)` draws it; predict_t2i_edit uses seed 42
    for every image. Level by level every cell splits into its four quarters (NW, NE, SW, SE); a level's quarters
    are visited in a shuffled order, and each quarter holding no code yet gets one at a random cell (x, then y).
    Python's `random.Random(seed)` with the same draws in the same order gives their list exactly."""
    if side < 1 or side & (side - 1):
        raise ValueError(f"the publishers' stratified order needs a power-of-two side, got {side}")
    rng = random.Random(seed)
    order: list[int] = []
    points: list[tuple[int, int]] = []
    cells = [(0, 0)]
    size = side
    while size > 1:
        half = size // 2
        quarters = [(x + dx, y + dy) for x, y in cells for dx, dy in ((0, 0), (half, 0), (0, half), (half, half))]
        rng.shuffle(quarters)
        held = {(x // half, y // half) for x, y in points}
        for x0, y0 in quarters:
            if (x0 // half, y0 // half) in held:
                continue
            x, y = rng.randrange(x0, x0 + half), rng.randrange(y0, y0 + half)
            points.append((x, y))
            held.add((x0 // half, y0 // half))
            order.append(y * side + x)
        cells, size = quarters, half
    rest = sorted(set(range(side * side)) - set(order))  # only a 1x1 grid has any left; shuffled as theirs
    rng.shuffle(rest)
    return order + rest


def publishers_counts(total: int, steps: int, shift: float) -> list[int]:
    """Codes to unmask per step as LaViDa-O's `get_num_transfer_tokens_sch(..., schedule="shift")` computes them
    (llava/model/language_model/llada/generate.py): the time-shifted fraction s t / (1 + (s - 1) t) at steps + 1
    even times in float32, truncated to counts, differenced, every step at least one (the excess taken back one at a
    time from the first steps over one), then reversed, so few codes come early and many late. `steps` is capped at
    `total`."""
    _check_positive("total", total)
    _check_positive("steps", steps)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    steps = min(steps, total)
    t = torch.linspace(0, 1, steps + 1)  # float32, as theirs
    marks = (shift * t / (1 + (shift - 1) * t) * total).to(torch.int64)
    counts = (marks[1:] - marks[:-1]).clamp(min=1).tolist()
    excess, j = sum(counts) - total, 0
    while excess > 0:
        j %= len(counts)
        if counts[j] > 1:
            counts[j] -= 1
            excess -= 1
        j += 1
    return counts[::-1]


def publishers_code_plan(side: int, steps: int, shift: float = 5.0, seed: int = 42,
                         masked: Tensor | None = None) -> UnmaskPlan:
    """The publishers' text_to_image plan (`confidence_policy: stratified`, `schedule: shift`) over a side x side
    code grid: step k unmasks the next publishers_counts(...)[k] codes of pmj_code_order. Positions of this plan
    are code indices, not 2x2 positions (code_slots maps them). `masked` (bool over the (side/2)^2 positions)
    keeps only the codes of positions to generate (inpainting), in the same order."""
    order = torch.tensor(pmj_code_order(side, seed))
    if masked is not None:
        order = order[masked.to(torch.bool)[code_slots(order, side)[0]]]
        if order.numel() == 0:
            raise ValueError("masked must mark at least one position to generate")
    counts = publishers_counts(order.numel(), steps, shift)
    return UnmaskPlan(side * side, tuple(Stage(part, (len(part),)) for part in torch.split(order, counts)))


def code_slots(codes: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Code indices (row-major on a code grid `width` codes wide) -> (2x2 position index, slot inside the patch),
    the layout of model_executor.patch_ids.codes_to_patches (row-major inside each patch)."""
    y, x = codes // width, codes % width
    return (y // 2) * (width // 2) + x // 2, (y % 2) * 2 + x % 2


def code_step(codes: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """One step of a per-code plan as the engine and the driver run it: the 2x2 positions its codes sit in
    (ascending: the decode rows, each sampled whole) and, per position, which of its 4 codes the step commits."""
    position, slot = code_slots(codes, width)
    decode, which = torch.unique(position, return_inverse=True)
    taken = torch.zeros(decode.numel(), 4, dtype=torch.bool, device=codes.device)
    taken[which, slot] = True
    return decode, taken


# ---- confidence policies -------------------------------------------------------------------

def choose_tokens(policy: str, confidence: Tensor, count: int, threshold: float = 0.9,
                  generator: torch.Generator | None = None) -> Tensor:
    """Indices (into the decode set) of the tokens to keep this step.

    low_confidence: the `count` most confident (LLaDA's remasking name); threshold: all above
    `threshold`, at least the most confident one (Fast-dLLM's parallel decoding); random: `count`
    chosen uniformly.
    """
    n = confidence.numel()
    count = min(count, n)
    if policy == "low_confidence":
        return torch.topk(confidence, count).indices
    if policy == "threshold":
        keep = (confidence > threshold).nonzero().flatten()
        return keep if len(keep) else confidence.argmax().view(1)
    if policy == "random":
        generator = seeded(generator)
        return torch.randperm(n, generator=generator, device=generator.device).to(confidence.device)[:count]
    raise ValueError(f"remasking must be one of {POLICIES}, got {policy!r}")
