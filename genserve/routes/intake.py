"""From an HTTP request to prepared, submitted jobs and back — shared by every route that generates.

Runs on the event loop; everything CPU-bound or blocking (JSON parsing, image decoding, the SQLite insert, the
supervisor's lock) is sent to the thread pool. Errors carry the request's model_id and mode for the error body.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from genserve.errors import BadRequest, GenServeError, JobTimeout, PayloadTooLarge
from genserve.http_errors import bad_request_from_validation
from genserve.jobs import Job, wait_for_job
from genserve.messages import CancelReason
from genserve.prepare import EncodedImages, PreparedJob, prepare_job
from genserve.schemas import IMAGE_FIELDS, GenerateRequest
from genserve.service import Service

DEADLINE_GRACE_S = 5.0  # how long past its deadline a waiting client still waits for the worker to confirm the stop
# Form fields that hold a list and may come repeated, as the openai SDK sends one in form-data (name[]=a, name[]=b)
REPEATABLE_FORM_FIELDS = ("webhook_events",)


def body_schema(
    model: type[BaseModel], *, json: bool = True, form: bool = False, files: tuple[str, ...] = ()
) -> dict[str, Any]:
    """OpenAPI requestBody for routes that parse their body themselves (to keep that work off the event loop)."""
    content: dict[str, Any] = {}
    if json:
        content["application/json"] = {"schema": _self_contained_schema(model)}
    if form:
        schema = _self_contained_schema(model)
        for field in files:
            schema["properties"][field] = {"type": "string", "format": "binary", "description": f"{field} file"}
        content["multipart/form-data"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


def _self_contained_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with nested models written in place: pydantic refers to them as ``#/$defs/X``, which
    means nothing inside an OpenAPI document (clients and fuzzers could not resolve it)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            if reference.startswith("#/$defs/"):
                return inline(definitions[reference.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


def json_body_schema() -> dict[str, Any]:
    return body_schema(GenerateRequest)


def form_body_schema() -> dict[str, Any]:
    return body_schema(GenerateRequest, json=False, form=True, files=IMAGE_FIELDS)


# --- body parsing ----------------------------------------------------------------------------------------------


def _body_too_large(max_bytes: int, setting: str = "server.max_request_mb") -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than the {max_bytes / (1024 * 1024):g} MB limit ({setting})")


def refuse_declared_oversize(request: Request, max_bytes: int, setting: str = "server.max_request_mb") -> None:
    """Refuse by Content-Length before reading a byte of an oversized body."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _body_too_large(max_bytes, setting)


