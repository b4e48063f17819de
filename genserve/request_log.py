"""ASGI middleware of the API process: the request id and the access log (and the request figures of /metrics).

Every request gets an id: the client's ``X-Request-ID`` when it sends a sane one (so a request can be followed
from the caller's own logs), else a new one. It is put on ``request.state.request_id`` (jobs store it and hand it
to their worker, whose log lines carry it), and sent back as ``X-Request-ID`` on every answer, errors included.

When the answer is complete, one line goes to the ``genserve.access`` logger (``server.access_log``): method, path,
status, duration, request id and the API key's name — never the key, never the query string (where a careless
client may put one). The same figures go to ``app.state.metrics`` when /metrics is served.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Protocol

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("genserve.access")

REQUEST_ID_HEADER = "x-request-id"
# What a client-sent id may look like: long enough for UUIDs and trace ids, nothing that could forge a log line.
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
UNMATCHED_ROUTE = "unmatched"  # the route label of a path no route serves (metrics must not grow per bad path)


class RequestObserver(Protocol):
    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None: ...


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is sane, else a new one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1").strip()
            if _SANE_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The path template that served the request (``/jobs/{job_id}``), so figures group by route, not by id."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    return _matching_route(scope) or UNMATCHED_ROUTE


def _matching_route(scope: Scope) -> str | None:
    """For answers given before routing (a 413 from the body cap, a 401): the route the path would have matched."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", []):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            path = getattr(route, "path", None)
            return path if isinstance(path, str) else None
    return None


class RequestLog:
    def __init__(self, app: ASGIApp, *, log_requests: bool) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        began = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering (uvicorn sends a 500)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._done(scope, status, time.perf_counter() - began, request_id)

    def _done(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        method: str = scope["method"]
        state: dict[str, Any] = scope.get("state", {})
        key = state.get("api_key")
        observer: RequestObserver | None = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
        if observer is not None:
            observer.observe_request(method, route_of(scope), status, seconds)
        if not self.log_requests:
            return
        fields = {
            "method": method,
            "path": scope["path"],
            "status": status,
            "duration_s": round(seconds, 4),
            "request_id": request_id,
            "key": key,
            "client": (scope.get("client") or ("-",))[0],
        }
        access_log.info(
            '%s "%s %s" %d %.3fs request_id=%s key=%s',
            fields["client"],
            method,
            scope["path"],
            status,
            seconds,
            request_id,
            key or "-",
            extra={"fields": fields},
        )
