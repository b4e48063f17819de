"""OpenAI-compatible Images API: /v1/images/generations, /v1/images/edits, /v1/images/variations.

A drop-in target for the official ``openai`` SDK (seeds 002 and 004). Each request of n images becomes n jobs with
seeds seed, seed+1, … that the supervisor spreads over every idle worker at once; the answer waits for all of them.
Errors on these routes leave in OpenAI's shape (genserve.http_errors), so the SDK raises its usual exceptions.
Runs on the API process's event loop; decoding, fetching and encoding go through the thread pool.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from genserve.config import Config
from genserve.errors import BadRequest, NotFound
from genserve.http_errors import bad_request_from_validation
from genserve.images import image_size, openai_mask_to_png, reencode, transparency_mask
from genserve.jobs import Job
from genserve.messages import Mode
from genserve.prepare import EncodedImages, prepare_job, snap_size, with_siblings
from genserve.routes import intake
from genserve.schemas import (
    EXAMPLE_MODEL_ID,
    EXAMPLE_PROMPT,
    EXAMPLE_SIZE,
    EXAMPLE_STEPS,
    MAX_SEED,
    GenerateRequest,
    LoraRequest,
    parse_loras_field,
)
from genserve.service import Service, get_service
from genserve.webhooks import EVENTS_HELP, URL_HELP, WebhookEvent, parse_events_field

router = APIRouter(prefix="/v1/images", tags=["openai"])

# OpenAI reports token usage; a diffusion model has none to report, so the fields are there and zero.
USAGE = {
    "input_tokens": 0,
    "output_tokens": 0,
    "total_tokens": 0,
    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
}
DEFAULT_QUALITY = 90  # JPEG/WEBP quality when output_compression is not given
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
# For the API docs' "Try it out" (genserve.docs): runs as is against a default server.
GENERATIONS_EXAMPLE: dict[str, Any] = {
    "model": EXAMPLE_MODEL_ID,
    "prompt": EXAMPLE_PROMPT,
    "n": 1,
    "size": f"{EXAMPLE_SIZE}x{EXAMPLE_SIZE}",
    "num_inference_steps": EXAMPLE_STEPS,
    "guidance_scale": 3.5,
    "seed": 42,
    "response_format": "url",
}


class ImagesRequest(BaseModel):
    """The fields of all three routes; each route uses what applies. Unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str | None = Field(None, description="What to draw (required by generations and edits).")
    model: str | None = Field(None, description="flux1-dev, FLUX.1-dev or black-forest-labs/flux.1-dev.")
    n: int = Field(1, ge=1, description="Images to make, 1 to openai.max_n; seeds seed, seed+1, …")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto".')
    response_format: Literal["url", "b64_json"] | None = Field(None, description="url (default) or b64_json.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WEBP quality, 0-100.")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="First image's seed; -1 or none: random.")
    num_inference_steps: int | None = Field(
        None, validation_alias=AliasChoices("num_inference_steps", "steps"), description="Denoising steps."
    )
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="FLUX guidance.")
    priority: int | None = Field(None, ge=-(2**31), le=2**31 - 1, description="Lower runs first.")
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Edit strength (img2img).")
    image: str | None = Field(None, description="generations: an http(s) URL, data: URI or base64 → img2img.")
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False, description="Seconds the request may take.")
    stream: bool | None = Field(None, description="Streaming partial images is not supported: only false or omitted.")
    loras: list[LoraRequest] | None = Field(
        None,
        description='GenServe extension (the SDK\'s extra_body): LoRAs, [{"name": "style", "weight": 0.8}]; a JSON '
        "string in form-data.",
    )
    webhook_url: str | None = Field(None, description="GenServe extension (extra_body): " + URL_HELP)
    webhook_events: list[WebhookEvent] | None = Field(None, description="GenServe extension: " + EVENTS_HELP)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_json(cls, value: Any) -> Any:
        return parse_loras_field(value)

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _webhook_events(cls, value: Any) -> Any:
        return parse_events_field(value)


# --- request pieces ------------------------------------------------------------------------------------------------


def _validate(fields: dict[str, Any]) -> ImagesRequest:
    try:
        body = ImagesRequest.model_validate(fields)
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from None
    if body.stream:  # an empty event stream would leave the client waiting for images that never come
        raise BadRequest("streaming (stream: true) is not supported; omit stream or set it to false", param="stream")
    return body