async def read_body(request: Request, max_bytes: int) -> bytes:
    refuse_declared_oversize(request, max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


# JSON's \uXXXX escapes are the one way a lone UTF-16 surrogate gets into a str: raw UTF-8 cannot carry one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object with at least 'prompt'")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(body):  # rare: only then walk the strings
        _refuse_lone_surrogates(data, "request body")
    return data


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """A lone surrogate is not text: it cannot be tokenized, stored as UTF-8 or echoed back. Refuse it up front."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            raise BadRequest(f"{where} contains a lone UTF-16 surrogate escape (\\uD800-\\uDFFF), which is not text")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, where)
            _refuse_lone_surrogates(item, f"field {key!r}" if where == "request body" else where)
    elif isinstance(value, list):
        for item in value:
            _refuse_lone_surrogates(item, where)


def is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() in ("application/json", "")


def parse_json_request(body: bytes) -> tuple[GenerateRequest, EncodedImages]:
    data = parse_json_object(body)
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


async def read_form(
    request: Request, image_fields: tuple[str, ...], max_upload: int, keep_empty: tuple[str, ...] = ("prompt",)
) -> tuple[dict[str, Any], dict[str, bytes | str]]:
    """A multipart/urlencoded body → (text fields, images by field). Images may be files or base64/URL text."""
    form = await request.form(max_files=len(image_fields) + 4, max_fields=64)
    fields: dict[str, Any] = {}
    images: dict[str, bytes | str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in image_fields:
                raise BadRequest(f"unexpected file field {key!r}; files go in {', '.join(image_fields)}", param=key)
            if key in images:
                raise BadRequest(f"{key} was sent more than once; send one image", param=key)
            data = await value.read(max_upload + 1)
            if len(data) > max_upload:
                raise PayloadTooLarge(
                    f"{key} is larger than the {max_upload // (1024 * 1024)} MB limit per image", param=key
                )
            images[key] = data
        elif key in image_fields:
            if value:
                images[key] = value  # base64, a data: URI or an http(s) URL in a text field
        elif key.removesuffix("[]") in REPEATABLE_FORM_FIELDS:
            name = key.removesuffix("[]")
            if value:  # joined with commas, as a client may send them in one field
                fields[name] = f"{fields[name]},{value}" if name in fields else value
        elif value != "" or key in keep_empty:  # an empty optional form field means "not given"
            fields[key] = value
    return fields, images


async def parse_form_request(request: Request, max_upload: int) -> tuple[GenerateRequest, EncodedImages]:
    fields, images = await read_form(request, IMAGE_FIELDS, max_upload)
    try:
        req = GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from None
    return req, images


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def prepare_json(request: Request, service: Service, form_route: str = "/generate/img2img") -> PreparedJob:
    if _media_type(request) in FORM_TYPES:
        raise BadRequest(f"{request.url.path} takes a JSON body; send form-data (file uploads) to {form_route}")
    body = await read_body(request, service.config.server.max_request_bytes)
    req, images = await run_in_threadpool(parse_json_request, body)
    return await _prepare(service, req, images)


async def prepare_form(request: Request, service: Service, json_route: str = "/generate") -> PreparedJob:
    if _media_type(request) == "application/json":
        raise BadRequest(f"{request.url.path} takes form-data (file uploads); send JSON to {json_route}")
    refuse_declared_oversize(request, service.config.server.max_request_bytes)
    req, images = await parse_form_request(request, service.config.limits.max_upload_bytes)
    return await _prepare(service, req, images)


async def _prepare(service: Service, req: GenerateRequest, images: EncodedImages) -> PreparedJob:
    try:
        return await run_in_threadpool(prepare_job, req, images, service.config, service.modes, service.loras)
    except GenServeError as exc:
        raise exc.with_context(model_id=req.model_id or service.config.model.id, mode=req.mode) from None


def request_timeout(request: Request, prepared: PreparedJob, cap: float) -> float:
    """The job's time budget: the body's timeout field, else the X-Request-Timeout header, capped by config."""
    asked = prepared.timeout_s
    header = request.headers.get("x-request-timeout")
    if asked is None and header is not None:
        try:
            asked = float(header)
        except ValueError:
            asked = None
        if asked is None or not 0 < asked < float("inf"):
            raise BadRequest(f"X-Request-Timeout must be a positive number of seconds, got {header!r}")
    return cap if asked is None else min(asked, cap)


async def submit(request: Request, service: Service, prepared: PreparedJob) -> Job:
    return (await submit_all(request, service, [prepared]))[0]


async def submit_all(request: Request, service: Service, batch: list[PreparedJob]) -> list[Job]:
    """Queue every image of a request, or none (the job manager admits them together)."""
    first = batch[0]
    timeout_s = request_timeout(request, first, service.config.queue.task_timeout_s)
    owner = getattr(request.state, "api_key", None)
    request_id = getattr(request.state, "request_id", None)
    try:
        return await run_in_threadpool(
            service.jobs.submit_all, batch, owner=owner, request_id=request_id, timeout_s=timeout_s
        )
    except GenServeError as exc:
        raise exc.with_context(task_id=first.request.job_id, model_id=first.model_id, mode=first.request.mode) from None


async def wait_for_jobs(request: Request, service: Service, jobs: list[Job]) -> None:
    """Wait until every job has ended; raise the first failure (stopping the rest: nobody gets a partial answer).

    The supervisor enforces each job's deadline (a timed-out job ends failed with JobTimeout, raised here as 408).
    The wait itself gives up DEADLINE_GRACE_S later, should a worker not answer the stop. A client that hangs up gets
    its still-queued jobs cancelled (queue.cancel_abandoned); running ones finish and stay retrievable by id.
    """
    timeout = max(job.schedule.seconds_left() for job in jobs) + DEADLINE_GRACE_S
    finished = asyncio.ensure_future(asyncio.wait_for(_until_all_end_or_one_fails(jobs), timeout=timeout))
    hung_up = asyncio.ensure_future(_client_hangs_up(request))
    try:
        await asyncio.wait({finished, hung_up}, return_when=asyncio.FIRST_COMPLETED)
        if not finished.done() and service.config.queue.cancel_abandoned:
            for job in jobs:
                service.supervisor.cancel_queued(job, CancelReason.DISCONNECTED)
        await finished  # raises TimeoutError at the deadline
    except TimeoutError:
        for job in jobs:
            service.supervisor.cancel(job, CancelReason.TIMEOUT)
        raise JobTimeout(
            f"job did not finish within its deadline of {jobs[0].schedule.timeout_s:g} s (the request's timeout, "
            "capped by queue.task_timeout_s); it was stopped"
        ) from None
    except asyncio.CancelledError:
        for job in jobs:
            service.supervisor.cancel(job, CancelReason.ABANDONED)
        raise
    finally:
        for task in (finished, hung_up):
            task.cancel()
    failed = next((job for job in jobs if job.error is not None), None)
    if failed is not None:
        for job in jobs:
            service.supervisor.cancel(job, CancelReason.SIBLING_FAILED)
        assert failed.error is not None
        raise failed.error


async def _until_all_end_or_one_fails(jobs: list[Job]) -> None:
    for job in jobs:
        await wait_for_job(job)
        if job.error is not None:
            return


async def _client_hangs_up(request: Request) -> None:
    """Returns when the client disconnects (the request body has been read, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
