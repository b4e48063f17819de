"""HTTP limits at the edge: the uvicorn HTTP protocol of the API process.

uvicorn's own httptools protocol accepts a request head (request line and headers) of any size with any number of
headers, buffering all of it, and never times out a client that stops part-way through its headers. The protocol
here is that same protocol with three guards, set by the ``server`` section of the configuration:

- ``max_header_kb``: the request head may hold at most this many KiB. Bytes are counted as they arrive, and no byte
  past the limit reaches the parser, so memory stays flat however much a client sends;
- ``max_headers``: the request may carry at most this many headers;
- ``header_timeout_s``: a request head must be complete within this many seconds of its first byte (of the opening
  of the connection, for a fresh connection), else the connection is closed (slowloris defence). An idle keep-alive
  connection between two requests stays uvicorn's ``timeout_keep_alive`` business.

A head over either limit gets ``431 Request Header Fields Too Large`` (``414 URI Too Long`` when the request line
alone is over the size limit), a head that is too slow ``408 Request
Timeout`` (a connection that sent nothing is just closed), both in GenServe's native error shape with ``Connection:
close``. After a 431 the server parses nothing more and closes its side; for a moment it keeps reading and dropping
what the client still sends, so that the client's TCP stack does not reset the connection before the client has
read the answer (RFC 9112, section 9.6). When an earlier pipelined request's response is still being written, no
answer can go before it: the connection just closes once that response is complete.

The head size is exact when a head starts at the beginning of a read, as it does unless the client pipelines. A
head that begins part-way through a read is counted from what the parser has handed over, so it can pass the limit
by at most one read before it is refused. Everything else (keep-alive, pipelining, WebSocket upgrades, uvicorn's 400
for a malformed request) is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from genserve.config import ServerConfig
from genserve.http_errors import native_error_body

log = logging.getLogger(__name__)

# After an answer that ends the connection: how long, and how many bytes, the server keeps reading and dropping what
# the client still sends before it closes for good.
LINGER_S = 2.0
LINGER_MAX_BYTES = 16 * 1024 * 1024


class _Refused(Exception):
    """Raised from a parser callback to stop the parser at once; the answer is already on its way."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head. Limits are class attributes: see
    :func:`http_protocol`, because uvicorn builds one instance per connection with its own arguments only."""

    max_head_bytes: ClassVar[int] = 64 * 1024
    max_headers: ClassVar[int] = 100
    header_timeout_s: ClassVar[float] = 10.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Per-request state; a request head is being read from the connection's first byte until its headers are
        # complete, and again from the end of each message.
        self._in_head = True
        self._head_bytes = 0  # bytes of the current head fed to the parser
        self._head_begun = False  # the parser has seen the current request's first byte
        self._line_done = False  # the current head's request line has ended (a 414 before, a 431 after)
        self._messages_done = 0  # tells whether a feed ended one message and began the next (pipelining)
        self._head_deadline: float | None = None  # loop time by which the current head must be complete
        # At most one timer per connection, checking the deadline. It is not cancelled when a head completes (a
        # timer per request would add microseconds to every request); when it fires it re-arms for a later deadline.
        self._head_timer: asyncio.TimerHandle | None = None
        # Per-connection state after a refusal: nothing more is parsed.
        self._refused = False
        self._linger_left: int | None = None  # bytes still dropped before closing; None: not lingering
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- connection -----------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._refused:
            self._drop(len(data))
            return
        rest: bytes | memoryview = data
        while rest:
            if self._in_head:
                if self._head_deadline is None:
                    self._start_head_clock()
                # Feed no more than the head may still hold: past that, nothing reaches the parser.
                room = self.max_head_bytes - self._head_bytes
                if len(rest) > room:
                    view = memoryview(rest)
                    piece: bytes | memoryview = view[:room]
                    rest = view[room:]
                else:
                    piece, rest = rest, b""
            else:
                piece, rest = rest, b""
            if self._in_head and not self._line_done:
                self._line_done = (piece.find(b"\n") if isinstance(piece, bytes) else bytes(piece).find(b"\n")) >= 0
            messages_done = self._messages_done
            if not self._feed(piece):
                if self._refused:
                    self._drop(len(rest))
                return
            if self._in_head:
                if self._messages_done == messages_done:
                    self._head_bytes += len(piece)  # the whole piece belongs to this head
                else:  # the piece ended a message and began the next one (pipelining): count what the parser saw
                    self._head_bytes = self._parsed_head_bytes()
                if self._head_bytes >= self.max_head_bytes:  # ...and the head is still not complete
                    if self._line_done:
                        self._refuse_large(f"request line and headers exceed {self.max_head_bytes} bytes")
                    else:  # the request line (its URL) alone is too long
                        self._refuse_url_too_long()
                    self._drop(len(rest))
                    return

    def _feed(self, piece: bytes | memoryview) -> bool:
        """uvicorn's parsing step. False when this connection is parsed no further."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError:
            if self._refused:  # a callback refused the request
                return False
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return not self._refused

    # --- parser callbacks (they call the base class directly: cheaper than super() on this hot path) -------------

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self._head_begun = True
        if self._head_deadline is None:
            self._start_head_clock()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_headers:
            self._refuse_large(f"more than {self.max_headers} request headers")
            raise _Refused
        HttpToolsProtocol.on_header(self, name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_deadline = None
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._in_head = True
        self._head_bytes = 0
        self._head_begun = False
        self._line_done = False
        self._messages_done += 1

    def _parsed_head_bytes(self) -> int:
        """What the parser has handed over of the current head: a lower bound of its size (the header being read
        is left out), used only when a head begins part-way through a piece of data."""
        if not self._head_begun:
            return 0
        return len(self.url) + sum(len(name) + len(value) + 3 for name, value in self.headers)  # "n:v\r\n"

    # --- timeout --------------------------------------------------------------------------------------------------

    def _start_head_clock(self) -> None:
        self._head_deadline = self.loop.time() + self.header_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._check_head_deadline)

    def _check_head_deadline(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self._refused or self.transport.is_closing():
            return  # no head being read: the next one starts the timer again
        if deadline > self.loop.time() + 0.01:  # a later request's head: wait for its own deadline
            self._head_timer = self.loop.call_at(deadline, self._check_head_deadline)
            return
        if self._head_begun or self._head_bytes:
            message = f"request headers not complete within {self.header_timeout_s:g} s"
            log.info("408 to %s: %s", self._peer(), message)
            self._refuse(408, "header_timeout", message, linger=False)
        else:  # a connection that never sent a byte: nobody to answer
            log.debug("closing %s: no request within %g s", self._peer(), self.header_timeout_s)
            self._refuse(None, "", "", linger=False)

    # --- refusal --------------------------------------------------------------------------------------------------

    def _refuse_url_too_long(self) -> None:
        message = f"request line (the URL) exceeds {self.max_head_bytes} bytes (server.max_header_kb)"
        log.warning("414 to %s: %s", self._peer(), message)
        self._refuse(414, "uri_too_long", message, linger=True)

    def _refuse_large(self, message: str) -> None:
        log.warning("431 to %s: %s", self._peer(), message)
        self._refuse(431, "headers_too_large", message, linger=True)

    def _refuse(self, status: int | None, error_type: str, message: str, linger: bool) -> None:
        """Parse nothing more; answer ``status`` (None: no answer) and end the connection."""
        self._refused = True
        self._head_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request's response is still being written (pipelining): nothing can go before it, so the
            # connection ends once it is complete; meanwhile the rest of the input is not read.
            self.cycle.keep_alive = False
            return
        if status is not None:
            self.transport.write(self._answer(status, error_type, message))
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then FIN; the client's further bytes are read and dropped
            self._linger_left = LINGER_MAX_BYTES
            self._linger_timer = self.loop.call_later(LINGER_S, self._close)
        else:
            self._close()

    def _drop(self, size: int) -> None:
        """Bytes that arrive after a refusal: never parsed nor kept."""
        if self.transport.is_closing():
            return
        if self._linger_left is None:  # an earlier response is still being written: stop reading until it is done
            self.transport.pause_reading()
            return
        self._linger_left -= size
        if self._linger_left <= 0:
            self._close()

    def _close(self) -> None:
        self._linger_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _answer(self, status: int, error_type: str, message: str) -> bytes:
        body = json.dumps(native_error_body(status, error_type, message, {}), separators=(",", ":")).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        return b"".join(content)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"


def http_protocol(server: ServerConfig) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with the limits of ``server``."""

    class GenServeHttpProtocol(LimitedHttpToolsProtocol):
        max_head_bytes = max(1, int(server.max_header_kb * 1024))
        max_headers = server.max_headers
        header_timeout_s = server.header_timeout_s

    return GenServeHttpProtocol
