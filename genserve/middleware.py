"""ASGI middleware of the API process: the request-body size cap, enforced while the body streams in.

A Content-Length over the cap is refused before a byte is read (in the routes); this catches what that cannot:
chunked uploads, which declare no length. The cap is counted on every ``http.request`` message the app receives,
and exceeding it raises PayloadTooLarge inside the route, which the one error mapping turns into a 413.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genserve.errors import PayloadTooLarge


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(
                        f"request body is larger than the {self.max_bytes // (1024 * 1024)} MB limit "
                        "(server.max_request_mb)"
                    )
            return message

        await self.app(scope, counted_receive, send)
