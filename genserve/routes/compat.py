"""Routes of the systems GenServe replaces, on the same job machinery.

- The FLUX.1 DEV API (FLUX.1-dev over ComfyUI): ``GET /image/{task_id}`` (the PNG, or re-encoded with ``?format=``),
  ``GET /queue``.
- The ComfyUI API Service: ``GET /api/task_status/{id}``, ``GET /api/history``, ``GET /api/history/{id}``,
  ``GET /api/image/{id}``.

Runs on the API process's event loop; store reads and image re-encoding go through the thread pool.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from genserve.auth import caller_of
from genserve.errors import NotFound
from genserve.images import reencode
from genserve.job_manager import record_of, record_view
from genserve.jobs import Job, JobState
from genserve.routes.jobs import MAX_OFFSET
from genserve.service import get_service
from genserve.store import JobRecord

router = APIRouter(tags=["compatibility"])

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


async def _find(request: Request, job_id: str) -> Job | JobRecord:
    """The job, if the caller may see it (its own, or any for an admin key); else NotFound."""
    found: Job | JobRecord = await run_in_threadpool(get_service(request).jobs.find, job_id, caller_of(request))
    return found


def _as_record(found: Job | JobRecord) -> JobRecord:
    return record_of(found) if isinstance(found, Job) else found


def _absolute(request: Request, path: str) -> str:
    return str(request.base_url).rstrip("/") + path


# --- the FLUX.1 DEV API (FLUX.1-dev over ComfyUI) --------------------------------------------------------------------


_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {media: {} for media in MEDIA_TYPES.values()}}}


@router.get(
    "/image/{task_id}",
    summary="The job's image: PNG, or re-encoded as JPEG/WEBP on request",
    response_class=Response,
    responses=_IMAGE_RESPONSES,
    operation_id="get_image",
)
@router.head(
    "/image/{task_id}",
    summary="The job's image headers (type, length) without the image",
    response_class=Response,
    responses=_IMAGE_RESPONSES,
    operation_id="head_image",
)
async def get_image(
    request: Request,
    task_id: str,
    format: Literal["png", "jpeg", "jpg", "webp"] = Query("png", description="png (as stored), jpeg (or jpg), webp"),
    quality: int = Query(90, ge=1, le=100, description="JPEG/WEBP quality"),
) -> Response:
    service = get_service(request)
    record = _as_record(await _find(request, task_id))
    if record.status != JobState.COMPLETED.value:
        raise NotFound(f"job {task_id} has no image (status: {record.status})")
    path = await run_in_threadpool(service.store.acquire, task_id)  # retention must leave it; may fetch it
    if not path.is_file():
        service.store.release(task_id)
        raise NotFound(f"the image of job {task_id} was deleted by retention")
    if format == "png":
        return FileResponse(path, media_type="image/png", background=BackgroundTask(service.store.release, task_id))
    if format == "jpg":
        format = "jpeg"
    try:
        data = await run_in_threadpool(reencode, str(path), format, quality)
    finally:
        service.store.release(task_id)
    return Response(data, media_type=MEDIA_TYPES[format])


@router.get("/queue", summary="Running and pending jobs (the FLUX.1 DEV API's /queue shape)")
async def queue(request: Request) -> dict[str, list[dict[str, Any]]]:
    service = get_service(request)
    listing: dict[str, list[dict[str, Any]]] = await run_in_threadpool(service.jobs.queue_listing, caller_of(request))
    return listing


# --- the ComfyUI API Service -----------------------------------------------------------------------------------------


def _images(request: Request, record: JobRecord) -> list[dict[str, str]]:
    if record.status != JobState.COMPLETED.value:
        return []
    return [
        {
            "url": _absolute(request, f"/image/{record.id}"),
            "filename": f"{record.id}.png",
            "subfolder": "",
            "type": "output",
        }
    ]


def _history_entry(request: Request, record: JobRecord) -> dict[str, Any]:
    view = record_view(record)
    return {
        "status": record.status,
        "params": record.params,
        "images": _images(request, record),
        "submitted_at": record.submitted_at,
        "execution_time": view.get("execution_time"),
        "error": view["error"],
    }


@router.get("/api/task_status/{task_id}", summary="Task status with queue position (ComfyUI API Service shape)")
async def task_status(request: Request, task_id: str) -> JSONResponse:
    service = get_service(request)
    try:
        found = await _find(request, task_id)
    except NotFound:
        return JSONResponse({"status": "not_found", "message": f"task {task_id} not found"}, status_code=404)
    if isinstance(found, Job) and found.state is JobState.QUEUED:
        position = await run_in_threadpool(service.supervisor.queue_position, found)
        return JSONResponse({"status": "pending", "message": "Task is waiting in queue", "queue_position": position})
    if isinstance(found, Job) and found.state is JobState.RUNNING:
        info = {"worker": found.worker_slot, "device": found.device, "started_at": found.started_at}
        return JSONResponse(
            {
                "status": "running",
                "message": "Task is currently running",
                "execution_info": {**info, **found.progress_data()},
            }
        )
    record = _as_record(found)
    view = record_view(record)
    if record.status == JobState.COMPLETED.value:
        return JSONResponse(
            {
                "status": "completed",
                "message": "Image generation completed",
                "images": _images(request, record),
                "execution_time": view.get("execution_time"),
                "node_errors": {},
            }
        )
    reason = record.error_message or record.cancel_reason or record.status
    return JSONResponse({"status": "error", "message": f"task {record.status}: {reason}", "error": view["error"]})


@router.get("/api/history", summary="Recent tasks, newest first (ComfyUI API Service shape)")
async def history(
    request: Request, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)
) -> dict[str, Any]:
    service = get_service(request)
    records, _ = await run_in_threadpool(service.store.list, None, limit, offset, caller_of(request).only_owner)
    return {record.id: _history_entry(request, record) for record in records}


@router.get("/api/history/{task_id}", summary="One task's history entry (ComfyUI API Service shape)")
async def history_one(request: Request, task_id: str) -> dict[str, Any]:
    record = _as_record(await _find(request, task_id))
    return {record.id: _history_entry(request, record)}


@router.get("/api/image/{task_id}", summary="The task's images as URLs (ComfyUI API Service shape)")
async def image_info(request: Request, task_id: str) -> dict[str, Any]:
    record = _as_record(await _find(request, task_id))
    if record.status != JobState.COMPLETED.value:
        raise NotFound(f"task {task_id} has no image (status: {record.status})")
    return {"status": "success", "images": _images(request, record)}
