"""The dense MDM loss (eq. 1) and step-causal SFT (Algorithm 1) through the same model code, batched."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sparse_lavida_vllm.diffusion.masks import build_step_causal_sequence, spans_to_mask
from sparse_lavida_vllm.model_executor.attention import AttentionBackend
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.model import LLaDAMDM
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model, save_pretrained
from sparse_lavida_vllm.training.data import TASKS, TRAIN_GEN_LENGTHS, DemoData, Example
from sparse_lavida_vllm.training.tokenizer import load_tokenizer, save_hf_tokenizer

MODES = ("dense", "sparse", "sparse_full")  # sparse_full: the sparse sequence with full attention (Table 8)


class BatchedMaskAttention(AttentionBackend):
    """Training-only backend: the flat B*n rows are B padded samples, each with its own (n, n) bool mask."""

    def __init__(self, mask: Tensor) -> None:
        if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
            raise ValueError(f"mask must be (B, n, n), got {tuple(mask.shape)}")
        self.mask = mask.unsqueeze(1)  # broadcast over heads
        self.batch, self.n = mask.shape[0], mask.shape[1]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, n = self.batch, self.n
        q = q.view(b, n, q.shape[1], q.shape[2]).transpose(1, 2)
        k = k.view(b, n, k.shape[1], k.shape[2]).transpose(1, 2)
        v = v.view(b, n, v.shape[1], v.shape[2]).transpose(1, 2)
        if q.shape[1] != k.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.transpose(1, 2).reshape(b * n, out.shape[1], out.shape[3])


@dataclass
class Packed:
    """One training sample as rows: ids, positions, its attention mask and the loss rows."""

    ids: Tensor
    positions: Tensor
    mask: Tensor | None  # (T, T) bool; None = full attention
    loss_rows: Tensor
    targets: Tensor
    weight: float  # 1 / (masked rows): eq. 1's 1/(t L) with the realised count of masks for t L
    blocks: Tensor | None = None  # Algorithm 1 block number per row (sparse packs)
    num_clean_blocks: int = 0
    num_masked_blocks: int = 0


def _noise(length: int, gen: torch.Generator) -> tuple[float, Tensor]:
    """t ~ U(0, 1] and a mask of the response drawn with probability t (at least one token masked).

    The loss weights a sample by 1 / (its number of masks), eq. 1's 1 / (t L) in expectation: on an 8-token
    answer t L is often far below the forced single mask, and 1 / (t L) let rare samples swamp a batch.
    """
    t = float(torch.rand((), generator=gen)) * (1 - 1e-3) + 1e-3
    masked = torch.rand(length, generator=gen) < t
    if not masked.any():
        masked[torch.randint(0, length, (1,), generator=gen)] = True
    return t, masked


def _maybe_drop_prompt(ex: Example, mask_id: int, drop: float, gen: torch.Generator) -> Tensor:
    """CFG training: image prompts become all masks with probability `drop` (the sampler's uncond branch)."""
    if ex.task != "text" and float(torch.rand((), generator=gen)) < drop:
        return torch.full_like(ex.prompt, mask_id)
    return ex.prompt


def pack_dense(ex: Example, config: MDMConfig, gen: torch.Generator, prompt_drop: float = 0.1) -> Packed:
    """Eq. 1: mask each response token with probability t, predict the masked ones under full attention."""
    prompt = _maybe_drop_prompt(ex, config.mask_token_id, prompt_drop, gen)
    length = ex.response.numel()
    t, masked = _noise(length, gen)
    response = torch.where(masked, torch.full_like(ex.response, config.mask_token_id), ex.response)
    p = prompt.numel()
    rows = masked.nonzero().flatten()
    return Packed(torch.cat([prompt, response]), torch.arange(p + length), None, p + rows, ex.response[rows],
                  1.0 / rows.numel())


def random_split(positions: Tensor, parts: int, gen: torch.Generator) -> list[Tensor]:
    """Shuffle positions and cut them into `parts` non-empty groups of random sizes."""
    n = positions.numel()
    if not 1 <= parts <= n:
        raise ValueError(f"parts must be in [1, {n}], got {parts}")
    shuffled = positions[torch.randperm(n, generator=gen)]
    cuts = (torch.randperm(n - 1, generator=gen)[:parts - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, n]
    return [shuffled[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def pack_sparse(ex: Example, config: MDMConfig, gen: torch.Generator, num_registers: int,
                max_clean_blocks: int = 4, max_masked_blocks: int = 32, kept_masked_blocks: int = 2,
                step_causal: bool = True, prompt_drop: float = 0.1) -> Packed:
    """Algorithm 1: prompt block 0, clean tokens in random blocks 1..M, masked tokens in blocks M+1..M+N
    each followed by its register copies.

    The masked tokens are cut into 1..max_masked_blocks random groups and only `kept_masked_blocks`
    of them enter the sequence: the rest are truncated, as at inference, where a step's decode set is
    a small part of the masked tokens (and it bounds the rows registers add). Without `step_causal`
    one masked block is kept and every row attends to every row (the Table 8 ablation).
    """
    prompt = _maybe_drop_prompt(ex, config.mask_token_id, prompt_drop, gen)
    length = ex.response.numel()
    t, masked = _noise(length, gen)
    clean_pos, masked_pos = (~masked).nonzero().flatten(), masked.nonzero().flatten()
    m = int(torch.randint(1, max_clean_blocks + 1, (1,), generator=gen)) if clean_pos.numel() else 0
    clean_blocks = random_split(clean_pos, min(m, clean_pos.numel()), gen) if m else []
    n = int(torch.randint(1, max_masked_blocks + 1, (1,), generator=gen))
    masked_blocks = random_split(masked_pos, min(n, masked_pos.numel()), gen)
    masked_blocks = masked_blocks[:kept_masked_blocks if step_causal else 1]  # random_split shuffled them
    seq = build_step_causal_sequence(prompt, ex.response, clean_blocks, masked_blocks, num_registers,
                                     config.mask_token_id, config.register_token_id)
    rows = torch.cat(seq["masked_rows"])
    mask = spans_to_mask(seq["spans"], seq["ids"].numel()) if step_causal else None
    return Packed(seq["ids"], seq["positions"], mask, rows, ex.response[torch.cat(masked_blocks)],
                  1.0 / rows.numel(), seq["blocks"], len(clean_blocks), len(masked_blocks))


def collate(samples: list[Packed], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pad to one length: flat ids/positions (B*n,), mask (B, n, n), flat loss rows, targets, weights."""
    b, n = len(samples), max(s.ids.numel() for s in samples)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    positions = torch.zeros((b, n), dtype=torch.long)
    mask = torch.eye(n, dtype=torch.bool).repeat(b, 1, 1)  # pad rows see themselves only (no NaN rows)
    rows, targets, weights = [], [], []
    for i, s in enumerate(samples):
        t = s.ids.numel()
        ids[i, :t], positions[i, :t] = s.ids, s.positions
        mask[i, :t, :t] = True if s.mask is None else s.mask
        rows.append(i * n + s.loss_rows)
        targets.append(s.targets)
        weights.append(torch.full((s.loss_rows.numel(),), s.weight))
    return ids.view(-1), positions.view(-1), mask, torch.cat(rows), torch.cat(targets), torch.cat(weights)


def batch_loss(model: LLaDAMDM, samples: list[Packed], pad_id: int) -> Tensor:
    ids, positions, mask, rows, targets, weights = collate(samples, pad_id)
    logits = model(ids, positions, BatchedMaskAttention(mask), rows)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).sum() / len(samples)


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "dense"
    steps: int = 6000
    batch_size: int = 32  # image samples per batch (8x8 digits: ~75 rows for T2I, ~140 for edits)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    num_registers: int = 8  # 1/8 of a 64-token image (paper: 64 of 4096); 64 would cost more than dense on text
    # up to 16 cached blocks: a 16-step image plan caches one block per step (docs/results.md, the shipped SFT)
    max_clean_blocks: int = 16
    max_masked_blocks: int = 16  # small blocks too: an image step decodes a few of its 64 masks
    kept_masked_blocks: int = 2
    prompt_drop: float = 0.1
    # t2i, edit, text. Text loss was ~0.01 by the end at 0.55 while the image losses still fell: images get more
    # (0.4, 0.2, 0.4: digit-GenEval 0.78 -> 0.88 on a 2-seed probe, sums 0.995); the sparse SFT leans on images more
    task_weights: tuple[float, float, float] = (0.4, 0.2, 0.4)
    text_batch_multiplier: int = 4  # text rows (canvas <= 16) are ~4x shorter than T2I rows: larger batches (same cost)
    stop_at: int | None = None  # train only the first stop_at steps of the `steps`-long lr schedule
    text_lengths: tuple[int, ...] = TRAIN_GEN_LENGTHS  # the text canvases (answer + [EOS] padding) trained on
    # one canvas per text batch (rows shrink as it grows); False: a canvas per example, every text batch
    # batch_size x text_batch_multiplier rows (how stage 1 of the shipped dense recipe was trained)
    text_length_per_batch: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "max_clean_blocks", "max_masked_blocks", "kept_masked_blocks",
                     "text_batch_multiplier"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at must be >= 1, got {self.stop_at}")
        if not self.text_lengths or min(self.text_lengths) < 4:  # '▁' + 3 answer places
            raise ValueError(f"text_lengths must be canvases of >= 4 tokens, got {self.text_lengths}")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.task_weights) != len(TASKS) or min(self.task_weights) < 0 or sum(self.task_weights) <= 0:
            raise ValueError(f"task_weights must be {len(TASKS)} non-negative numbers, got {self.task_weights}")


def demo_image_generation() -> dict:
    """The demo checkpoints' image layout (config.json "image_generation"; see multimodal/layout.py)."""
    from sparse_lavida_vllm.training.data import SIDE
    from sparse_lavida_vllm.training.tokenizer import EDIT, IMAGE, IMAGE_TOKEN_OFFSET, NUM_LEVELS, T2I

    return {"codec": {"type": "pixel", "height": SIDE, "width": SIDE, "levels": NUM_LEVELS,
                      "token_offset": IMAGE_TOKEN_OFFSET},
            "t2i_prefix": [T2I], "edit_prefix": [EDIT, IMAGE],
            "defaults": {"steps": 16, "temperature": 0.8, "guidance_scale": 3.0, "image_guidance_scale": 0.0,
                         "schedule": "shift", "order": "stratified"}}


def demo_model_config(vocab_size: int, num_registers: int = 8) -> MDMConfig:
    """The demo shape: head_dim 32 (vLLM CPU supports it), ~1M parameters."""
    from sparse_lavida_vllm.training.tokenizer import EOS, MASK, PAD, REG, SPECIAL_TOKENS

    vocab = (vocab_size + 7) // 8 * 8
    return MDMConfig(vocab_size=vocab, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
                     max_sequence_length=1024, mask_token_id=SPECIAL_TOKENS.index(MASK),
                     register_token_id=SPECIAL_TOKENS.index(REG), eos_token_id=SPECIAL_TOKENS.index(EOS),
                     pad_token_id=SPECIAL_TOKENS.index(PAD), num_registers=num_registers,
                     image_generation=demo_image_generation())


def text_batch_rows(cfg: TrainConfig, gen_length: int) -> int:
    """Rows of a text batch whose canvas is gen_length: batch_size x text_batch_multiplier up to 16 tokens, then
    fewer in proportion (128 / 64 / 32 rows at 16 / 32 / 64 tokens with the defaults)."""
    return cfg.batch_size * cfg.text_batch_multiplier * 16 // max(16, gen_length)


def make_batch(cfg: TrainConfig, data: DemoData, config: MDMConfig, rng: random.Random,
               gen: torch.Generator) -> tuple[str, list[Packed]]:
    """One task per batch (similar lengths, little padding), drawn with the task weights."""
    task = rng.choices(TASKS, weights=cfg.task_weights)[0]
    if task != "text":
        examples = [data.sample(task, rng) for _ in range(cfg.batch_size)]
    elif cfg.text_length_per_batch:
        # one canvas per text batch (no padding); rows shrink as the canvas grows so a batch costs about the same
        gen_length = rng.choice(cfg.text_lengths)
        examples = [data.sample(task, rng, gen_length=gen_length) for _ in range(text_batch_rows(cfg, gen_length))]
    else:
        examples = [data.sample(task, rng, gen_length=rng.choice(cfg.text_lengths))
                    for _ in range(cfg.batch_size * cfg.text_batch_multiplier)]
    if cfg.mode == "dense":
        return task, [pack_dense(ex, config, gen, cfg.prompt_drop) for ex in examples]
    return task, [pack_sparse(ex, config, gen, cfg.num_registers, cfg.max_clean_blocks, cfg.max_masked_blocks,
                              cfg.kept_masked_blocks, cfg.mode == "sparse", cfg.prompt_drop) for ex in examples]


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, out: str | Path, tokenizer_folder: str | Path | None = None,
          init: str | Path | None = None, progress: bool = True) -> dict:
    """Train from scratch (dense) or fine-tune `init`; writes an HF checkpoint folder + train_log.jsonl."""
    from sparse_lavida_vllm.training.data import tokenizer_corpus
    from sparse_lavida_vllm.training.tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    source = init or tokenizer_folder
    tok = load_tokenizer(source) if source else train_tokenizer(tokenizer_corpus(cfg.seed))
    data = DemoData(tok, seed=0)  # the split is fixed across runs so eval never sees training digits
    if init:
        model = load_pretrained(init).train()
        # block_causal: only step-causal SFT makes a checkpoint that serves sparse by default (Table 8)
        config = MDMConfig(**{**asdict(model.config), "num_registers": cfg.num_registers,
                              "block_causal": cfg.mode == "sparse"})
        model.config = config
    else:
        config = replace(demo_model_config(tok.get_vocab_size(), cfg.num_registers), block_causal=cfg.mode == "sparse")
        model = random_model(config, seed=cfg.seed).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    log_path = out / "train_log.jsonl"
    start = time.time()
    total = cfg.steps if cfg.stop_at is None else min(cfg.stop_at, cfg.steps)
    bar = tqdm(range(total), desc=f"train {cfg.mode}", disable=not progress, mininterval=2)
    ema = None
    with log_path.open("w") as log:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            task, samples = make_batch(cfg, data, config, rng, gen)
            loss = batch_loss(model, samples, config.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.set_postfix(loss=f"{ema:.3f}")
            log.write(json.dumps({"step": step, "task": task, "loss": round(value, 5),
                                  "lr": round(lr_at(cfg, step), 6), "time_s": round(time.time() - start, 2)}) + "\n")
            log.flush()
    model.eval()
    save_pretrained(model, out)
    save_hf_tokenizer(tok, out)
    summary = {"train_config": asdict(cfg), "init": str(init) if init else None,
               "train_time_s": round(time.time() - start, 1), "final_loss_ema": round(ema, 4),
               "torch_threads": torch.get_num_threads()}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
