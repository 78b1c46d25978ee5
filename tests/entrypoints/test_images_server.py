"""The OpenAI images API through a real `sparse-lavida serve` of the bundled demo model and the `openai` client."""

import base64
import io

import pytest
import torch
from PIL import Image

from sparse_lavida_vllm.diffusion.planners import image_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.weights import load_pretrained
from sparse_lavida_vllm.multimodal.layout import ImageLayout
from sparse_lavida_vllm.training.data import DEMO_ROOT, SIDE, DemoData
from sparse_lavida_vllm.training.tokenizer import load_tokenizer
from tests.serving_helpers import demo_server_fixtures

pytestmark = pytest.mark.slow
MODEL = DEMO_ROOT / "sparse"
NATIVE = f"{SIDE}x{SIDE}"  # the demo codec's own size (one pixel per token)


server, client = demo_server_fixtures("images")  # tests/serving_helpers.py


@pytest.fixture(scope="module")
def demo():
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    config = json.loads((MODEL / "config.json").read_text())
    layout = ImageLayout.from_config(config["image_generation"], MODEL, tokenizer.get_vocab().get)
    return load_pretrained(MODEL), tokenizer, layout


def png(data) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.b64_json)))


def tokens_of(image: Image.Image, layout: ImageLayout) -> list[int]:
    return layout.codec.encode(image).tolist()  # the pixel codec maps its own PNGs back to their tokens exactly


def reference_image(demo, prompt_ids: list[int], seed: int, sparse: bool, guidance: float, steps: int = 16):
    model, _, layout = demo
    d = layout.defaults
    sampling = SamplingConfig(temperature=d["temperature"], seed=seed, cfg_scale=guidance,
                              token_range=layout.token_range)
    plan = image_plan(*layout.codec.grid, steps, d["schedule"], d["order"], 5.0, torch.Generator().manual_seed(seed))
    prompt = torch.tensor(prompt_ids)
    if sparse:
        return generate_sparse(model, prompt, plan, sampling, SparseOptions(model.config.num_registers)).tokens.tolist()
    return generate_dense(model, prompt, plan, sampling).tokens.tolist()


def test_generate_returns_pngs_of_the_requested_size(client):
    result = client.images.generate(model="demo", prompt="a thick handwritten digit seven", n=2, size="64x64")
    assert len(result.data) == 2
    for data in result.data:
        image = png(data)
        assert image.format == "PNG" and image.size == (64, 64)
    metrics = result.model_extra["sparse_lavida_metrics"]
    assert metrics[0]["mode"] == "sparse" and metrics[0]["forward_tokens"] < metrics[0]["dense_forward_tokens"]


@pytest.mark.parametrize("sparse, guidance", [(True, 0.0), (True, 2.0), (False, 2.0)])
def test_i4_server_image_equals_the_reference_sampler(client, demo, sparse, guidance):
    _, tokenizer, layout = demo
    caption = "a thin handwritten digit three"
    prompt_ids = layout.t2i_prompt(tokenizer.encode(caption, add_special_tokens=False))
    # the route lays the prompt out exactly as the model was trained on it
    assert prompt_ids == DemoData(load_tokenizer(MODEL)).t2i_prompt(caption).tolist()
    result = client.images.generate(model="demo", prompt=caption, size=NATIVE,
                                    extra_body={"seed": 11, "sparse": sparse, "guidance_scale": guidance})
    assert tokens_of(png(result.data[0]), layout) == reference_image(demo, prompt_ids, 11, sparse, guidance)


def test_n_images_in_one_request_equal_separate_seeded_requests(client):
    body = {"seed": 100, "guidance_scale": 1.0}
    together = client.images.generate(model="demo", prompt="a handwritten digit four", n=3, size=NATIVE,
                                      extra_body=body)
    for i, data in enumerate(together.data):
        alone = client.images.generate(model="demo", prompt="a handwritten digit four", size=NATIVE,
                                       extra_body={**body, "seed": 100 + i})
        assert png(data).tobytes() == png(alone.data[0]).tobytes()


