"""Log lines of every GenServe process (API and workers): text or JSON, and which job and request a line is about.

``server.log_format`` picks the shape: ``text`` (one human line) or ``json`` (one object per line, for a log
collector). A line logged while a job's context is set (``job_context``, in the worker while it runs a job, in the
encoder while it writes one) carries that job's id and the ``X-Request-ID`` of the request that submitted it, so
``grep REQUEST_ID`` finds the access-log line, the API's "queued" line and the worker's lines of one request.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

LogFormat = Literal["text", "json"]

_current: ContextVar[JobTags | None] = ContextVar("genserve_job", default=None)


@dataclass(frozen=True)
class JobTags:
    """What a log line is about: job ids (several for a batch) and their request ids."""

    job_ids: tuple[str, ...]
    request_ids: tuple[str, ...]


@contextmanager
def job_context(jobs: Iterable[tuple[str, str]]) -> Iterator[None]:
    """Tag the lines logged by this thread inside the block with these (job id, request id) pairs."""
    pairs = list(jobs)
    request_ids = tuple(dict.fromkeys(request_id for _, request_id in pairs if request_id))
    token = _current.set(JobTags(tuple(job_id for job_id, _ in pairs), request_ids))
    try:
        yield
    finally:
        _current.reset(token)


class _JobTagFilter(logging.Filter):
    """Puts the current job context on every record (``record.job_ids``, ``record.request_ids``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        tags = _current.get()
        if not hasattr(record, "job_ids"):
            record.job_ids = tags.job_ids if tags else ()
        if not hasattr(record, "request_ids"):
            record.request_ids = tags.request_ids if tags else ()
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL process logger: message [job=… request_id=…]``."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = []
        job_ids: tuple[str, ...] = getattr(record, "job_ids", ())
        request_ids: tuple[str, ...] = getattr(record, "request_ids", ())
        if job_ids:
            tags.append("job=" + ",".join(job_ids))
        if request_ids:
            tags.append("request_id=" + ",".join(request_ids))
        return f"{line} [{' '.join(tags)}]" if tags else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, process, logger, message, and the job/request tags and ``fields``
    (the access log's method, path, status …) when the line has them."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_ids: tuple[str, ...] = getattr(record, "job_ids", ())
        request_ids: tuple[str, ...] = getattr(record, "request_ids", ())
        if job_ids:
            entry["job_id"] = job_ids[0] if len(job_ids) == 1 else list(job_ids)
        if request_ids:
            entry["request_id"] = request_ids[0] if len(request_ids) == 1 else list(request_ids)
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, log_format: LogFormat, process: str) -> None:
    """Send every log line of this process to stderr in the configured shape (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if log_format == "json" else TextFormatter(process))
    handler.addFilter(_JobTagFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
