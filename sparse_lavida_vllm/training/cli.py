"""`sparse-lavida train dense|sparse`, `sparse-lavida eval` and `sparse-lavida tables` (the demo recipe)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from sparse_lavida_vllm.training.trainer import TrainConfig

SUBSET_METRICS = ("geneval", "arithmetic_accuracy", "edit_agreement")  # + the by-length arithmetic (LENGTH_KEYS)


def checkpoint_subset_config(sampler: str):
    """The small seeded subset tests/training re-run against the shipped checkpoints (recorded in the card)."""
    from sparse_lavida_vllm.training.evaluate import EvalConfig

    return EvalConfig(sampler=sampler, num_images=20, num_edits=10, num_text=50, num_text_per_length=20)


def _threads(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)


def cmd_train(args: argparse.Namespace) -> int:
    from sparse_lavida_vllm.training.trainer import train

    _threads(args)
    if args.kind == "sparse" and not args.init:
        raise SystemExit("train sparse needs --init (the dense checkpoint to fine-tune)")
    mode = "dense" if args.kind == "dense" else ("sparse" if not args.full_attention else "sparse_full")
    try:  # a bad flag gets one line naming it, not a traceback
        weights = tuple(float(w) for w in args.task_weights.split(","))
    except ValueError:
        bad = f"task_weights must be numbers t2i,edit,text, got {args.task_weights!r}"
        raise SystemExit(f"sparse-lavida train: {bad}") from None
    try:
        lengths = tuple(int(n) for n in args.text_lengths.split(","))
    except ValueError:
        bad = f"text_lengths must be integers like 4,8,16, got {args.text_lengths!r}"
        raise SystemExit(f"sparse-lavida train: {bad}") from None
    try:
        cfg = TrainConfig(mode=mode, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          num_registers=args.num_registers, max_clean_blocks=args.max_clean_blocks,
                          stop_at=args.stop_at, task_weights=weights, text_lengths=lengths,
                          text_length_per_batch=not args.text_length_per_example)
    except ValueError as e:
        raise SystemExit(f"sparse-lavida train: {e}") from None
    summary = train(cfg, args.out, tokenizer_folder=args.tokenizer, init=args.init)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sparse_lavida_vllm.entrypoints.hub import is_hub_id, resolve_model_arg
    from sparse_lavida_vllm.model_executor.weights import load_pretrained
    from sparse_lavida_vllm.training.data import DemoData
    from sparse_lavida_vllm.training.evaluate import LENGTH_KEYS, EvalConfig, evaluate, evaluate_seeds
    from sparse_lavida_vllm.training.tokenizer import load_tokenizer

    _threads(args)
    try:
        cfg = EvalConfig(sampler=args.sampler, num_registers=args.num_registers, num_images=args.num_images,
                         num_edits=args.num_edits, num_text=args.num_text,
                         num_text_per_length=args.num_text_per_length, image_steps=args.image_steps,
                         cfg_scale=args.cfg_scale, image_temperature=args.temperature, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"sparse-lavida eval: {e}") from None
    if args.card and is_hub_id(args.model):  # a snapshot's files are links into the shared HF cache
        raise SystemExit(f"--card writes the model card into the checkpoint folder: give a local folder, not the "
                         f"Hugging Face id {args.model}")
    folder = resolve_model_arg(args.model, args, field="MODEL")
    model = load_pretrained(folder)
    data = DemoData(load_tokenizer(folder))
    out = evaluate_seeds(model, data, cfg, args.seeds, show_progress=not args.json)
    if args.card:
        from sparse_lavida_vllm.training.card import write_model_card

        subset = checkpoint_subset_config(args.sampler)
        out["test_subset"] = {"eval_config": asdict(subset),
                              **{k: v for k, v in evaluate(model, data, subset, show_progress=False).items()
                                 if k in (*SUBSET_METRICS, *LENGTH_KEYS)}}
        write_model_card(args.model, out)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{len(out['seeds'])} seeds {out['seeds']}: mean ± std over seeds")
        for k, v in out["metrics"].items():
            print(f"{k}: {v['mean']:.4f} ± {v['std']:.4f}  {v['values']}")
        for sample in out["text_samples"]:
            print(f"{sample['prompt']} {sample['response']}")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from sparse_lavida_vllm.training.tables import run_tables

    _threads(args)
    run_tables(Path(args.dense), Path(args.sparse), Path(args.work), Path(args.doc), ablation_steps=args.ablation_steps,
               num_images=args.num_images, num_edits=args.num_edits, num_text=args.num_text, num_seeds=args.seeds,
               train_ablations=not args.no_ablation_training)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from sparse_lavida_vllm.entrypoints.hub import add_hub_arguments
    from sparse_lavida_vllm.training.evaluate import EVAL_SEEDS, EvalConfig

    defaults = TrainConfig()
    p = subparsers.add_parser("train", help="train the demo model: dense MDM, or step-causal SFT of it")
    p.add_argument("kind", choices=["dense", "sparse"])
    p.add_argument("--out", required=True, help="checkpoint folder to write (HF format)")
    p.add_argument("--init", help="checkpoint to fine-tune (required for sparse)")
    p.add_argument("--tokenizer", help="folder whose tokenizer to reuse (dense; default: train a new one). The "
                   "tokenizers library's Unigram trainer is not deterministic, so reproducing a checkpoint "
                   "bit for bit needs its tokenizer")
    p.add_argument("--steps", type=int, default=defaults.steps, help="length of the lr schedule")
    p.add_argument("--stop-at", type=int, default=None, help="stop (and save) after this many steps of the schedule")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--num-registers", type=int, default=defaults.num_registers)
    p.add_argument("--task-weights", default=",".join(str(w) for w in defaults.task_weights),
                   help="t2i,edit,text batch probabilities")
    p.add_argument("--text-lengths", default=",".join(str(n) for n in defaults.text_lengths),
                   help="text canvases (answer + [EOS] padding) trained on, drawn uniformly")
    p.add_argument("--text-length-per-example", action="store_true",
                   help="draw a canvas per example, not per batch (stage 1 of the shipped dense recipe)")
    p.add_argument("--max-clean-blocks", type=int, default=defaults.max_clean_blocks,
                   help="sparse SFT: a sample's clean tokens form 1..N cached blocks (the steps decoded before it)")
    p.add_argument("--full-attention", action="store_true",
                   help="sparse SFT without the step-causal mask (Table 8 ablation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP thrashing on a shared CPU)")
    p.set_defaults(func=cmd_train)

    e = EvalConfig()
    p = subparsers.add_parser("eval", help="digit-GenEval/FID, edit score and arithmetic accuracy of a checkpoint")
    p.add_argument("model", help="checkpoint folder or Hugging Face id org/name")
    add_hub_arguments(p)
    p.add_argument("--sampler", choices=["dense", "sparse"], default=e.sampler)
    p.add_argument("--num-registers", type=int, default=None, help="default: the checkpoint's num_registers")
    p.add_argument("--num-images", type=int, default=e.num_images)
    p.add_argument("--num-edits", type=int, default=e.num_edits)
    p.add_argument("--num-text", type=int, default=e.num_text)
    p.add_argument("--num-text-per-length", type=int, default=e.num_text_per_length,
                   help="held-out sums at each max_tokens 4, 8, 16, 32, 64 with the server's default plan")
    p.add_argument("--image-steps", type=int, default=e.image_steps)
    p.add_argument("--cfg-scale", type=float, default=e.cfg_scale)
    p.add_argument("--temperature", type=float, default=e.image_temperature)
    p.add_argument("--seed", type=int, default=e.seed, help="first eval seed")
    p.add_argument("--seeds", type=int, default=EVAL_SEEDS, help="eval seeds (seed, seed + 1, ...): mean ± std")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--card", action="store_true", help="write README.md (model card) + eval_results.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP thrashing on a shared CPU)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("tables", help="the small-scale Tables 7 and 8 into docs/results.md (+ plot)")
    p.add_argument("--dense", default="sparse_lavida_vllm/assets/demo/dense")
    p.add_argument("--sparse", default="sparse_lavida_vllm/assets/demo/sparse")
    p.add_argument("--work", default="runs/tables", help="folder for the ablation checkpoints")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--ablation-steps", type=int, default=300)
    p.add_argument("--num-images", type=int, default=e.num_images)
    p.add_argument("--num-edits", type=int, default=e.num_edits)
    p.add_argument("--num-text", type=int, default=e.num_text)
    p.add_argument("--seeds", type=int, default=EVAL_SEEDS, help="eval seeds per row (mean ± std)")
    p.add_argument("--no-ablation-training", action="store_true",
                   help="leave out the ablation rows whose SFT run is not in --work yet")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP thrashing on a shared CPU)")
    p.set_defaults(func=cmd_tables)
