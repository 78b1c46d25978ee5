"""Text-to-image, editing and inpainting with the official `openai` client against `sparse-lavida serve`; saves PNGs.

Run: .venv/bin/python examples/images_openai.py [--base-url http://127.0.0.1:8000/v1] [--out-dir images]
Without --base-url it starts `sparse-lavida serve` (the bundled demo model) and stops it at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

from PIL import Image
from serve_and_ask import running_server  # examples/serve_and_ask.py: start a server, stop it after


def save(result, path: Path) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    image.save(path)
    metrics = (result.model_extra or {}).get("sparse_lavida_metrics", [{}])[0]
    print(f"wrote {path} {image.size[0]}x{image.size[1]}: {metrics.get('steps')} steps, "
          f"{metrics.get('forward_tokens')} forward tokens (dense: {metrics.get('dense_forward_tokens')})")
    return image


def png_file(image: Image.Image, name: str) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    buffer.name = name
    return buffer


def run(base_url: str, out_dir: Path, prompt: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    out_dir.mkdir(parents=True, exist_ok=True)
    # text-to-image; the extra fields (seed, guidance_scale, num_inference_steps, sparse, ...) ride in extra_body
    drawn = save(client.images.generate(model=model, prompt=prompt, size="64x64", extra_body={"seed": 7}),
                 out_dir / "generated.png")
    # editing: the whole picture is redrawn under the instruction (three-way guidance when image_guidance_scale > 0)
    save(client.images.edit(model=model, image=png_file(drawn, "source.png"), prompt="invert the colours",
                            size="64x64", extra_body={"seed": 7}), out_dir / "edited.png")
    # inpainting: transparent pixels of the mask are repainted, everything else is kept token for token
    mask = Image.new("RGBA", drawn.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, drawn.size[0] // 2, drawn.size[1]))
    save(client.images.edit(model=model, image=png_file(drawn, "source.png"), mask=png_file(mask, "mask.png"),
                            prompt="invert the colours", size="64x64", extra_body={"seed": 7}),
         out_dir / "inpainted.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default=None, help="a running server's /v1 URL (default: start one)")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or Hugging Face id to serve when starting one (default: the demo)")
    parser.add_argument("--prompt", default="a thick handwritten digit seven")
    parser.add_argument("--out-dir", default="images")
    args = parser.parse_args()
    if args.base_url:
        run(args.base_url, Path(args.out_dir), args.prompt)
        return
    with running_server(args.model) as base_url:
        run(base_url, Path(args.out_dir), args.prompt)

if __name__ == "__main__":
    main()
