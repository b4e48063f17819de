"""The Flux Imaging API's routes: ``POST /process`` and ``POST /process/raw``, which pick the mode themselves.

Image and prompt → edit (img2img); image only → variation (FLUX.1-Redux when served and openai.variation_mode is
redux, else img2img with a neutral prompt); prompt only → generate (text2img); neither → 400. The image comes as an
upload (``input_file``) or by ``input_image_url`` (an http(s) URL or a data: URI). /process answers JSON with base64
or a URL (``openai.process_response``); /process/raw answers the PNG itself. Runs on the API process's event loop.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from genserve.errors import BadRequest
from genserve.http_errors import bad_request_from_validation
from genserve.jobs import Job
from genserve.messages import Mode
from genserve.prepare import EncodedImages, prepare_job
from genserve.routes import intake
from genserve.schemas import (
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

router = APIRouter(prefix="/process", tags=["flux-imaging"])

IMAGE_FIELDS = ("input_file", "input_image_url")
ProcessMode = Literal["edit", "variation", "generate"]
# For the API docs' "Try it out" (genserve.docs): a prompt alone generates; runs as is against a default server.
PROCESS_EXAMPLE: dict[str, Any] = {
    "prompt": EXAMPLE_PROMPT,
    "width": EXAMPLE_SIZE,
    "height": EXAMPLE_SIZE,
    "num_inference_steps": EXAMPLE_STEPS,
    "guidance_scale": 3.5,
    "seed": 42,
}


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str | None = None
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    num_inference_steps: int | None = Field(None, validation_alias=AliasChoices("num_inference_steps", "steps"))
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    loras: list[LoraRequest] | None = None  # as /generate's; a JSON string in form-data
    webhook_url: str | None = Field(None, description=URL_HELP)
    webhook_events: list[WebhookEvent] | None = Field(None, description=EVENTS_HELP)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_json(cls, value: Any) -> Any:
        return parse_loras_field(value)

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _webhook_events(cls, value: Any) -> Any:
        return parse_events_field(value)

    # Seed 004 passes a bearer_token for its file server; GenServe stores results itself and ignores it.
    bearer_token: str | None = None


def choose_mode(prompt: str | None, has_image: bool, variation: Mode = "img2img") -> tuple[ProcessMode, Mode]:
    has_prompt = bool(prompt and prompt.strip())
    if has_image and has_prompt:
        return "edit", "img2img"
    if has_image:
        return "variation", variation
    if has_prompt:
        return "generate", "text2img"
    raise BadRequest("send a prompt, an image (input_file or input_image_url), or both")


async def _run(request: Request, service: Service) -> tuple[Job, ProcessMode]:
    if intake.is_json(request):
        body = await intake.read_body(request, service.config.server.max_request_bytes)
        fields = await run_in_threadpool(intake.parse_json_object, body)
        images = {name: fields.pop(name) for name in IMAGE_FIELDS if isinstance(fields.get(name), str)}
    else:
        intake.refuse_declared_oversize(request, service.config.server.max_request_bytes)
        fields, images = await intake.read_form(request, IMAGE_FIELDS, service.config.limits.max_upload_bytes)
    try:
        params = ProcessRequest.model_validate(fields)
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from None
    image = images.get("input_file") or images.get("input_image_url")
    kind, mode = choose_mode(params.prompt, bool(image), service.variation_mode())
    openai = service.config.openai
    prompt, strength = params.prompt, params.strength
    if kind == "variation" and mode == "img2img":
        prompt, strength = openai.variation_prompt, strength or openai.variation_strength
    try:
        generate = GenerateRequest.model_validate(
            {
                "prompt": prompt,
                "mode": mode,
                "width": params.width,
                "height": params.height,
                "num_inference_steps": params.num_inference_steps,
                "cfg": params.guidance_scale,
                "seed": -1 if params.seed is None else params.seed,
                "strength": strength,
                "timeout": params.timeout,
                "loras": params.loras,
                "webhook_url": params.webhook_url,
                "webhook_events": params.webhook_events,
            }
        )
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from None
    inputs: EncodedImages = {"input_image": image} if image else {}
    prepared = await run_in_threadpool(prepare_job, generate, inputs, service.config, service.modes, service.loras)
    job = await intake.submit(request, service, prepared)
    await intake.wait_for_jobs(request, service, [job])
    return job, kind


def _json_answer(job: Job, kind: ProcessMode, service: Service, base_url: str) -> dict[str, Any]:
    assert job.result is not None
    answer: dict[str, Any] = {
        "mode": kind,
        "task_id": job.id,
        "seed": job.result.seed,
        "width": job.result.width,
        "height": job.result.height,
    }
    if service.config.openai.process_response == "url":
        answer["url"] = f"{base_url}/image/{job.id}"
    else:
        answer["b64_json"] = base64.b64encode(Path(job.result.image_path).read_bytes()).decode("ascii")
    return answer


class ProcessFields(ProcessRequest):
    """Fields of /process for the OpenAPI schema (input_file is a file in form-data), with an example that runs."""

    model_config = ConfigDict(json_schema_extra={"examples": [PROCESS_EXAMPLE]})

    input_file: str | None = None
    input_image_url: str | None = None


PROCESS_BODY = intake.body_schema(ProcessFields, json=True, form=True, files=("input_file",))


@router.post(
    "",
    summary="Generate, edit or vary (mode picked from the inputs); JSON with base64 or a URL",
    openapi_extra=PROCESS_BODY,
)
async def process(request: Request) -> JSONResponse:
    service = get_service(request)
    job, kind = await _run(request, service)
    base_url = service.config.openai.public_base_url or str(request.base_url).rstrip("/")
    return JSONResponse(await run_in_threadpool(_json_answer, job, kind, service, base_url))


@router.post(
    "/raw",
    summary="Same as /process, answering the PNG bytes",
    openapi_extra=PROCESS_BODY,
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def process_raw(request: Request) -> Response:
    service = get_service(request)
    job, kind = await _run(request, service)
    path = await run_in_threadpool(service.store.acquire, job.id)  # in a cluster it may be fetched from Redis
    return FileResponse(
        path,
        media_type="image/png",
        headers={"X-GenServe-Mode": kind, "X-GenServe-Task-Id": job.id},
        background=BackgroundTask(service.store.release, job.id),
    )