def _upload(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    buffer.name = "image.png"
    return buffer


def test_inpainting_keeps_every_token_outside_the_mask_and_all_keep_returns_the_source(client, demo):
    layout = demo[2]
    source = png(client.images.generate(model="demo", prompt="a handwritten digit eight", size=NATIVE,
                                        extra_body={"seed": 5}).data[0])
    mask = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, SIDE // 2, SIDE))  # transparent left half: repaint it
    result = client.images.edit(model="demo", image=_upload(source), mask=_upload(mask),
                                prompt="invert the colours", size=NATIVE, extra_body={"seed": 9})
    before, after = tokens_of(source, layout), tokens_of(png(result.data[0]), layout)
    right = [i for i in range(SIDE * SIDE) if i % SIDE >= SIDE // 2]
    assert all(after[i] == before[i] for i in right)
    assert any(after[i] != before[i] for i in range(SIDE * SIDE) if i % SIDE < SIDE // 2)  # the left half was repainted
    keep_all = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255))
    same = client.images.edit(model="demo", image=_upload(source), mask=_upload(keep_all), prompt="invert the colours")
    assert tokens_of(png(same.data[0]), layout) == before


def test_edit_without_mask_runs_three_way_guidance(client):
    source = Image.new("L", (2 * SIDE, 2 * SIDE), 0)  # twice the native size: the codec scales it down
    source.paste(255, (SIDE * 3 // 4, SIDE // 4, SIDE * 5 // 4, SIDE * 7 // 4))
    result = client.images.edit(model="demo", image=_upload(source), prompt="shift it left",
                                extra_body={"seed": 1, "guidance_scale": 1.0, "image_guidance_scale": 1.0})
    assert png(result.data[0]).size == (SIDE, SIDE)
    assert result.model_extra["sparse_lavida_metrics"][0]["steps"] == 16


def _bad_generations():
    return [
        ({"size": "17x17"}, "size"), ({"size": "big"}, "size"), ({"n": 0}, "n"), ({"n": 1000}, "n"),
        ({"response_format": "url"}, "response_format"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"extra_body": {"num_inference_steps": 257}}, "num_inference_steps"),
        ({"extra_body": {"order": "zigzag"}}, "order"), ({"extra_body": {"schedule": 3}}, "schedule"),
        ({"extra_body": {"guidance_scale": "lots"}}, "guidance_scale"),
        ({"extra_body": {"guidance_scale": True}}, "guidance_scale"), ({"extra_body": {"seed": -1}}, "seed"),
        ({"extra_body": {"image_guidance_scale": 1.0}}, "image_guidance_scale"),
        ({"extra_body": {"negative_prompt": "a digit one", "guidance_scale": 0}}, "negative_prompt"),
        ({"extra_body": {"guidance_interval": [0.8, 0.2]}}, "guidance_interval"),
        ({"extra_body": {"temperature": -1}}, "temperature"),
        ({"extra_body": {"num_registers": 10**9}}, "num_registers"),
        ({"extra_body": {"colour": "red"}}, "colour"), ({"prompt": ""}, "prompt"),
        ({"extra_body": {"per_code": True}}, "per_code"),  # LaViDa-O's sampler: the demo has 1 token per position
        ({"extra_body": {"per_code": "yes"}}, "per_code"),
    ]


@pytest.mark.parametrize("kwargs, field", _bad_generations())
def test_bad_generation_fields_are_a_400_naming_the_field(client, kwargs, field):
    import openai

    kwargs = {"prompt": "a handwritten digit two", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="demo", **kwargs)
    assert err.value.body["param"] == field, err.value.body


@pytest.mark.parametrize("case, field", [("not_an_image", "image"), ("no_image", "image"), ("mask_size", "mask"),
                                         ("mask_no_alpha", "mask"), ("bad_steps", "num_inference_steps")])
def test_bad_edit_uploads_are_a_400_naming_the_field(server, case, field):
    import requests

    good = _upload(Image.new("L", (16, 16), 40)).getvalue()
    files = {"image": ("image.png", good, "image/png")}
    data = {"prompt": "make it thicker"}
    if case == "not_an_image":
        files["image"] = ("image.png", b"this is not a png", "image/png")
    elif case == "no_image":
        files = {"mask": ("mask.png", good, "image/png")}
    elif case == "mask_size":
        files["mask"] = ("mask.png", _upload(Image.new("RGBA", (8, 8))).getvalue(), "image/png")
    elif case == "mask_no_alpha":
        files["mask"] = ("mask.png", good, "image/png")
    else:
        data["num_inference_steps"] = "many"
    response = requests.post(server.base_url + "/v1/images/edits", files=files, data=data, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_malformed_bodies_are_400_and_the_server_keeps_serving(server, client):
    import requests

    url = server.base_url + "/v1/images/generations"
    assert requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    assert requests.post(url, json=[1, 2]).status_code == 400
    assert requests.post(url, data=b'{"prompt": "a digit", "n": Infinity}',
                         headers={"Content-Type": "application/json"}).status_code == 400
    assert requests.post(server.base_url + "/v1/images/edits", data=b"junk",
                         headers={"Content-Type": "multipart/form-data; boundary=x"}).status_code == 400
    ok = client.images.generate(model="demo", prompt="a handwritten digit one", size=NATIVE)
    assert png(ok.data[0]).size == (SIDE, SIDE)
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric("vllm:kv_cache_usage_perc") == 0  # I5 after all of the above
