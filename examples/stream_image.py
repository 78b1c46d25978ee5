"""A streamed image with the official `openai` client: partial images (the committed canvas, coarse to fine), then
the image; saves each one and a strip of all of them.

Run: .venv/bin/python examples/stream_image.py [--base-url http://127.0.0.1:8000/v1] [--out-dir images]
Without --base-url it starts `sparse-lavida serve` (the bundled demo model) and stops it at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
import time
from pathlib import Path

from PIL import Image
from serve_and_ask import running_server  # examples/serve_and_ask.py: start a server, stop it after


def run(base_url: str, out_dir: Path, prompt: str, partial_images: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    out_dir.mkdir(parents=True, exist_ok=True)
    start, images = time.perf_counter(), []
    stream = client.images.generate(model=model, prompt=prompt, size="64x64", stream=True,
                                    partial_images=partial_images, extra_body={"seed": 7})
    for event in stream:  # image_generation.partial_image (partial_image_index 0..k-1), then .completed
        image = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        name = (f"partial-{event.partial_image_index}.png" if event.type.endswith("partial_image")
                else "streamed.png")
        image.save(out_dir / name)
        images.append(image)
        print(f"{time.perf_counter() - start:6.2f} s  {event.type:32s} -> {out_dir / name}")
    print(f"usage: {event.usage.input_tokens} prompt tokens, {event.usage.output_tokens} image tokens")
    strip = Image.new(images[0].mode, (sum(i.size[0] for i in images), images[0].size[1]))
    for k, image in enumerate(images):
        strip.paste(image, (k * image.size[0], 0))
    strip.save(out_dir / "stream_strip.png")
    print(f"wrote {out_dir / 'stream_strip.png'} (grey: positions not decoded yet)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default=None, help="a running server's /v1 URL (default: start one)")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or Hugging Face id to serve when starting one (default: the demo)")
    parser.add_argument("--prompt", default="a thick handwritten digit seven")
    parser.add_argument("--partial-images", type=int, default=3, help="0-3 previews before the image")
    parser.add_argument("--out-dir", default="images")
    args = parser.parse_args()
    if args.base_url:
        run(args.base_url, Path(args.out_dir), args.prompt, args.partial_images)
        return
    with running_server(args.model) as base_url:
        run(base_url, Path(args.out_dir), args.prompt, args.partial_images)


if __name__ == "__main__":
    main()
