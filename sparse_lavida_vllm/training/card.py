"""The model card (README.md) of a demo checkpoint: data, recipe, seed, training time and its eval table."""

from __future__ import annotations

import json
from pathlib import Path

from sparse_lavida_vllm.training.data import SHIFT, SIDE, TEXT_GEN_LENGTH, TRAIN_GEN_LENGTHS
from sparse_lavida_vllm.training.evaluate import ARITHMETIC_LENGTHS, length_key, server_text_params
from sparse_lavida_vllm.training.trainer import TrainConfig, text_batch_rows

EVALS = """sparse-lavida eval sparse_lavida_vllm/assets/demo/dense --sampler dense --card
sparse-lavida eval sparse_lavida_vllm/assets/demo/sparse --sampler sparse --card"""
DEMO = "sparse_lavida_vllm/assets/demo"


def dense_stages(dense: Path) -> list[dict]:
    """The dense recipe's stage summaries in order: train_summary_stage1.json, _stage2 ..., then train_summary.json."""
    earlier = sorted(dense.glob("train_summary_stage*.json"), key=lambda f: int(f.stem.rsplit("stage", 1)[1]))
    return [json.loads(f.read_text()) for f in [*earlier, dense / "train_summary.json"]]


def _command(kind: str, summary: dict, init: str | None, out: str) -> str:
    tc = summary["train_config"]
    default_weights = ",".join(str(w) for w in TrainConfig().task_weights)
    weights = ",".join(str(w) for w in tc["task_weights"])
    parts = [f"sparse-lavida train {kind}", f"--init {init}" if init else f"--tokenizer {DEMO}/dense", f"--out {out}",
             f"--steps {tc['steps']}"]
    if tc.get("stop_at"):
        parts.append(f"--stop-at {tc['stop_at']}")
    if kind == "dense" and tc["lr"] != TrainConfig().lr:
        parts.append(f"--lr {tc['lr']}")
    lengths = tuple(tc.get("text_lengths", TrainConfig().text_lengths))
    if lengths != TrainConfig().text_lengths:
        parts.append("--text-lengths " + ",".join(str(n) for n in lengths))
    if not tc.get("text_length_per_batch", True):
        parts.append("--text-length-per-example")
    if weights != default_weights:
        parts.append(f"--task-weights {weights}")
    if kind == "sparse":
        parts += [f"--lr {tc['lr']}", f"--num-registers {tc['num_registers']}",
                  f"--max-clean-blocks {tc['max_clean_blocks']}"]
    if summary.get("torch_threads", 1) != 1:  # the thread count changes float sums, so it is part of the recipe
        parts.append(f"--threads {summary['torch_threads']}")
    return " ".join(parts)


def _lr_fraction(tc: dict) -> float:
    """lr at the stop step as a fraction of the peak (the trainer's cosine schedule)."""
    from sparse_lavida_vllm.training.trainer import TrainConfig, lr_at

    cfg = TrainConfig(**{**tc, "task_weights": tuple(tc["task_weights"])})
    return lr_at(cfg, cfg.stop_at or cfg.steps) / cfg.lr


def recipe(demo_root: Path) -> tuple[str, float]:
    """The training commands (from the shipped summaries) and their summed wall time in minutes."""
    stages = dense_stages(demo_root / "dense")
    sparse = json.loads((demo_root / "sparse" / "train_summary.json").read_text())
    lines, init = [], None
    for k, summary in enumerate(stages, 1):
        out = f"{DEMO}/dense" if k == len(stages) else f"runs/dense_stage{k}"
        lines.append(_command("dense", summary, init, out))
        init = out
    lines.append(_command("sparse", sparse, f"{DEMO}/dense", f"{DEMO}/sparse"))
    minutes = sum(s["train_time_s"] for s in [*stages, sparse]) / 60
    return "\n".join(lines) + "\n" + EVALS, minutes


