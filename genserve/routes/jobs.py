"""The job API: submit without waiting, watch (poll or Server-Sent Events), cancel, list.

Runs on the API process's event loop; store reads and the supervisor's lock go through the thread pool.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from genserve.auth import caller_of
from genserve.errors import BadRequest
from genserve.job_manager import record_view
from genserve.jobs import Job, JobEvent, JobState, wait_for_job
from genserve.messages import CancelReason
from genserve.prepare import PreparedJob
from genserve.routes import intake
from genserve.service import Service, get_service

router = APIRouter(tags=["jobs"])

CANCEL_WAIT_S = 10.0  # a cancel answers once the job has stopped (next denoising step), or after this long
KEEP_ALIVE_S = 15.0  # SSE comment lines keep proxies from closing a quiet stream
MAX_OFFSET = 2**62  # SQLite integers are 64-bit: a larger offset would overflow, not just find nothing


def job_links(job_id: str) -> dict[str, str]:
    return {
        "status_url": f"/jobs/{job_id}",
        "result_url": f"/image/{job_id}",
        "events_url": f"/jobs/{job_id}/events",
        "cancel_url": f"/jobs/{job_id}/cancel",
    }


async def _accepted(service: Service, job: Job) -> JSONResponse:
    view = await run_in_threadpool(service.jobs.view, job.id)
    body = {"task_id": job.id, "status": view["status"], "queue_position": view["queue_position"], **job_links(job.id)}
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})


def _one_image(prepared: PreparedJob) -> PreparedJob:
    """A job is one image: several are several jobs (their ids are what a client polls and cancels)."""
    if prepared.num_images != 1:
        raise BadRequest(
            f"num_images must be 1 on /jobs (got {prepared.num_images}): submit one job per image "
            "(seeds seed, seed+1, …), or ask POST /generate for several"
        )
    return prepared


@router.post(
    "/jobs",
    status_code=202,
    openapi_extra=intake.json_body_schema(),
    summary="Submit a generation job (JSON, same fields as /generate); answers 202 at once",
)
async def submit_json(request: Request) -> JSONResponse:
    service = get_service(request)
    prepared = _one_image(await intake.prepare_json(request, service, form_route="/jobs/form"))
    return await _accepted(service, await intake.submit(request, service, prepared))


@router.post(
    "/jobs/form",
    status_code=202,
    openapi_extra=intake.form_body_schema(),
    summary="Submit a generation job (multipart form-data, same fields as /generate/img2img); answers 202 at once",
)
async def submit_form(request: Request) -> JSONResponse:
    service = get_service(request)
    prepared = _one_image(await intake.prepare_form(request, service, json_route="/jobs"))
    return await _accepted(service, await intake.submit(request, service, prepared))


@router.get("/jobs", summary="Jobs, newest first")
async def list_jobs(
    request: Request,
    status: str | None = Query(None, description="queued | running | completed | failed | canceled"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> dict[str, Any]:
    if status is not None and status not in {state.value for state in JobState}:
        raise BadRequest(f"status must be one of {', '.join(state.value for state in JobState)}, got {status!r}")
    service = get_service(request)
    listing: dict[str, Any] = await run_in_threadpool(service.jobs.list, status, limit, offset, caller_of(request))
    return listing


@router.get("/jobs/{job_id}", summary="One job: state, queue position or progress, result or error")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    service = get_service(request)
    view: dict[str, Any] = await run_in_threadpool(service.jobs.view, job_id, caller_of(request))
    return view


async def _cancel(request: Request, job_id: str) -> JSONResponse:
    service = get_service(request)
    job = await run_in_threadpool(service.jobs.cancel, job_id, CancelReason.CLIENT, caller_of(request))
    try:
        await asyncio.wait_for(wait_for_job(job), timeout=CANCEL_WAIT_S)
    except TimeoutError:
        pass  # still stopping: 202, and the job view says so
    view = await run_in_threadpool(service.jobs.view, job_id)
    return JSONResponse(view, status_code=200 if job.done else 202)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job: out of the queue at once, or stopped at its next step")
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    return await _cancel(request, job_id)


@router.delete("/jobs/{job_id}", summary="Cancel a job (same as POST /jobs/{id}/cancel)")
async def delete_job(request: Request, job_id: str) -> JSONResponse:
    return await _cancel(request, job_id)


def _sse(event: JobEvent) -> str:
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n"


@router.get(
    "/jobs/{job_id}/events",
    summary="Server-Sent Events: queued, started, progress…, then exactly one completed | failed | canceled",
    response_class=StreamingResponse,
)
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    service = get_service(request)
    found = await run_in_threadpool(service.jobs.find, job_id, caller_of(request))
    if isinstance(found, Job):
        stream = _live_events(found)
    else:
        final = JobEvent(job_id=job_id, seq=0, kind=found.status, data=record_view(found), at=0.0)
        stream = _one_event(final)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _one_event(event: JobEvent) -> AsyncIterator[str]:
    yield _sse(event)


async def _live_events(job: Job) -> AsyncIterator[str]:
    """The job's current state first, then each event as it happens, until its one terminal event."""
    snapshot, subscription = job.subscribe(asyncio.get_running_loop())
    try:
        for event in snapshot:
            yield _sse(event)
            if event.is_terminal:
                return
        while True:
            try:
                event = await asyncio.wait_for(subscription.events.get(), timeout=KEEP_ALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            yield _sse(event)
            if event.is_terminal:
                return
    finally:
        job.unsubscribe(subscription)
