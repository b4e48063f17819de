"""The one place where errors become HTTP responses (API process).

GenServe errors, FastAPI's request validation errors and Starlette's HTTP exceptions all leave in GenServe's
error shape — ``success: false`` and ``error`` as seed 001 has it, plus FastAPI's ``detail`` and a stable
``error_type`` — with the status code the error class carries. Anything unexpected is logged with its traceback
and answered 500 without internals.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.errors import BadRequest, GenServeError

log = logging.getLogger(__name__)

_STATUS_TYPES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def describe_validation_errors(errors: list[Any]) -> str:
    """Pydantic errors → one line that names each field: "width: Input should be a valid integer"."""
    parts = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "form")]
        field = ".".join(location) or "request body"
        message = error.get("msg", "invalid value")
        if error.get("type") == "missing":
            message = "field required"
        message = message.removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return "; ".join(parts) or "invalid request"


def bad_request_from_validation(exc: ValidationError) -> BadRequest:
    return BadRequest(describe_validation_errors(exc.errors()))


def native_error_body(status_code: int, error_type: str, message: str, context: dict[str, Any]) -> dict[str, Any]:
    return {
        "success": False,
        "task_id": context.get("task_id"),
        "image_base64": None,
        "error": message,
        "detail": message,
        "error_type": error_type,
        "elapsed_time": round(float(context.get("elapsed_time", 0.0)), 4),
        "gpu_id": context.get("gpu_id"),
        "model_id": context.get("model_id"),
        "mode": context.get("mode"),
    }


def error_response(exc: GenServeError) -> JSONResponse:
    if exc.status_code >= 500:
        log.warning("%s: %s", exc.error_type, exc.message)
    body = native_error_body(exc.status_code, exc.error_type, exc.message, exc.context)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GenServeError)
    async def _genserve_error(request: Request, exc: GenServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(BadRequest(describe_validation_errors(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        error = GenServeError(message, headers=dict(exc.headers or {}))
        error.status_code = exc.status_code
        error.error_type = _STATUS_TYPES.get(exc.status_code, "http_error")
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(GenServeError("internal server error; see the server log"))