def check_model(model: str | None, config: Config) -> None:
    if model is None:
        return
    known = {config.model.id, config.model.name, *config.openai.model_aliases}
    if model.strip().lower() not in {name.lower() for name in known}:
        raise NotFound(
            f"The model '{model}' does not exist; this server serves '{config.model.id}'",
            param="model",
            code="model_not_found",
        )


def fit_size(width: int, height: int, config: Config) -> tuple[int, int]:
    """An input image's size brought within the limits, aspect kept (for size "auto" on edits and variations)."""
    limits = config.limits
    scale = min(1.0, limits.max_size / max(width, height))
    width, height = round(width * scale), round(height * scale)
    return max(limits.min_size, snap_size(width)), max(limits.min_size, snap_size(height))


def parse_size(size: str | None, config: Config, source: tuple[int, int] | None) -> tuple[int, int]:
    if size is None or size.strip().lower() in ("", "auto"):
        return fit_size(*source, config) if source else (config.defaults.width, config.defaults.height)
    match = _SIZE.match(size)
    if not match:
        raise BadRequest(f"size must look like 1024x1024 or be 'auto', got {size!r}", param="size")
    return int(match.group(1)), int(match.group(2))


def _base_url(request: Request, config: Config) -> str:
    return config.openai.public_base_url or str(request.base_url).rstrip("/")


# --- the shared path -----------------------------------------------------------------------------------------------


async def _make_images(
    request: Request,
    service: Service,
    body: ImagesRequest,
    *,
    mode: Mode,
    prompt: str,
    images: EncodedImages,
    source_size: tuple[int, int] | None = None,
) -> JSONResponse:
    config = service.config
    if body.n > config.openai.max_n:
        raise BadRequest(f"n must be between 1 and {config.openai.max_n}, got {body.n}", param="n")
    width, height = parse_size(body.size, config, source_size)
    try:
        generate = GenerateRequest.model_validate(
            {
                "prompt": prompt,
                "mode": mode,
                "width": width,
                "height": height,
                "num_inference_steps": body.num_inference_steps,
                "cfg": body.guidance_scale,
                "seed": -1 if body.seed is None else body.seed,  # none or -1: a random first seed; the rest follow
                "priority": body.priority,
                "strength": body.strength,
                "timeout": body.timeout,
                "loras": body.loras,
                "webhook_url": body.webhook_url,
                "webhook_events": body.webhook_events,
            }
        )
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from None
    prepared = await run_in_threadpool(prepare_job, generate, images, config, service.modes, service.loras)
    jobs = await intake.submit_all(request, service, with_siblings(prepared, body.n))
    await intake.wait_for_jobs(request, service, jobs)
    fmt = body.output_format or "png"
    quality = DEFAULT_QUALITY if body.output_compression is None else max(1, body.output_compression)
    data = await run_in_threadpool(
        _render_items, jobs, body.response_format or "url", fmt, quality, _base_url(request, config), prompt
    )
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": data,
            "usage": USAGE,
            "size": f"{jobs[0].request.width}x{jobs[0].request.height}",
            "output_format": fmt,
        }
    )


def _render_items(
    jobs: list[Job], response_format: str, fmt: str, quality: int, base_url: str, prompt: str
) -> list[dict[str, Any]]:
    items = []
    for job in jobs:
        assert job.result is not None
        item: dict[str, Any] = {"revised_prompt": prompt, "seed": job.result.seed}
        if response_format == "b64_json":
            item["b64_json"] = base64.b64encode(reencode(job.result.image_path, fmt, quality)).decode("ascii")
        else:
            query = "" if fmt == "png" else f"?format={fmt}&quality={quality}"
            item["url"] = f"{base_url}/image/{job.id}{query}"
        items.append(item)
    return items


async def _read(
    request: Request, service: Service, image_fields: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, bytes | str]]:
    """JSON or form-data → (fields, images). JSON carries images as URL / data: URI / base64 text."""
    if intake.is_json(request):
        body = await intake.read_body(request, service.config.server.max_request_bytes)
        fields = await run_in_threadpool(intake.parse_json_object, body)
        images = {name: fields.pop(name) for name in image_fields if isinstance(fields.get(name), str)}
        return fields, images
    intake.refuse_declared_oversize(request, service.config.server.max_request_bytes)
    return await intake.read_form(request, image_fields, service.config.limits.max_upload_bytes)


def _required_prompt(body: ImagesRequest) -> str:
    if body.prompt is None or not body.prompt.strip():
        raise BadRequest("prompt is required and must not be empty", param="prompt")
    return body.prompt


