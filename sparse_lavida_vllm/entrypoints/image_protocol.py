"""The images API's requests as pydantic models: OpenAI's fields and our sampler knobs, a bad one a BadField."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_N = 16  # images per request (they run as one batch)
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit on partial_images


class BadField(ValueError):
    """A bad request field: HTTP 400 with an OpenAI error body naming it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# ---- field types: a JSON value of the type, or its text (multipart form values are strings) ----------------

def _int_text(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        return int(value)
    return value  # anything else meets the strict int check (no floats, no booleans)


def _float_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # refused by the strict float check, naming the field
    return value


def _bool_text(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _interval_text(value: Any) -> Any:
    if isinstance(value, str):  # "[0.2, 0.8]" or "0.2,0.8"
        try:
            return [float(v) for v in value.replace("[", "").replace("]", "").split(",")]
        except ValueError:
            return value
    return value


FormInt = Annotated[int, BeforeValidator(_int_text)]
FormFloat = Annotated[float, BeforeValidator(_float_text), Field(allow_inf_nan=False)]
FormBool = Annotated[bool, BeforeValidator(_bool_text)]
Interval = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], BeforeValidator(_interval_text),
                     Field(min_length=2, max_length=2)]


class ImageRequest(BaseModel):
    """The fields both images routes take. Like vLLM's OpenAI protocol classes (`CompletionRequest`), but an unknown
    field is refused rather than ignored, and types are strict: an integer is no float or boolean, a boolean is
    true/false (a form's "true"/"false"). None on a knob: the checkpoint's default, filled in by its layout."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # OpenAI's fields
    prompt: str
    n: FormInt = Field(1, ge=1, le=MAX_N)
    size: str | None = None  # "WIDTHxHEIGHT" or "auto": the checkpoint's layout knows which sizes it draws
    response_format: str = "b64_json"
    output_format: Literal["png"] = "png"
    stream: FormBool = False
    partial_images: FormInt = Field(0, ge=0, le=MAX_PARTIAL_IMAGES)
    # OpenAI's fields that do not steer this sampler: accepted and not used (the stream events echo quality and
    # background)
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: FormInt | None = None
    user: str | None = None
    # the sampler (diffusers' names where they have one)
    num_inference_steps: FormInt | None = Field(None, ge=1, le=4096)
    guidance_scale: FormFloat | None = Field(None, ge=0.0, le=100.0)
    image_guidance_scale: FormFloat | None = Field(None, ge=0.0, le=100.0)
    negative_prompt: str | None = None
    seed: FormInt | None = Field(None, ge=0, le=2**62)
    temperature: FormFloat | None = Field(None, ge=0.0, le=100.0)
    top_k: FormInt = Field(0, ge=0, le=1 << 30)
    top_p: FormFloat = Field(1.0, ge=1e-6, le=1.0)
    return_token_ids: FormBool = False  # each image's canvas ids in the response
    # the diffusion plan's knobs (`knobs()`)
    sparse: FormBool | None = None
    per_code: FormBool | None = None  # LaViDa-O's per-code sampler
    num_registers: FormInt | None = Field(None, ge=0)  # at most the server's max_model_len (`parse`'s context)
    order: str | None = None
    schedule: str | None = None
    guidance_interval: Interval | None = None
    temperature_schedule: str | None = None
    min_temperature: FormFloat | None = Field(None, ge=0.0, le=100.0)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's optional fields are nullable: a null is as if the field were not sent."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must be a non-empty string")
        return value

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, value: str) -> str:
        if value != "b64_json":
            raise ValueError(f"response_format must be b64_json (this server keeps no files), got {value!r}")
        return value

    @field_validator("partial_images")
    @classmethod
    def _partial_images_stream(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("stream") is False:  # sent at all (even 0) without stream=true; a bad stream is named first
            raise ValueError("partial_images applies to streamed responses: send stream=true")
        return value

    @field_validator("num_registers")
    @classmethod
    def _registers_fit(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_model_len")
        if limit is not None and value > limit:
            raise ValueError(f"num_registers must be in [0, {limit}], got {value}")
        return value

    def knobs(self) -> dict[str, Any]:
        """The diffusion plan's knobs as the layouts' `request_args` take them (None: the checkpoint's default)."""
        return {"sparse": self.sparse, "per_code": self.per_code, "num_registers": self.num_registers,
                "order": self.order, "schedule": self.schedule, "guidance_interval": self.guidance_interval,
                "temperature_schedule": self.temperature_schedule, "min_temperature": self.min_temperature}


class ImageGenerationRequest(ImageRequest):
    """POST /v1/images/generations (a JSON body)."""

    @field_validator("image_guidance_scale")
    @classmethod
    def _edits_only(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("image_guidance_scale applies to edits only")
        return value


class ImageEditRequest(ImageRequest):
    """POST /v1/images/edits: a multipart form's text fields (the `image` and `mask` files are read by the route)."""

    input_fidelity: str | None = None  # OpenAI's; not used


Request = TypeVar("Request", bound=ImageRequest)


def parse(model: type[Request], body: dict[str, Any], max_model_len: int) -> Request:
    """`body` validated as `model`; a BadField names the first bad field (an unknown one before any other)."""
    try:
        return model.model_validate(body, context={"max_model_len": max_model_len})
    except ValidationError as e:
        raise first_bad_field(e) from None


def first_bad_field(error: ValidationError) -> BadField:
    """Pydantic's first error as a BadField: the field is the first part of the error's location."""
    def rank(e: Any) -> tuple[bool, str]:  # unknown fields first, by name; then the declared order (sort is stable)
        unknown = e["type"] == "extra_forbidden"
        return not unknown, str(e["loc"][0]) if unknown else ""

    first = sorted(error.errors(include_url=False), key=rank)[0]
    field = str(first["loc"][0]) if first["loc"] else "body"
    if first["type"] == "extra_forbidden":
        return BadField(field, f"unknown field {field!r}")
    if first["type"] == "missing":
        return BadField(field, f"{field} is required")
    if first["type"] == "value_error":  # our validators' messages name the field already
        return BadField(field, str(first["ctx"]["error"]))
    return BadField(field, f"{field}: {first['msg']}, got {first['input']!r}")


__all__ = ["BadField", "ImageEditRequest", "ImageGenerationRequest", "ImageRequest", "MAX_N", "MAX_PARTIAL_IMAGES",
           "parse"]