TARGETS = {"arithmetic_accuracy": 0.95, "geneval": 0.9, "edit_agreement": 0.8}
LABELS = {
    "geneval": "digit-GenEval ({num_images} held-out captions)",
    "fid": "digit-FID (classifier features vs held-out digits)",
    "style_agreement": "style agreement (thick/thin, slant words)",
    "edit_agreement": "edit agreement ({num_edits} edits: output nearest the requested target)",
    "edit_classifier_agreement": "edit classifier agreement (classifier reads output and target alike)",
    "edit_pixel_error": "edit pixel error",
    "arithmetic_accuracy": "arithmetic exact match ({num_text} held-out sums)",
    **{length_key(g): f"arithmetic at max_tokens {g}, server defaults ({{num_text_per_length}} held-out sums)"
       for g in ARITHMETIC_LENGTHS},
    "forward_tokens_per_image": "forward tokens per image",
    "forward_tokens_per_answer": "forward tokens per answer",
}


def _fmt(key: str, value: float) -> str:
    return f"{value:.0f}" if key.startswith("forward") else f"{value:.2f}" if key == "fid" else f"{value:.3f}"


def write_model_card(folder: str | Path, results: dict) -> Path:
    folder = Path(folder)
    summary = json.loads((folder / "train_summary.json").read_text())
    tc = summary["train_config"]
    config = json.loads((folder / "config.json").read_text())
    ev = results["eval_config"]
    sparse = tc["mode"] != "dense"
    commands, recipe_minutes = recipe(folder.parent)
    stage_note = ""
    if not sparse:
        notes = []
        for k, st in enumerate(dense_stages(folder)[:-1], 1):
            c = st["train_config"]
            stop = (f", stopped after {c['stop_at']} steps (lr then {c['lr'] * _lr_fraction(c):.2g}; the session's "
                    "time budget ran out)" if c.get("stop_at") else "")
            notes.append(f"stage {k} (log `train_log_stage{k}.jsonl`): lr {c['lr']}, {c['steps']}-step cosine schedule"
                         f"{stop}, task mix {c['task_weights']}, {st['train_time_s'] / 60:.1f} min, final loss (EMA) "
                         f"{st['final_loss_ema']}")
        if notes:
            stage_note = ("This checkpoint is the last stage of the dense recipe; earlier stages: " + "; ".join(notes)
                          + ". The last stage trains every text canvas the server builds (4 to 64 tokens, answers "
                          "padded with [EOS]) so sums come out right at any max_tokens; the same canvases from scratch "
                          "(6500 steps) had not learned addition (held-out exact match 0.075 at 8 tokens).")
    d, layers, mlp, vocab = config["d_model"], config["n_layers"], config["mlp_hidden_size"], config["vocab_size"]
    params = layers * (4 * d * d + 3 * d * mlp + 2 * d) + 2 * vocab * d + d
    size_mb = (folder / "model.safetensors").stat().st_size / 2**20
    reg_note = ("the register count it was fine-tuned with" if sparse else
                "the count the sparse sampler uses by default; the dense model never saw [reg]")
    if sparse:
        method = (f"Sparse SFT: per sample t ~ U(0,1); clean tokens in 1..{tc['max_clean_blocks']} random blocks, "
                  f"masked tokens cut into 1..{tc['max_masked_blocks']} random blocks of which "
                  f"{tc['kept_masked_blocks']} are kept (the rest truncated), each followed by its "
                  f"{tc['num_registers']} register copies; "
                  + ("trained under the Algorithm 1 mask." if tc["mode"] == "sparse" else
                     "one masked block kept, FULL attention (no step-causal mask)."))
    else:
        method = ("Dense: mask each answer token with probability t ~ U(0,1); CE on masked tokens weighted "
                  "1/(number of masks), eq. 1's 1/(tL) with the realised count.")
    kind = ("step-causal SFT (Algorithm 1) of the dense demo model" if tc["mode"] == "sparse"
            else "vanilla masked diffusion model (eq. 1 loss, full attention)")
    m = results["metrics"]
    rows = "\n".join(f"| {LABELS[k].format(**ev)} | {_fmt(k, m[k]['mean'])} ± {_fmt(k, m[k]['std'])} | "
                     f"{', '.join(_fmt(k, v) for v in m[k]['values'])} |" for k in LABELS if k in m)
    met = [f"{LABELS[k].split(' (')[0]} >= {goal}: {'met' if m[k]['mean'] >= goal else 'NOT met'}"
           for k, goal in TARGETS.items() if k in m]
    by_length = [m[length_key(g)]["mean"] for g in ARITHMETIC_LENGTHS if length_key(g) in m]
    if by_length:  # issue 24: the answer is right at whatever max_tokens a client asks for
        goal = TARGETS["arithmetic_accuracy"]
        met.append(f"arithmetic at every max_tokens {ARITHMETIC_LENGTHS[0]}..{ARITHMETIC_LENGTHS[-1]} >= {goal}: "
                   + ("met" if min(by_length) >= goal else "NOT met"))
    targets = "; ".join(met)
    plans = "; ".join(f"{g} -> block {p.block_length}, {p.steps} steps"
                      for g, p in ((g, server_text_params(g)) for g in ARITHMETIC_LENGTHS))
    train_cfg = TrainConfig(**{**tc, "task_weights": tuple(tc["task_weights"]),
                               "text_lengths": tuple(tc.get("text_lengths", TRAIN_GEN_LENGTHS))})
    lengths = sorted(set(train_cfg.text_lengths))
    text_rows = (", ".join(f"{text_batch_rows(train_cfg, n)} rows at {n}" for n in lengths) + " tokens"
                 if train_cfg.text_length_per_batch else
                 f"{train_cfg.batch_size * train_cfg.text_batch_multiplier} rows of canvases {lengths}")
    note = f" **Note: {results['note']}.**" if results.get("note") else ""
    per_edit = ", ".join(f"{name} {value:.2f}" for name, value in results.get("edit_by_instruction", {}).items())
    edit_note = ("Edit agreement: the output is nearer (mean absolute pixel difference) to the requested edit's target "
                 "than to the unedited source and to every other instruction's target; per instruction: "
                 f"{per_edit}. The classifier agreement is shown for comparison only: most edit targets of an 8x8 "
                 "digit (2 px shifts, thickening, inversion) are not digits the classifier can read."
                 if per_edit else "")
    threads = f"{summary['torch_threads']} torch thread" + ("s" if summary["torch_threads"] != 1 else "")
    samples = "; ".join(f"`{x['prompt']}` -> `{x['response']}`" for x in results.get("text_samples", [])[:3])
    text = f"""# Sparse-LaViDa demo model: `{folder.name}`

A tiny unified masked discrete diffusion model (LLaDA architecture, {layers} layers, d_model {d},
{config['n_heads']} heads of dim {d // config['n_heads']}, SwiGLU MLP {mlp}, vocab {vocab}; {params / 1e6:.2f} M
parameters, {size_mb:.1f} MB fp32) trained on CPU in minutes, so the project has a real checkpoint to serve, test
and compare.
This folder: **{kind}**. `num_registers` in config.json = {config['num_registers']}
({reg_note}).

Tasks: text-to-image ({SIDE}x{SIDE} digits, 16 grey levels: one token per pixel, `<img_0>`..`<img_15>`), image
editing (thicker / shift left or right by {SHIFT} pixels / invert / flip), arithmetic (`Q: 37+48=? A:` -> `85`, two
numbers 0..99; the answer right-aligned in 4 tokens, padded with `[EOS]` to the canvas as LLaDA's SFT pads, trained on
every canvas the server builds for `max_tokens` 4..64: {', '.join(str(n) for n in TRAIN_GEN_LENGTHS)} tokens, one per
text batch). Sequence formats: `<t2i> caption` -> {SIDE * SIDE} image tokens;
`<edit> <image> [{SIDE * SIDE} source tokens] instruction` -> {SIDE * SIDE} image tokens; `Q: ... A:` -> `max_tokens`
text tokens.

## Data (no downloads)
scikit-learn's 1797 handwritten 8x8 digits at their own resolution, quantized to 16 levels; captions from
the label plus styles computed from the pixels (thick/thin by ink tertile within the class, slanted left/right by
the ink's shear); edits computed deterministically; synthetic sums. A fixed seeded 80/20 split of the digits
(eval uses only the held-out 20%); about 10% of all sums are never trained on (eval uses only those), chosen by a
hash of the whole sum so that every units-digit pair and carry pattern still occurs in training.

## Tokenizer
`tokenizer.json` is a Unigram model (sentencepiece-style, Metaspace word marks) whose pieces are every word of
the synthetic corpus plus single characters, so a caption word is one token and digits are always single tokens;
built deterministically by the recipe from the corpus. Fixed special tokens:
`[PAD]`=0, `[UNK]`=1, `[EOS]`=2, `[M]`=3 (mask_token_id), `[reg]`=4 (register_token_id), `<t2i>`, `<edit>`,
`<image>`, `<img_0>`..`<img_15>` = 8..23. `AutoTokenizer.from_pretrained(folder)` loads it offline; the chat
template turns user turns into `Q: ...` and adds the assistant header ` A:`.
The recipe reuses this tokenizer (`--tokenizer`); with the same tokenizer, seed and torch thread count a fresh run
reproduces these weights (CI checks that the first losses equal `train_log.jsonl`).

## Recipe (seed {tc['seed']})
```
{commands}
```
The trainings together took {recipe_minutes:.1f} min of wall time on this 2-core CPU, one after the other, with
{threads} each (`--threads`; 2 threads train ~1.5x faster per step than 1 on 2 free
cores), while other jobs shared the machine at times.
Training: AdamW (betas 0.9/0.98, wd {tc['weight_decay']}), lr {tc['lr']} cosine to {tc['min_lr_ratio']}x, warmup
{tc['warmup']}, batch {tc['batch_size']} (text: {text_rows}), {tc['steps']} steps,
task mix t2i/edit/text = {tc['task_weights']}, prompt dropout {tc['prompt_drop']} for CFG.
{method}
{stage_note}
Training time of this run: {summary['train_time_s'] / 60:.1f} min; final loss
(EMA) {summary['final_loss_ema']}. The loss log is `train_log.jsonl`.

## Evaluation ({ev['sampler']} sampler, seeds {results['seeds']}: mean ± std over seeds)
Images: {ev['image_steps']} steps, stratified order, shift schedule, temperature {ev['image_temperature']},
CFG scale {ev['cfg_scale']} (uncond = prompt replaced by `[M]`). Text: gen length {TEXT_GEN_LENGTH}, block
{ev['text_block_length']}, {ev['text_steps']} steps, greedy, low-confidence remasking. Arithmetic by length: what
`sparse-lavida serve` runs for a text request with only `max_tokens` and `temperature 0` (scheduler/params.py's
defaults, max_tokens {plans}; greedy, low-confidence remasking, the {ev['sampler']} sampler), the same held-out sums
at every length. Each seed draws other held-out prompts, sums and sampling noise.{note}

| metric | mean ± std | per seed |
|---|---|---|
{rows}

Classifier held-out accuracy on real digits: {results['classifier_held_out_accuracy']:.3f}.
Targets of the demo (issues 9 and 24), by the means above: {targets}.
{edit_note}
Style agreement: fraction of style words the image follows (thick / thin = ink above / below the class's median
ink among real training digits; slanted right / left = positive / negative shear); chance is about 0.5.
Samples: {samples}.
Command: `sparse-lavida eval {DEMO}/{folder.name} --sampler {ev['sampler']}` (every row, the by-length arithmetic
included). CI re-runs a small seeded subset (`test_subset` in eval_results.json) and asks a served checkpoint 40
held-out sums at each `max_tokens` (`tests/entrypoints/test_demo_sums.py`). See docs/results.md for Tables 7 and 8.
"""
    path = folder / "README.md"
    path.write_text(text)
    (folder / "eval_results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "images"},
                                                         indent=2) + "\n")
    return path
