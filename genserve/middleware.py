"""ASGI middleware of the API process: the request-body size cap, enforced while the body streams in.

A Content-Length over the cap is refused before a byte is read (in the routes); this catches what that cannot:
chunked uploads, which declare no length. The cap is counted on every ``http.request`` message the app receives,
and exceeding it raises PayloadTooLarge inside the route, which the one error mapping turns into a 413.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genserve.errors import PayloadTooLarge


@dataclass(frozen=True)
class BodyCap:
    """A body cap and the setting that sets it (named in the 413)."""

    max_bytes: int
    setting: str


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, routes: dict[str, BodyCap] | None = None) -> None:
        self.app = app
        self.default = BodyCap(max_bytes, "server.max_request_mb")
        self.routes = routes or {}  # exact path -> its own cap (the LoRA upload takes files larger than requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.routes.get(scope["path"], self.default)
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap.max_bytes:
                    raise PayloadTooLarge(
                        f"request body is larger than the {cap.max_bytes / (1024 * 1024):g} MB limit ({cap.setting})"
                    )
            return message

        await self.app(scope, counted_receive, send)
