"""GenServe's native API (seed 001): /generate, /generate/img2img, /status, /models, /health, /ready.

Runs on the API process's event loop. Parsing JSON, decoding images and base64-encoding results are CPU work done
in the thread pool; the loop only awaits. Both generate routes share one path from parsed fields to response.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from genserve import __version__
from genserve.errors import BadRequest, GenServeError, JobTimeout, PayloadTooLarge
from genserve.http_errors import bad_request_from_validation
from genserve.jobs import Job, wait_for_job
from genserve.prepare import EncodedImages, PreparedJob, prepare_job
from genserve.schemas import IMAGE_FIELDS, GenerateRequest, GenerateResponse
from genserve.service import Service, get_service

router = APIRouter()

FEATURES = {
    "text2img": "text-to-image",
    "img2img": "image-to-image",
    "fill": "fill",
    "controlnet": "controlnet",
}


def _json_body_schema() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
        }
    }


def _form_body_schema() -> dict[str, Any]:
    schema = GenerateRequest.model_json_schema()
    for field in IMAGE_FIELDS:
        schema["properties"][field] = {"type": "string", "format": "binary", "description": f"{field} file"}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}},
    }


# --- body parsing ----------------------------------------------------------------------------------------------


def _body_too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than the {max_bytes // (1024 * 1024)} MB limit")


def _refuse_declared_oversize(request: Request, max_bytes: int) -> None:
    """Refuse by Content-Length before reading a byte of an oversized body."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _body_too_large(max_bytes)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    _refuse_declared_oversize(request, max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json_request(body: bytes) -> tuple[GenerateRequest, EncodedImages]:
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object with at least 'prompt'")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        req = GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from None
    images: dict[str, bytes | str] = {}
    for field in IMAGE_FIELDS:
        value = getattr(req, field)
        if value:
            images[field] = value
    return req, images


