"""Quality through a real `sparse-lavida serve` and the openai client: digit-GenEval, edit agreement, arithmetic.

The same held-out data and classifier as `sparse-lavida eval` (training/evaluate.py), but every sample goes
through the HTTP routes a user calls (/v1/images/generations, /v1/images/edits, /v1/completions) with the
checkpoint's default knobs, sparse and dense, over several eval seeds (mean and spread).
Usage: python benchmarks/server_quality.py [--base-url URL] [--images 20] [--edits 10] [--sums 20] [--seeds 3]
       [--json [PATH]]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sparse_lavida_vllm.training.data import DEMO_ROOT, EDITS, DemoData, edit_followed, final_number, text_prompt
from sparse_lavida_vllm.training.evaluate import DigitClassifier, EvalConfig
from sparse_lavida_vllm.training.tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from serve_and_ask import running_server  # noqa: E402  (examples/: start a server, stop it after)


def levels_of(b64: str, data: DemoData) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return (data.codec.encode(image) - data.codec.token_offset).numpy().reshape(data.codec.grid)


def png_of(levels: np.ndarray, data: DemoData) -> io.BytesIO:
    buffer = io.BytesIO()
    data.codec.decode(data.image_ids(levels)).save(buffer, format="PNG")
    buffer.seek(0)
    buffer.name = "source.png"
    return buffer


def run_seed(client, model: str, data: DemoData, clf: DigitClassifier, args, seed: int, sparse: bool) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {}
    start = time.perf_counter()
    if args.images:
        order = rng.permutation(data.test_idx)[:args.images]
        images = [levels_of(client.images.generate(model=model, prompt=data.captions[i], size="16x16",
                                                   extra_body={"seed": seed * 1000 + k, "sparse": sparse}
                                                   ).data[0].b64_json, data) for k, i in enumerate(order)]
        out["geneval"] = float((clf.predict(np.stack(images)) == data.labels[order]).mean())
    if args.edits:
        order = rng.permutation(data.test_idx)[:args.edits]
        followed = []
        for k, i in enumerate(order):
            instruction = EDITS[k % len(EDITS)]
            result = client.images.edit(model=model, image=png_of(data.levels[i], data), prompt=instruction,
                                        extra_body={"seed": seed * 1000 + k, "sparse": sparse})
            followed.append(edit_followed(data.levels[i], levels_of(result.data[0].b64_json, data), instruction))
        out["edit_agreement"] = float(np.mean(followed))
    if args.sums:
        cfg, text_rng, correct = EvalConfig(), random.Random(seed), 0
        for _ in range(args.sums):
            ex = data.text_example(text_rng, held_out=True)
            question = data.tok.decode(ex.prompt.tolist())
            reply = client.completions.create(
                model=model, prompt=question if question.startswith("Q:") else text_prompt(question),
                max_tokens=ex.response.numel(), temperature=0.0,
                extra_body={"vllm_xargs": {"steps": cfg.text_steps, "block_length": cfg.text_block_length,
                                           "sparse": sparse}})
            correct += final_number(reply.choices[0].text) == str(ex.label)
        out["arithmetic_accuracy"] = correct / args.sums
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def summarize(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if k != "seconds"]
    return {k: {"mean": round(statistics.mean(r[k] for r in runs), 4),
                "spread": round(max(r[k] for r in runs) - min(r[k] for r in runs), 4),
                "per_seed": [r[k] for r in runs]} for k in keys}


def measure(base_url: str, args) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    folder = Path(args.model or DEMO_ROOT / "sparse")
    data = DemoData(load_tokenizer(folder))
    clf = DigitClassifier(data)
    result = {"model": str(folder), "classifier_held_out_accuracy": clf.held_out_accuracy,
              "samples_per_seed": {"images": args.images, "edits": args.edits, "sums": args.sums},
              "eval_seeds": list(range(1, args.seeds + 1))}
    for mode, sparse in (("sparse", True), ("dense", False)):
        runs = [run_seed(client, model, data, clf, args, seed, sparse) for seed in result["eval_seeds"]]
        result[mode] = {**summarize(runs), "seconds": sum(r["seconds"] for r in runs)}
        print(mode, json.dumps(result[mode]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default=None, help="a running server's /v1 URL (default: start one)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled sparse demo model)")
    parser.add_argument("--images", type=int, default=20, help="text-to-image samples per eval seed")
    parser.add_argument("--edits", type=int, default=10, help="edits per eval seed")
    parser.add_argument("--sums", type=int, default=20, help="held-out sums per eval seed")
    parser.add_argument("--seeds", type=int, default=3, help="eval seeds (mean and spread over them)")
    parser.add_argument("--json", nargs="?", const=str(HERE / "results" / "server_quality.json"), default=None)
    args = parser.parse_args()
    if args.base_url:
        result = measure(args.base_url, args)
    else:
        with running_server(args.model) as base_url:
            result = measure(base_url, args)
    result["date_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
