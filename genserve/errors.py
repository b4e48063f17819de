"""The error hierarchy of the API process.

Every failure a client can see is one of these; each class carries its HTTP status and a stable ``error_type``.
``genserve.http_errors`` is the one place that turns them (and framework errors) into HTTP responses.
Split as vLLM does: "this request is bad / this job failed" versus "the service cannot take work right now".
"""

from __future__ import annotations

from typing import Any


class GenServeError(Exception):
    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, when one is (OpenAI error bodies carry it)
        self.code = code  # a finer machine-readable reason, e.g. model_not_found
        # Request facts the native error body echoes (task_id, model_id, mode); filled in by the route.
        self.context: dict[str, Any] = {}

    def with_context(self, **context: Any) -> GenServeError:
        for key, value in context.items():
            self.context.setdefault(key, value)
        return self


# --- the request is at fault (4xx) -------------------------------------------------------------------------------


class BadRequest(GenServeError):
    status_code = 400
    error_type = "bad_request"


class NotFound(GenServeError):
    status_code = 404
    error_type = "not_found"


class AlreadyEnded(GenServeError):
    """An operation on a job that has already finished (cancelling a completed job)."""

    status_code = 409
    error_type = "conflict"


class Unauthorized(GenServeError):
    """No API key, or one the server does not know."""

    status_code = 401
    error_type = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")


class Forbidden(GenServeError):
    """A known API key without the scope the route needs."""

    status_code = 403
    error_type = "forbidden"


class TooManyRequests(GenServeError):
    """Admission control: the queue is at its depth limit, or the key has its quota of jobs in flight."""

    status_code = 429
    error_type = "too_many_requests"


class PayloadTooLarge(GenServeError):
    status_code = 413
    error_type = "payload_too_large"


# --- the service cannot take the work now (503) ------------------------------------------------------------------


class ServiceUnavailable(GenServeError):
    status_code = 503
    error_type = "unavailable"


class NotReady(ServiceUnavailable):
    error_type = "not_ready"


class QueueFull(TooManyRequests):
    error_type = "queue_full"


class ShuttingDown(ServiceUnavailable):
    error_type = "shutting_down"


# --- an accepted job did not produce an image --------------------------------------------------------------------


class JobTimeout(GenServeError):
    status_code = 408
    error_type = "timeout"


class JobCanceled(GenServeError):
    status_code = 409
    error_type = "canceled"


class JobFailed(GenServeError):
    """The pipeline raised inside a worker; the worker itself is fine."""

    status_code = 500
    error_type = "job_failed"


class OutOfMemory(JobFailed):
    """The device (or host) ran out of memory for this job; the worker freed its cache and serves on."""

    error_type = "out_of_memory"


class WorkerDied(GenServeError):
    status_code = 500
    error_type = "worker_died"


class DeviceError(JobFailed):
    """A fatal device error (illegal memory access, device-side assert): the job failed and its worker restarts."""

    error_type = "device_error"


# The errors a job can end with, by error_type: a cluster node that learns of a job's end from another node (an
# event on Redis carries only the type and message) raises the same class, so the client gets the same status.
JOB_ERRORS: dict[str, type[GenServeError]] = {
    cls.error_type: cls
    for cls in (JobTimeout, JobCanceled, JobFailed, OutOfMemory, DeviceError, WorkerDied, ShuttingDown)
}


def job_error(error_type: str, message: str) -> GenServeError:
    """The error a job ended with, rebuilt from its type and message (an unknown type: a 500 of that type)."""
    cls = JOB_ERRORS.get(error_type)
    if cls is not None:
        return cls(message)
    error = GenServeError(message)
    error.error_type = error_type
    return error