async def _parse_form_request(request: Request, max_upload: int) -> tuple[GenerateRequest, EncodedImages]:
    form = await request.form(max_files=len(IMAGE_FIELDS) + 4, max_fields=64)
    fields: dict[str, Any] = {}
    images: dict[str, bytes | str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in IMAGE_FIELDS:
                raise BadRequest(f"unexpected file field {key!r}; files go in {', '.join(IMAGE_FIELDS)}")
            data = await value.read(max_upload + 1)
            if len(data) > max_upload:
                raise PayloadTooLarge(f"{key} is larger than the {max_upload // (1024 * 1024)} MB limit per image")
            images[key] = data
        elif key in IMAGE_FIELDS:
            if value:
                images[key] = value  # base64 text in a form field works too
        elif value != "" or key == "prompt":  # an empty optional form field means "not given"
            fields[key] = value
    try:
        req = GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from None
    return req, images


# --- the shared generate path ----------------------------------------------------------------------------------


def _render_success(job: Job, prepared: PreparedJob, elapsed: float) -> bytes:
    result = job.result
    assert result is not None
    request = prepared.request
    body = GenerateResponse(
        success=True,
        task_id=job.id,
        image_base64=base64.b64encode(result.png).decode("ascii"),
        error=None,
        elapsed_time=round(elapsed, 4),
        gpu_id=job.device,
        model_id=prepared.model_id,
        mode=request.mode,
        seed=result.seed,
        width=result.width,
        height=result.height,
        num_inference_steps=request.num_inference_steps,
        cfg=request.guidance_scale,
        strength=request.strength if request.input_image is not None else None,
        priority=prepared.priority,
        worker_id=job.worker_slot,
        timings={
            "queue_s": round(max(0.0, result.started_at - job.submitted_at), 6),
            "pipeline_s": round(result.pipeline_s, 6),
            "encode_s": round(result.encode_s, 6),
            "total_s": round(elapsed, 6),
            "started_at": result.started_at,
        },
    )
    return body.model_dump_json().encode()


async def _generate(service: Service, req: GenerateRequest, images: EncodedImages, started: float) -> Response:
    context: dict[str, Any] = {"model_id": req.model_id or service.config.model.id, "mode": req.mode}
    try:
        prepared = await run_in_threadpool(prepare_job, req, images, service.config, service.modes)
        context["task_id"] = prepared.request.job_id
        job = service.supervisor.submit(prepared.request, prepared.priority)
        await _wait_or_cancel(service, job)
        if job.error is not None:
            context["gpu_id"] = job.device
            raise job.error
        body = await run_in_threadpool(_render_success, job, prepared, time.perf_counter() - started)
        return Response(content=body, media_type="application/json")
    except GenServeError as exc:
        context["elapsed_time"] = time.perf_counter() - started
        raise exc.with_context(**context) from exc.__cause__


async def _wait_or_cancel(service: Service, job: Job) -> None:
    timeout = service.config.queue.task_timeout_s
    try:
        await asyncio.wait_for(wait_for_job(job), timeout=timeout)
    except asyncio.TimeoutError:
        service.supervisor.cancel(job, "timeout")
        raise JobTimeout(f"job did not finish within queue.task_timeout_s={timeout:g} s; it was stopped") from None
    except asyncio.CancelledError:
        service.supervisor.cancel(job, "request abandoned")
        raise


@router.post(
    "/generate",
    response_model=GenerateResponse,
    openapi_extra=_json_body_schema(),
    summary="Generate an image (JSON; images as base64 or data: URIs)",
)
async def generate_json(request: Request) -> Response:
    started = time.perf_counter()
    service = get_service(request)
    body = await _read_body(request, service.config.server.max_request_bytes)
    req, images = await run_in_threadpool(_parse_json_request, body)
    return await _generate(service, req, images, started)


@router.post(
    "/generate/img2img",
    response_model=GenerateResponse,
    openapi_extra=_form_body_schema(),
    summary="Generate an image (multipart form-data; images as files; any mode)",
)
async def generate_form(request: Request) -> Response:
    started = time.perf_counter()
    service = get_service(request)
    _refuse_declared_oversize(request, service.config.server.max_request_bytes)
    req, images = await _parse_form_request(request, service.config.limits.max_upload_bytes)
    return await _generate(service, req, images, started)


# --- service information ---------------------------------------------------------------------------------------


@router.get("/status", summary="Service, queue and per-worker state")
async def status(request: Request) -> dict[str, Any]:
    service = get_service(request)
    snapshot = service.supervisor.status()
    snapshot["version"] = __version__
    snapshot["model"] = {
        "model_id": service.config.model.id,
        "embedded_test_model": service.config.uses_embedded_model,
        "modes": list(service.modes),
    }
    return snapshot


@router.get("/models", summary="The served model")
async def models(request: Request) -> list[dict[str, Any]]:
    service = get_service(request)
    config = service.config
    embedded = config.uses_embedded_model
    description = (
        "EMBEDDED RANDOM-WEIGHT TEST MODEL standing in for FLUX.1-dev: the full pipeline runs, images are noise. "
        "Set model.path to a FLUX.1-dev folder for real images."
        if embedded
        else "Black Forest Labs FLUX.1-dev model for high-quality image generation"
    )
    return [
        {
            "model_id": config.model.id,
            "model_name": config.model.name + (" (embedded test model)" if embedded else ""),
            "description": description,
            "total_gpu_processes": service.supervisor.total_workers(),
            "available_gpu_processes": service.supervisor.ready_count(),
            "supported_features": [FEATURES[mode] for mode in service.modes],
            "embedded_test_model": embedded,
        }
    ]


@router.get("/health", summary="Liveness: the API process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: 200 once a worker can take jobs, else 503")
async def ready(request: Request) -> JSONResponse:
    service = get_service(request)
    snapshot = service.supervisor.status()
    ready_workers = sum(worker["state"] in ("ready", "busy") for worker in snapshot["workers"])
    body: dict[str, Any] = {
        "ready": ready_workers > 0 and snapshot["status"] != "stopping",
        "status": snapshot["status"],
        "ready_workers": ready_workers,
        "total_workers": len(snapshot["workers"]),
    }
    if not body["ready"]:
        body["reason"] = service.supervisor.not_ready_reason()
        errors = [f"worker {w['slot']}: {w['last_error']}" for w in snapshot["workers"] if w["last_error"]]
        if errors:
            body["worker_errors"] = errors
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
