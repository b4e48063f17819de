"""GenServe's native API: /generate, /generate/img2img, /status, /models, /health, /ready.

Runs on the API process's event loop. The synchronous generate routes are "submit and wait" on the job machinery
(genserve.job_manager): the job is recorded like any other, and its image is read back from the result store and
base64-encoded in the thread pool.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from annotated_types import Ge, Le
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from genserve import __version__
from genserve.auth import Caller, caller_of
from genserve.config import CONTROL_MODES, Config
from genserve.errors import GenServeError
from genserve.jobs import Job
from genserve.prepare import SIZE_MULTIPLE, PreparedJob, with_siblings
from genserve.routes import intake
from genserve.schemas import MAX_SEED, GeneratedImage, GenerateRequest, GenerateResponse
from genserve.service import Service, get_service

router = APIRouter()

FEATURES = {
    "text2img": "text-to-image",
    "img2img": "image-to-image",
    "fill": "fill",
    "controlnet": "controlnet",
    "redux": "redux",
}


# --- the shared generate path ----------------------------------------------------------------------------------


def _render_success(jobs: list[Job], prepared: PreparedJob, elapsed: float) -> bytes:
    """GenServe's single-image shape from the first job; with several images, an images list of all of them."""
    job = jobs[0]
    result = job.result
    assert result is not None
    request = job.request
    images = [_read_image(each) for each in jobs]
    body = GenerateResponse(
        success=True,
        task_id=job.id,
        image_base64=images[0].image_base64,
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
        strength=prepared.params.get("strength"),
        priority=prepared.priority,
        loras=prepared.params.get("loras"),
        worker_id=job.worker_slot,
        timings={
            "queue_s": round(max(0.0, result.started_at - job.submitted_at), 6),
            "pipeline_s": round(result.pipeline_s, 6),
            "encode_s": round(result.encode_s, 6),
            "batch_size": result.batch_size,
            "total_s": round(elapsed, 6),
            "started_at": result.started_at,
        },
        images=images if len(jobs) > 1 else None,
    )
    return body.model_dump_json().encode()


def _read_image(job: Job) -> GeneratedImage:
    result = job.result
    assert result is not None
    return GeneratedImage(
        task_id=job.id,
        image_base64=base64.b64encode(Path(result.image_path).read_bytes()).decode("ascii"),
        seed=result.seed,
        width=result.width,
        height=result.height,
        gpu_id=job.device,
    )


async def _submit_and_wait(request: Request, service: Service, prepared: PreparedJob, started: float) -> Response:
    jobs = await intake.submit_all(request, service, with_siblings(prepared, prepared.num_images))
    try:
        await intake.wait_for_jobs(request, service, jobs)
        body = await run_in_threadpool(_render_success, jobs, prepared, time.perf_counter() - started)
        return Response(content=body, media_type="application/json")
    except GenServeError as exc:
        raise exc.with_context(
            task_id=jobs[0].id,
            model_id=prepared.model_id,
            mode=jobs[0].request.mode,
            gpu_id=jobs[0].device,
            elapsed_time=time.perf_counter() - started,
        ) from None


@router.post(
    "/generate",
    response_model=GenerateResponse,
    openapi_extra=intake.json_body_schema(),
    summary="Generate an image (JSON; images as base64 or data: URIs)",
)
async def generate_json(request: Request) -> Response:
    started = time.perf_counter()
    service = get_service(request)
    prepared = await intake.prepare_json(request, service)
    return await _submit_and_wait(request, service, prepared, started)


@router.post(
    "/generate/img2img",
    response_model=GenerateResponse,
    openapi_extra=intake.form_body_schema(),
    summary="Generate an image (multipart form-data; images as files; any mode)",
)
async def generate_form(request: Request) -> Response:
    started = time.perf_counter()
    service = get_service(request)
    prepared = await intake.prepare_form(request, service)
    return await _submit_and_wait(request, service, prepared, started)


