"""The one place where errors become HTTP responses (API process).

GenServe errors, FastAPI's request validation errors and Starlette's HTTP exceptions all leave in GenServe's
error shape — ``success: false`` and ``error`` as GenServe's API document has it, plus FastAPI's ``detail`` and a stable
``error_type`` — with the status code the error class carries. Anything unexpected is logged with its traceback
and answered 500 without internals.
"""

from __future__ import annotations

import json
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
    errors = exc.errors()
    first = [str(part) for part in errors[0].get("loc", ())] if errors else []
    return BadRequest(describe_validation_errors(errors), param=".".join(first) or None)


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


# OpenAI's error "type" by status, so its SDK raises the exception its users expect.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_body(exc: GenServeError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": _OPENAI_TYPES.get(exc.status_code, "server_error"),
            "param": exc.param,
            "code": exc.code or exc.error_type,
        }
    }


def uses_openai_errors(path: str) -> bool:
    return path.startswith("/v1/")


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: text the client sent (echoed in a message) may not be encodable as UTF-8."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(exc: GenServeError, path: str = "") -> JSONResponse:
    """The one mapping from an error to a response: OpenAI's shape on /v1 routes, GenServe's everywhere else."""
    if exc.status_code >= 500:
        log.warning("%s: %s", exc.error_type, exc.message)
    if uses_openai_errors(path):
        body = openai_error_body(exc)
    else:
        body = native_error_body(exc.status_code, exc.error_type, exc.message, exc.context)
    return SafeJSONResponse(body, status_code=exc.status_code, headers=exc.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GenServeError)
    async def _genserve_error(request: Request, exc: GenServeError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(BadRequest(describe_validation_errors(list(exc.errors()))), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        error = GenServeError(message, headers=dict(exc.headers or {}))
        error.status_code = exc.status_code
        error.error_type = _STATUS_TYPES.get(exc.status_code, "http_error")
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # One line here; the server prints the traceback once more on its own (Starlette re-raises to it).
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(GenServeError("internal server error; see the server log"), request.url.path)
