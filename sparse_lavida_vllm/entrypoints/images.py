"""The OpenAI images API on `vllm serve` (a `vllm.endpoint_plugins` entry): /v1/images/generations and /edits."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from sparse_lavida_vllm.entrypoints.image_io import mask_to_canvas, parse_size, png_b64, read_image
from sparse_lavida_vllm.entrypoints.image_protocol import (
    BadField,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    parse,
)
from sparse_lavida_vllm.entrypoints.image_stream import (
    StreamSpec,
    error_event,
    event_stream,
    preview_steps,
    render_preview,
)
from sparse_lavida_vllm.model_executor.lavida_o_config import ARCHITECTURE as LAVIDA_O
from sparse_lavida_vllm.multimodal.layout import ImageLayout
from sparse_lavida_vllm.multimodal.request_rules import EDITS_UNPUBLISHED, RequestRules, request_rules
from sparse_lavida_vllm.scheduler.image_params import GENERATE
from sparse_lavida_vllm.scheduler.knobs import DiffusionParamError
from sparse_lavida_vllm.scheduler.params import parse_params

PLUGIN_NAME = "sparse_lavida_images"
# Our internal knob names -> the request field a client set (a 400 names the field the client knows).
API_FIELD = {"steps": "num_inference_steps", "height": "size", "width": "size", "size": "size",
             "init_canvas": "mask", "uncond_prompt_ids": "negative_prompt", "cfg_interval": "guidance_interval"}

router = APIRouter()


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    return JSONResponse({"error": {"message": message, "type": kind, "param": field, "code": status}}, status)


# ---- the service: prompt building, validation, engine calls ----------------------------------

@dataclass
class ImageJob:
    prompt_ids: list[int]
    extra: dict[str, Any]
    temperature: float
    top_k: int
    top_p: float
    seeds: list[int]
    size: tuple[int, int]
    return_token_ids: bool = False  # each image's canvas ids in the response (LaViDa-O: packed positions)
    # a LaViDa-O edit's SigLIP copy of the source (vLLM multimodal data: its processor expands the prompt's
    # `<image>` into the image's rows) and the prompt's length once expanded (None: len(prompt_ids))
    image: Image.Image | None = None
    num_prompt_tokens: int | None = None
    stream: StreamSpec | None = None  # stream=true: SSE events (partial images from extra["preview_steps"])
    image_tokens: int = 0  # the prompt's image tokens (an edit's source rows): the streamed events' usage

    def engine_prompt(self) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": self.prompt_ids}
        if self.image is not None:
            prompt["multi_modal_data"] = {"image": self.image}
        return prompt

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids) if self.num_prompt_tokens is None else self.num_prompt_tokens


class ImageService:
    """Turns image requests into diffusion requests on the engine and their tokens back into PNGs."""

    def __init__(self, engine_client: Any) -> None:
        self.engine = engine_client
        model_config = engine_client.model_config
        self.hf_config = model_config.hf_config
        self.max_model_len = model_config.max_model_len
        self.mask_id = int(self.hf_config.mask_token_id)
        self.num_registers = int(getattr(self.hf_config, "num_registers", 0))
        self.model_defaults = {"default_sparse": bool(getattr(self.hf_config, "block_causal", False)),
                               "has_register_token": getattr(self.hf_config, "register_token_id", None) is not None}
        self.layout: Any = None  # ImageLayout, or LaViDaOLayout for a llava_llada checkpoint
        self.rules: RequestRules = RequestRules()  # what the scheduler accepts (multimodal/request_rules.py)
        self.lavida = False
        self.unavailable = ""
        try:  # a text-only or tokenizer-less checkpoint: the routes answer 400 with the reason
            self.tokenizer = engine_client.renderer.get_tokenizer()
            self.rules = request_rules(model_config.architecture, model_config.model)
            if model_config.architecture == LAVIDA_O:
                self._lavida_layout(model_config)
            else:
                self.layout = ImageLayout.from_config(getattr(self.hf_config, "image_generation", None),
                                                      model_config.model, self.tokenizer.get_vocab().get,
                                                      model_config.architecture)
        except ValueError as e:
            self.unavailable = str(e)

    def _lavida_layout(self, model_config: Any) -> None:
        """LaViDa-O served whole: its own prompt format and VQ codec; image registers and their patch."""
        from sparse_lavida_vllm.model_executor.lavida_o_text import serves_lavida_o_images
        from sparse_lavida_vllm.multimodal.lavida_o_layout import LaViDaOLayout

        why = serves_lavida_o_images(model_config.model)
        if why is not None:
            raise ValueError(why)
        self.layout = LaViDaOLayout.load(model_config.model, self.tokenizer)
        self.lavida = True
        self.num_registers = self.layout.image_registers
        self.model_defaults["has_register_token"] = self.layout.config.register_code is not None

    def parse_size(self, value: Any) -> tuple[int, int]:
        if not self.lavida:
            return parse_size(value, self.layout.codec.image_size)
        try:
            return self.layout.parse_size(value)
        except ValueError as e:
            raise BadField("size", str(e)) from None

    def num_outputs(self, size: tuple[int, int]) -> int:
        return self.layout.num_outputs(size) if self.lavida else self.layout.codec.num_tokens

    def decode(self, token_ids: list[int], size: tuple[int, int]) -> Image.Image:
        tokens = torch.tensor(token_ids, dtype=torch.long)
        return self.layout.decode(tokens, size) if self.lavida else self.layout.codec.decode(tokens)

    def t2i_prompt(self, text: str, size: tuple[int, int]) -> list[int]:
        if self.lavida:
            return self.layout.t2i_prompt(text, size)
        return self.layout.t2i_prompt(self.encode_text(text))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def common(self, request: ImageRequest, kind: str) -> dict[str, Any]:
        """The fields both routes share, with the checkpoint's size and defaults filled in (BadField names a bad
        size); `kind` names a streamed response's events (image_generation or image_edit)."""
        size = self.parse_size(request.size)
        temperature = request.temperature
        return {
            "prompt": request.prompt, "n": request.n, "size": size,
            "stream": StreamSpec.echoing(kind, size, request.quality, request.background) if request.stream else None,
            "partial_images": request.partial_images, "steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale, "image_guidance_scale": request.image_guidance_scale,
            "negative_prompt": request.negative_prompt, "seed": request.seed,
            "temperature": float(self.layout.defaults["temperature"]) if temperature is None else temperature,
            "top_k": request.top_k, "top_p": request.top_p, "return_token_ids": request.return_token_ids,
            "knobs": request.knobs(),
        }

    def job(self, fields: dict[str, Any], prompt_ids: list[int], source_span: tuple[int, int] | None = None,
            init_canvas: list[int] | None = None, source_codes: list[int] | None = None,
            image: Image.Image | None = None, num_prompt_tokens: int | None = None,
            uncond_prompt_ids: list[int] | None = None, image_tokens: int = 0) -> ImageJob:
        uncond = uncond_prompt_ids  # LaViDa-O: the publishers' uncond branch (LaViDaOLayout.uncond_ids)
        length = len(prompt_ids) if num_prompt_tokens is None else num_prompt_tokens  # the engine's prompt length
        if fields["negative_prompt"]:  # the uncond branch reads the negative prompt, padded with masks
            neg = self.t2i_prompt(fields["negative_prompt"], fields["size"])[:length]
            uncond = neg + [self.mask_id] * (length - len(neg))
        args = dict(steps=fields["steps"], guidance_scale=fields["guidance_scale"],
                    image_guidance_scale=fields["image_guidance_scale"], source_span=source_span,
                    init_canvas=init_canvas, uncond_prompt_ids=uncond, **fields["knobs"])
        if self.lavida:
            extra = self.layout.request_args(fields["size"], source_codes=source_codes, **args)
        else:
            extra = self.layout.request_args(**args)
        if fields["negative_prompt"] and not extra.get("guidance_scale"):
            raise BadField("negative_prompt", "negative_prompt needs guidance_scale > 0 (it is the uncond branch)")
        if fields["partial_images"]:  # the scheduler's canvas snapshots; validated below with the rest
            extra["preview_steps"] = preview_steps(extra["steps"], fields["partial_images"])
        base = fields["seed"] if fields["seed"] is not None else secrets.randbits(62)
        job = ImageJob(prompt_ids, extra, fields["temperature"], fields["top_k"], fields["top_p"],
                       [base + i for i in range(fields["n"])], fields["size"], bool(fields["return_token_ids"]),
                       image, num_prompt_tokens, fields["stream"], image_tokens)
        self.validate(job)
        return job

    def sampling_params(self, job: ImageJob, seed: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=self.num_outputs(job.size), temperature=job.temperature, top_k=job.top_k,
                              top_p=job.top_p, seed=seed, extra_args=dict(job.extra), detokenize=False)

    def validate(self, job: ImageJob) -> None:
        """The scheduler's own checks, run here so a bad request is a 400 before anything is queued."""
        if job.extra.get("per_code") and (why := self.rules.per_code_refusal()) is not None:
            raise BadField("per_code", why)
        try:
            parse_params(self.sampling_params(job, job.seeds[0]), job.prompt_length, self.max_model_len,
                         self.num_registers, **self.model_defaults)
        except DiffusionParamError as e:
            raise BadField(API_FIELD.get(e.field, e.field), str(e)) from None

    async def one_image(self, job: ImageJob, seed: int, on_preview: Callable[[int, list[int]], Awaitable[None]]
                        | None = None) -> tuple[Image.Image, dict]:
        """One image of the job and its metrics; `on_preview(index, canvas)` gets each preview canvas on its way.

        vLLM's output processor hands out the request's token ids cumulatively: the scheduler's canvas snapshots
        (extra["preview_steps"], each a whole canvas) and then the image's canvas, so canvas i is ids[i*L:(i+1)*L].
        """
        length, previews = self.num_outputs(job.size), len(job.extra.get("preview_steps", ()))
        final, sent = None, 0
        async for output in self.engine.generate(job.engine_prompt(), self.sampling_params(job, seed),
                                                 f"img-{uuid.uuid4().hex}"):
            final = output
            ids = output.outputs[0].token_ids if output.outputs else []
            while sent < min(len(ids) // length, previews):
                await on_preview(sent, list(ids[sent * length:(sent + 1) * length]))
                sent += 1
        completion = final.outputs[0] if final is not None and final.outputs else None
        if completion is None or len(completion.token_ids) != (previews + 1) * length:
            reason = completion.finish_reason if completion is not None else "no output"
            raise RuntimeError(f"the engine did not finish the image ({reason})")
        token_ids = list(completion.token_ids[previews * length:])
        metrics = dict((final.kv_transfer_params or {}).get("sparse_lavida_metrics", {}))
        image = self.decode(token_ids, job.size)
        if job.return_token_ids:
            metrics["token_ids"] = token_ids
        return image, metrics

    async def run(self, job: ImageJob) -> list[tuple[Image.Image, dict]]:
        """The job's n images, submitted together so the engine batches them (and their guidance branches)."""
        return list(await asyncio.gather(*(self.one_image(job, seed) for seed in job.seeds)))

    async def stream(self, job: ImageJob) -> AsyncIterator[dict[str, Any]]:
        """A streamed job's events: image after image, each one's partial images then its completed event (the
        events carry no image index, so one image's events are never interleaved with another's). The n images
        still run together in the engine; a later image's events wait in its queue. Leaving early (the client
        hung up) cancels every image, and vLLM aborts their requests."""
        spec, length = job.stream, self.num_outputs(job.size)
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in job.seeds]

        async def one(seed: int, queue: asyncio.Queue) -> None:
            async def preview(index: int, canvas: list[int]) -> None:
                await queue.put(spec.partial(render_preview(self.layout, canvas, job.size), index))

            try:
                image, metrics = await self.one_image(job, seed, preview)
            except Exception as e:  # the response has started: the failure travels as an error event
                await queue.put(error_event(str(e)))
                return
            await queue.put(spec.completed(image, job.prompt_length, job.image_tokens, length,
                                           metrics.get("token_ids")))

        tasks = [asyncio.create_task(one(seed, queue)) for seed, queue in zip(job.seeds, queues)]
        try:
            for queue in queues:
                while (event := await queue.get())["type"].endswith(".partial_image"):
                    yield event
                yield event
                if event["type"] == "error":
                    return
        finally:
            for task in tasks:
                task.cancel()

    @staticmethod
    def response(results: list[tuple[Image.Image, dict]], size: tuple[int, int]) -> dict[str, Any]:
        # token ids (return_token_ids) go with their image, not into the metrics the Prometheus hook counts
        return {"created": int(time.time()),
                "data": [{"b64_json": png_b64(image, size),
                          **({"token_ids": metrics["token_ids"]} if "token_ids" in metrics else {})}
                         for image, metrics in results],
                "sparse_lavida_metrics": [{k: v for k, v in metrics.items() if k != "token_ids"}
                                          for _, metrics in results]}


