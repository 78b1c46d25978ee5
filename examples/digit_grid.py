"""Ask the served demo model for the ten digits ("a handwritten digit zero" .. "nine") and tile them into one PNG.

Run: .venv/bin/python examples/digit_grid.py [--base-url http://127.0.0.1:8000/v1] [--out digits.png]
Without --base-url it starts `sparse-lavida serve` (the bundled demo model) and stops it at the end. Each image is
also read by the held-out digit classifier of `sparse-lavida eval`, so the printout says whether the picture is the
prompted digit.
"""

from __future__ import annotations

import argparse
import base64
import io

import numpy as np
from PIL import Image
from serve_and_ask import running_server  # examples/serve_and_ask.py: start a server, stop it after

from sparse_lavida_vllm.training.data import DEMO_ROOT, DIGIT_WORDS, SIDE

SCALE = 8  # each generated pixel becomes an 8x8 block in the grid


def draw(base_url: str, style: str, seed: int) -> list[Image.Image]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    images = []
    for digit, word in enumerate(DIGIT_WORDS):
        caption = " ".join(w for w in ("a", style, "handwritten digit", word) if w)
        result = client.images.generate(model=model, prompt=caption, size=f"{SIDE}x{SIDE}",
                                        extra_body={"seed": seed + digit})
        images.append(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("L"))
    return images


def classify(images: list[Image.Image]) -> list[int]:
    """The eval's digit classifier (trained on the real training digits) on the generated pictures."""
    from sparse_lavida_vllm.training.data import DemoData
    from sparse_lavida_vllm.training.evaluate import DigitClassifier
    from sparse_lavida_vllm.training.tokenizer import load_tokenizer

    data = DemoData(load_tokenizer(DEMO_ROOT / "sparse"))
    # the demo codec maps its own PNGs back to their grey levels exactly
    levels = np.stack([data.codec.levels_of(data.codec.encode(im)).numpy().reshape(SIDE, SIDE) for im in images])
    return DigitClassifier(data).predict(levels).tolist()


def grid(images: list[Image.Image]) -> Image.Image:
    out = Image.new("L", (len(images) * (SIDE + 1) * SCALE, SIDE * SCALE), 255)
    for i, im in enumerate(images):
        out.paste(im.resize((SIDE * SCALE, SIDE * SCALE), Image.NEAREST), (i * (SIDE + 1) * SCALE, 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default=None, help="a running server's /v1 URL (default: start one)")
    parser.add_argument("--style", default="", help="a style word for every caption: thick, thin, ...")
    parser.add_argument("--seed", type=int, default=7, help="digit d uses seed + d")
    parser.add_argument("--out", default="digits.png")
    args = parser.parse_args()
    if args.base_url:
        images = draw(args.base_url, args.style, args.seed)
    else:
        with running_server() as base_url:
            images = draw(base_url, args.style, args.seed)
    grid(images).save(args.out)
    read = classify(images)
    print(f"wrote {args.out}; the classifier reads {read} (prompted 0..9: {sum(r == d for d, r in enumerate(read))}"
          "/10 agree)")


if __name__ == "__main__":
    main()
