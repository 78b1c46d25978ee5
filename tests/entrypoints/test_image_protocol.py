"""The images API's request models without a server: every bad field is a BadField naming it, form text parses
as its JSON value does, and a null is the default."""

import pytest

from sparse_lavida_vllm.entrypoints.image_protocol import (
    BadField,
    ImageEditRequest,
    ImageGenerationRequest,
    parse,
)

MAX_MODEL_LEN = 1024

BAD = [  # (fields beside a good prompt, the field the error must name)
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"prompt": 5}, "prompt"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 2.0}, "n"), ({"n": True}, "n"), ({"n": float("inf")}, "n"),
    ({"n": "--2"}, "n"), ({"response_format": "url"}, "response_format"), ({"output_format": "jpeg"}, "output_format"),
    ({"size": 64}, "size"), ({"stream": 1}, "stream"), ({"stream": "yes"}, "stream"),
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": True, "partial_images": -1}, "partial_images"),
    ({"stream": True, "partial_images": 1.5}, "partial_images"), ({"partial_images": 1}, "partial_images"),
    ({"stream": False, "partial_images": 0}, "partial_images"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": "many"}, "num_inference_steps"), ({"guidance_scale": "lots"}, "guidance_scale"),
    ({"guidance_scale": True}, "guidance_scale"), ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": 101}, "guidance_scale"), ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"),
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"num_registers": MAX_MODEL_LEN + 1}, "num_registers"), ({"num_registers": -1}, "num_registers"),
    ({"sparse": 1}, "sparse"), ({"per_code": "yes"}, "per_code"), ({"schedule": 3}, "schedule"),
    ({"guidance_interval": [0.2]}, "guidance_interval"), ({"guidance_interval": [0.2, True]}, "guidance_interval"),
    ({"guidance_interval": "a,b"}, "guidance_interval"), ({"min_temperature": "inf"}, "min_temperature"),
    ({"image_guidance_scale": 1.0}, "image_guidance_scale"),  # edits only
    ({"colour": "red", "n": 0}, "colour"),  # an unknown field is named before any other bad one
    ({"input_fidelity": "high"}, "input_fidelity"),  # an edit's field
]


@pytest.mark.parametrize("fields, name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_a_bad_generation_field_is_named(fields, name):
    with pytest.raises(BadField) as err:
        parse(ImageGenerationRequest, {"prompt": "a digit", **fields}, MAX_MODEL_LEN)
    assert err.value.field == name and name in str(err.value), str(err.value)


def test_an_edit_takes_image_guidance_and_input_fidelity_and_refuses_a_text_image_field():
    edit = parse(ImageEditRequest, {"prompt": "thicker", "image_guidance_scale": "1.5", "input_fidelity": "high"},
                 MAX_MODEL_LEN)
    assert edit.image_guidance_scale == 1.5
    with pytest.raises(BadField) as err:  # the image is a file upload, never a text field
        parse(ImageEditRequest, {"prompt": "thicker", "image": "a.png"}, MAX_MODEL_LEN)
    assert err.value.field == "image"


def test_form_text_parses_as_its_json_value():
    json_body = {"prompt": "a digit", "n": 2, "stream": True, "partial_images": 2, "guidance_scale": 1.5,
                 "seed": 7, "sparse": False, "per_code": True, "guidance_interval": [0.2, 0.8], "top_k": 3}
    form = {"prompt": "a digit", "n": "2", "stream": "true", "partial_images": "2", "guidance_scale": "1.5",
            "seed": " 7 ", "sparse": "False", "per_code": "TRUE", "guidance_interval": "[0.2, 0.8]", "top_k": "3"}
    assert parse(ImageEditRequest, form, MAX_MODEL_LEN) == parse(ImageEditRequest, json_body, MAX_MODEL_LEN)


def test_defaults_and_nulls():
    request = parse(ImageGenerationRequest, {"prompt": "a digit", "n": None, "response_format": None,
                                             "quality": "high", "model": "demo"}, MAX_MODEL_LEN)
    assert (request.n, request.response_format, request.stream, request.partial_images) == (1, "b64_json", False, 0)
    assert (request.top_k, request.top_p, request.return_token_ids) == (0, 1.0, False)
    # None: the checkpoint's default, filled in by its layout
    assert request.temperature is None and request.num_inference_steps is None
    assert set(request.knobs().values()) == {None}
    with pytest.raises(BadField) as err:
        parse(ImageGenerationRequest, {"prompt": None}, MAX_MODEL_LEN)
    assert err.value.field == "prompt" and "required" in str(err.value)