def _service(request: Request) -> ImageService | JSONResponse:
    service = getattr(request.app.state, "sparse_lavida_images", None)
    if service is None:
        return _error(500, "the images service is not initialised")
    if service.layout is None:
        return _error(400, f"this model cannot make images: {service.unavailable}", "model")
    return service


async def _events(events: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for event in events:
        yield event


async def _answer(service: ImageService, job: ImageJob) -> Response:
    if job.stream is not None:
        return event_stream(service.stream(job))
    try:
        results = await service.run(job)
    except RuntimeError as e:
        return _error(500, str(e))
    return JSONResponse(service.response(results, job.size))


@router.post("/v1/images/generations")
async def create_image(request: Request) -> Response:
    service = _service(request)
    if isinstance(service, JSONResponse):
        return service
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body must be a JSON object", "body")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "body")
    try:
        fields = service.common(parse(ImageGenerationRequest, body, service.max_model_len), "image_generation")
        prompt = service.t2i_prompt(fields["prompt"], fields["size"])
        uncond = service.layout.uncond_ids(prompt) if service.lavida else None
        job = service.job(fields, prompt, uncond_prompt_ids=uncond)
    except BadField as e:
        return _error(400, str(e), e.field)
    return await _answer(service, job)


@router.post("/v1/images/edits")
async def edit_image(request: Request) -> Response:
    service = _service(request)
    if isinstance(service, JSONResponse):
        return service
    try:
        form = await request.form()
    except Exception:  # starlette raises several types for a malformed multipart body
        return _error(400, "the body must be multipart/form-data with an image file", "image")
    try:
        body = {k: v for k, v in form.items() if not hasattr(v, "read")}  # the text fields; files are read below
        edit_request = parse(ImageEditRequest, body, service.max_model_len)
        upload = form.get("image") or form.get("image[]")
        if upload is None or not hasattr(upload, "read"):
            raise BadField("image", "image is required (a PNG, JPEG or WebP file)")
        source = read_image(await upload.read(), "image")
        fields = service.common(edit_request, "image_edit")
        layout = service.layout
        if service.lavida and service.layout.config.gen_enc_add_pos_emb:
            raise BadField("image", EDITS_UNPUBLISHED)
        if service.lavida:  # the source as code patches at the requested size; the canvas holds them packed
            patches = layout.encode(source, fields["size"])
            source_ids, grid = layout.canvas_ids(patches), layout.positions(fields["size"])
        else:
            source_ids = layout.codec.encode(source).tolist()  # the codec converts and resizes to its own format
            grid = layout.codec.grid
        init_canvas = None
        mask_upload = form.get("mask")
        if mask_upload is not None:
            if not hasattr(mask_upload, "read"):
                raise BadField("mask", "mask must be a PNG file")
            init_canvas = mask_to_canvas(read_image(await mask_upload.read(), "mask"), source, source_ids, grid)
            if GENERATE not in init_canvas:  # nothing to repaint: the source, untouched
                image = service.decode(source_ids, fields["size"])
                if fields["stream"] is not None:  # nothing was generated: no partial images, no tokens
                    return event_stream(_events([fields["stream"].completed(image, 0, 0, 0)] * fields["n"]))
                return JSONResponse(service.response([(image, {"steps": 0})] * fields["n"], fields["size"]))
        if service.lavida:  # with a vision tower the source also goes in as its SigLIP copy (the `<image>` rows)
            edit = layout.edit_prompt(fields["prompt"], patches, source)
            job = service.job(fields, edit.prompt_ids, source_span=edit.source_span, init_canvas=init_canvas,
                              source_codes=edit.source_codes, image=edit.image,
                              num_prompt_tokens=edit.num_prompt_tokens, uncond_prompt_ids=layout.uncond_ids(edit),
                              image_tokens=edit.source_span[1] - edit.source_span[0] + edit.image_rows)
        else:
            prompt, span = layout.edit_prompt(source_ids, service.encode_text(fields["prompt"]))
            job = service.job(fields, prompt, source_span=span, init_canvas=init_canvas, image_tokens=len(source_ids))
    except BadField as e:
        return _error(400, str(e), e.field)
    return await _answer(service, job)


class ImagesPlugin:
    """The `vllm.endpoint_plugins` entry: the routes, and the service they share (built once the engine is up)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.sparse_lavida_images = ImageService(engine_client) if engine_client is not None else None