def _one_image(images: dict[str, Any], names: tuple[str, ...]) -> bytes | str:
    given = [images[name] for name in names if images.get(name)]
    if not given:
        raise BadRequest("image is required: upload the picture to edit as 'image'", param="image")
    if len(given) > 1:
        raise BadRequest("send one image: several input images are not supported", param="image")
    value: bytes | str = given[0]
    return value


def _source_size(service: Service, data: bytes | str) -> tuple[int, int] | None:
    """The input's size, for size "auto" (uploads only; a URL or base64 input is measured when decoded)."""
    if not isinstance(data, bytes):
        return None
    limits = service.config.limits
    return image_size(data, "image", max_bytes=limits.max_upload_bytes, max_pixels=limits.max_input_pixels)


# --- routes --------------------------------------------------------------------------------------------------------


class GenerationsFields(ImagesRequest):
    """The body of /generations, for the OpenAPI schema: with an example that runs."""

    model_config = ConfigDict(json_schema_extra={"examples": [GENERATIONS_EXAMPLE]})


class EditFields(ImagesRequest):
    """The multipart fields of /edits and /variations, for the OpenAPI schema (files: image, image[], mask)."""

    mask: str | None = Field(None, description="Edit mask: transparent (or white) pixels are repainted.")


@router.post(
    "/generations",
    summary="OpenAI images.generate: prompt → n images (with 'image': img2img)",
    openapi_extra=intake.body_schema(GenerationsFields, json=True, form=True),
)
async def generations(request: Request) -> JSONResponse:
    service = get_service(request)
    fields, images = await _read(request, service, ("image",))
    body = _validate(fields)
    check_model(body.model, service.config)
    prompt = _required_prompt(body)
    inputs: EncodedImages = {"input_image": images["image"]} if images.get("image") else {}
    mode: Mode = "img2img" if inputs else "text2img"
    return await _make_images(request, service, body, mode=mode, prompt=prompt, images=inputs)


@router.post(
    "/edits",
    summary="OpenAI images.edit: image and prompt → n images; a mask (or, without one, the image's transparent "
    "pixels) → fill, else img2img",
    openapi_extra=intake.body_schema(EditFields, json=False, form=True, files=("image", "mask")),
)
async def edits(request: Request) -> JSONResponse:
    service = get_service(request)
    fields, images = await _read(request, service, ("image", "image[]", "mask"))
    body = _validate(fields)
    check_model(body.model, service.config)
    prompt = _required_prompt(body)
    image = _one_image(images, ("image", "image[]"))
    source = await run_in_threadpool(_source_size, service, image)
    limits = service.config.limits
    mask: bytes | str | None = images.get("mask")
    if not mask and isinstance(image, bytes):  # as OpenAI: the image's own transparent pixels are the mask
        mask = await run_in_threadpool(
            transparency_mask, image, "image", max_bytes=limits.max_upload_bytes, max_pixels=limits.max_input_pixels
        )
    elif isinstance(mask, bytes):
        mask = await run_in_threadpool(
            openai_mask_to_png, mask, "mask", max_bytes=limits.max_upload_bytes, max_pixels=limits.max_input_pixels
        )
    if not mask:
        inputs: EncodedImages = {"input_image": image}
        return await _make_images(
            request, service, body, mode="img2img", prompt=prompt, images=inputs, source_size=source
        )
    inputs = {"input_image": image, "mask_image": mask}
    return await _make_images(request, service, body, mode="fill", prompt=prompt, images=inputs, source_size=source)


@router.post(
    "/variations",
    summary="OpenAI images.create_variation: image → n variations (FLUX.1-Redux, or img2img)",
    openapi_extra=intake.body_schema(ImagesRequest, json=False, form=True, files=("image",)),
)
async def variations(request: Request) -> JSONResponse:
    service = get_service(request)
    fields, images = await _read(request, service, ("image",))
    body = _validate(fields)
    check_model(body.model, service.config)
    image = _one_image(images, ("image",))
    source = await run_in_threadpool(_source_size, service, image)
    mode = service.variation_mode()
    inputs: EncodedImages = {"input_image": image}
    if mode == "redux":  # the image's embedding guides it; a prompt, if sent, is mixed in
        return await _make_images(
            request, service, body, mode=mode, prompt=body.prompt or "", images=inputs, source_size=source
        )
    if body.strength is None:
        body = body.model_copy(update={"strength": service.config.openai.variation_strength})
    prompt = body.prompt or service.config.openai.variation_prompt
    return await _make_images(request, service, body, mode=mode, prompt=prompt, images=inputs, source_size=source)
