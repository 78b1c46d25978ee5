"""Streamed images (stream=true, partial_images): OpenAI's image stream events through a real `sparse-lavida serve` of
the bundled demo model and the `openai` client's streaming iterator; the partial-image decode on a tiny LaViDa-O VQ."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_lavida_vllm.diffusion.planners import image_plan
from sparse_lavida_vllm.entrypoints.image_stream import PREVIEW_GREY, preview_steps, render_preview
from sparse_lavida_vllm.training.data import SIDE
from tests.serving_helpers import demo_server_fixtures

SIZE = 64  # pixels per side: the demo's 8x8 tokens upscaled 8x
CELL = SIZE // SIDE
STEPS = 16  # the demo checkpoint's default
PROMPT = "a handwritten digit five"


server, client = demo_server_fixtures("images-stream")  # tests/serving_helpers.py


def pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.size == (SIZE, SIZE)
    return np.asarray(image)


def undecoded_cells(image: np.ndarray) -> int:
    """Grey cells of a demo partial image: the pixel codec's levels are multiples of 17, so 128 is only a preview's
    position not decoded yet."""
    return int((image[::CELL, ::CELL] == PREVIEW_GREY).sum())


def _upload(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    buffer.name = "image.png"
    return buffer


def test_preview_steps_are_evenly_spaced_and_before_the_last_step():
    assert preview_steps(16, 3) == [3, 7, 11]
    assert preview_steps(16, 1) == [7]
    assert preview_steps(4, 3) == [0, 1, 2]
    assert preview_steps(2, 3) == [0]  # fewer than asked: the image has one step before its last
    assert preview_steps(1, 2) == []


@pytest.mark.slow
def test_generate_streams_partial_images_then_the_image_the_unstreamed_request_gets(client):
    body = {"seed": 7, "return_token_ids": True}
    events = list(client.images.generate(model="demo", prompt=PROMPT, size=f"{SIZE}x{SIZE}", stream=True,
                                         partial_images=2, quality="high", extra_body=body))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert (event.size, event.output_format, event.quality, event.background) == (f"{SIZE}x{SIZE}", "png",
                                                                                     "high", "auto")
        assert isinstance(event.created_at, int)
    done = events[-1]
    assert done.usage.output_tokens == SIDE * SIDE and done.usage.input_tokens_details.image_tokens == 0
    assert done.usage.total_tokens == done.usage.input_tokens + SIDE * SIDE
    alone = client.images.generate(model="demo", prompt=PROMPT, size=f"{SIZE}x{SIZE}", extra_body=body)
    assert done.b64_json == alone.data[0].b64_json  # byte-equal PNG: previews never change the sampling
    assert done.model_extra["token_ids"] == alone.data[0].model_extra["token_ids"]
    # each partial image is the canvas after its step: decoded positions as in the image, the rest grey
    final = pixels(done.b64_json)
    plan = image_plan(SIDE, SIDE, STEPS, "shift", "stratified", 5.0, torch.Generator().manual_seed(7))
    for event, step in zip(events[:2], preview_steps(STEPS, 2)):
        preview = pixels(event.b64_json)
        grey = preview == PREVIEW_GREY
        assert (preview[~grey] == final[~grey]).all()
        assert undecoded_cells(preview) == SIDE * SIDE - sum(len(s.positions) for s in plan.stages[:step + 1])
    assert undecoded_cells(final) == 0


@pytest.mark.slow
def test_zero_partial_images_stream_only_the_completed_event(client):
    events = list(client.images.generate(model="demo", prompt=PROMPT, stream=True, partial_images=0,
                                         extra_body={"seed": 3}))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert Image.open(io.BytesIO(base64.b64decode(events[0].b64_json))).size == (SIDE, SIDE)


@pytest.mark.slow
def test_n_two_streams_each_images_events_in_turn(client):
    body = {"seed": 40}
    events = list(client.images.generate(model="demo", prompt=PROMPT, n=2, size=f"{SIZE}x{SIZE}", stream=True,
                                         partial_images=1, extra_body=body))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"] * 2
    assert [e.partial_image_index for e in events[::2]] == [0, 0]
    together = client.images.generate(model="demo", prompt=PROMPT, n=2, size=f"{SIZE}x{SIZE}", extra_body=body)
    assert [events[1].b64_json, events[3].b64_json] == [d.b64_json for d in together.data]


@pytest.mark.slow
def test_edit_streams_too_and_equals_the_unstreamed_edit(client):
    source = Image.new("L", (SIDE, SIDE), 0)
    source.paste(255, (2, 1, 6, 7))
    body = {"seed": 5, "guidance_scale": 1.0, "image_guidance_scale": 1.0}
    events = list(client.images.edit(model="demo", image=_upload(source), prompt="make it thinner", stream=True,
                                     partial_images=3, size=f"{SIZE}x{SIZE}", extra_body=body))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 3 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    for event in events:
        pixels(event.b64_json)
    counts = [undecoded_cells(pixels(e.b64_json)) for e in events]
    assert counts[0] > counts[1] > counts[2] > counts[3] == 0  # coarse to fine
    usage = events[-1].usage
    assert usage.input_tokens_details.image_tokens == SIDE * SIDE  # the source image's tokens in the prompt
    assert usage.input_tokens_details.text_tokens == usage.input_tokens - SIDE * SIDE > 0
    alone = client.images.edit(model="demo", image=_upload(source), prompt="make it thinner",
                               size=f"{SIZE}x{SIZE}", extra_body=body)
    assert events[-1].b64_json == alone.data[0].b64_json


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{"stream": True, "partial_images": 4}, {"stream": True, "partial_images": -1},
                                    {"stream": True, "extra_body": {"partial_images": "two"}},
                                    {"stream": True, "extra_body": {"partial_images": 1.5}},
                                    {"partial_images": 1}, {"stream": False, "partial_images": 0}])
def test_bad_partial_images_is_a_400_naming_the_field_before_the_stream(client, kwargs):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="demo", prompt=PROMPT, **kwargs)
    assert err.value.body["param"] == "partial_images", err.value.body


@pytest.mark.slow
def test_bad_partial_images_on_an_edit_form_is_a_400(server, client):
    import requests

    files = {"image": ("image.png", _upload(Image.new("L", (SIDE, SIDE), 40)).getvalue(), "image/png")}
    for data in ({"prompt": "thicker", "stream": "true", "partial_images": "many"},
                 {"prompt": "thicker", "partial_images": "1"}):
        response = requests.post(server.base_url + "/v1/images/edits", files=files, data=data, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "partial_images", response.text
    ok = list(client.images.generate(model="demo", prompt=PROMPT, stream=True, partial_images=1))
    assert ok[-1].type == "image_generation.completed"


@pytest.mark.slow
def test_a_client_that_hangs_up_aborts_every_image_and_every_block_comes_back(server, client):
    import time

    import requests

    body = {"prompt": PROMPT, "stream": True, "partial_images": 3, "n": 4, "num_inference_steps": 64, "seed": 1}
    response = requests.post(server.base_url + "/v1/images/generations", json=body, stream=True, timeout=60)
    assert next(response.iter_lines()) == b"event: image_generation.partial_image"
    response.close()  # gone after the first event: the 4 images (64 steps each) are still running
    deadline = time.time() + 30
    while server.metric("vllm:num_requests_running") and time.time() < deadline:
        time.sleep(0.2)
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric("vllm:kv_cache_usage_perc") == 0  # I5
    assert "FINISHED_ABORTED" in server.log.read_text()
    list(client.images.generate(model="demo", prompt=PROMPT, stream=True, partial_images=3))  # still serving


# ---- LaViDa-O's VQ codec: the partial-image decode on a tiny checkpoint --------------------------------------

def test_lavida_o_partial_images_decode_through_the_vq(tmp_path):
    pytest.importorskip("diffusers")
    from transformers import AutoTokenizer

    from sparse_lavida_vllm.model_executor.lavida_o_weights import write_tiny_checkpoint
    from sparse_lavida_vllm.multimodal.lavida_o_layout import LaViDaOLayout
    from tests.entrypoints.test_lavida_o_serving import plain_lavida_config
    from tests.serving_helpers import TINY, save_char_tokenizer

    write_tiny_checkpoint(tmp_path, plain_lavida_config(), seed=0)
    save_char_tokenizer(tmp_path, TINY)
    layout = LaViDaOLayout.load(tmp_path, AutoTokenizer.from_pretrained(str(tmp_path)))
    size = (32, 32)  # the tiny VQ downsamples 4x: 8x8 codes, 4x4 positions of 2x2 codes
    rows, cols = layout.positions(size)
    ids, px = layout.patch_ids, layout.codec.downsample  # px: pixels per side of one code
    codes = torch.randint(0, ids.codebook, (rows * cols, 4), generator=torch.Generator().manual_seed(0))
    image = ids.pack(codes).tolist()
    assert render_preview(layout, image, size).tobytes() == layout.decode(torch.tensor(image), size).tobytes()
    # every third position still masked, and position 1 decoded in its top-left code only (LaViDa-O's per-code
    # sampler leaves patches partly decoded)
    undecoded = torch.zeros(rows * cols, 4, dtype=torch.bool)
    undecoded[::3] = True
    undecoded[1, 1:] = True
    canvas = ids.pack(torch.where(undecoded, ids.mask_code, codes)).tolist()
    preview = np.asarray(render_preview(layout, canvas, size))
    assert preview.shape == (size[1], size[0], 3)
    for position in range(rows * cols):
        for slot in range(4):  # raster inside the 2x2 patch
            y = (position // cols * 2 + slot // 2) * px
            x = (position % cols * 2 + slot % 2) * px
            assert (preview[y:y + px, x:x + px] == PREVIEW_GREY).all() == bool(undecoded[position, slot])
    blank = np.asarray(render_preview(layout, [ids.mask_id] * (rows * cols), size))
    assert (blank == PREVIEW_GREY).all()