# --- service information ---------------------------------------------------------------------------------------


@router.get("/status", summary="Service, queue and per-worker state")
async def status(request: Request) -> dict[str, Any]:
    service = get_service(request)
    snapshot = service.supervisor.status()
    caller = caller_of(request)
    if not caller.admin:
        _hide_other_keys_jobs(snapshot, service, caller)
    snapshot["version"] = __version__
    snapshot["model"] = {
        "model_id": service.config.model.id,
        "embedded_test_model": service.config.uses_embedded_model,
        "modes": list(service.modes),
    }
    return snapshot


def _hide_other_keys_jobs(snapshot: dict[str, Any], service: Service, caller: Caller) -> None:
    """A tenant sees its own job ids on the workers, not other keys' (their ids would let it read them)."""

    def visible(job_id: str | None) -> bool:
        job = service.jobs.live(job_id) if job_id else None
        return job is not None and caller.sees(job.owner)

    for worker in snapshot["workers"]:
        worker["current_jobs"] = [job_id for job_id in worker["current_jobs"] if visible(job_id)]
        worker["encoding_jobs"] = [job_id for job_id in worker["encoding_jobs"] if visible(job_id)]
        if not visible(worker["current_job"]):
            worker["current_job"] = None


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
    plans = [
        {"slot": worker["slot"], **worker["memory_plan"]}
        for worker in service.supervisor.status()["workers"]
        if worker["memory_plan"] is not None
    ]
    return [
        {
            "model_id": config.model.id,
            "model_name": config.model.name + (" (embedded test model)" if embedded else ""),
            "description": description,
            "total_gpu_processes": service.supervisor.total_workers(),
            "available_gpu_processes": service.supervisor.ready_count(),
            "supported_features": [FEATURES[mode] for mode in service.modes],
            # Listed modes this server cannot serve, and why (a real model without that mode's weights).
            "disabled_modes": config.served_modes()[1],
            "embedded_test_model": embedded,
            # How each worker fits the model on its device (precision and placement per component).
            "memory_plans": plans,
            # What a client may ask for, so it can check a request before sending it (the playground's form does).
            "modes": list(service.modes),
            "limits": request_limits(config),
            "defaults": config.defaults.model_dump(),
            "controlnet_types": sorted(CONTROL_MODES),
        }
    ]


def request_limits(config: Config) -> dict[str, Any]:
    """The bounds genserve.prepare and genserve.schemas enforce on a request's fields."""
    limits = config.limits
    priority = GenerateRequest.model_fields["priority"].metadata  # [Ge, Le]: the schema's bounds, read, not copied
    return {
        **limits.model_dump(),
        "size_multiple": SIZE_MULTIPLE,
        "max_seed": MAX_SEED,
        "min_priority": next(bound.ge for bound in priority if isinstance(bound, Ge)),
        "max_priority": next(bound.le for bound in priority if isinstance(bound, Le)),
    }


@router.get("/", summary="What this server is, and where its API docs are")
async def root(request: Request) -> dict[str, Any]:
    return {
        "service": "GenServe",
        "version": __version__,
        "model_id": get_service(request).config.model.id,
        "docs": "/docs",
        "openapi": "/openapi.json",
        "status": "/status",
        "playground": "/ui",  # the web page; a browser opening / gets it too (genserve.routes.ui)
    }


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
        # Full: new work gets 429 until the queue drains; a load balancer may prefer another instance.
        "saturated": snapshot["queue"]["saturated"],
        "queue": snapshot["queue"],
    }
    if snapshot["reason"] or not body["ready"]:  # degraded, starting or stopping: say why, ready or not
        body["reason"] = service.supervisor.not_ready_reason()
    if not body["ready"]:
        errors = [f"worker {w['slot']}: {w['last_error']}" for w in snapshot["workers"] if w["last_error"]]
        if errors:
            body["worker_errors"] = errors
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
