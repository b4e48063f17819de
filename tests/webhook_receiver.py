"""A real webhook receiver for the tests: an HTTP server on a free loopback port, in a thread of the test process.

Every POST is verified with the ``standardwebhooks`` package, exactly as a user's receiver would do it, and
recorded (path, event type, webhook-id, the status answered, whether the signature verified). The path picks the
behaviour, so one receiver serves a whole test module:
- ``/hook/<token>`` answers 204;
- ``?fail=N`` answers 500 to the first N requests of each webhook-id (each event), then 204;
- ``&only=<event>`` limits the failures to that event (``only=started``: the others are accepted at once).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from standardwebhooks import Webhook, WebhookVerificationError

from tests.server import wait_until


@dataclass(frozen=True)
class Received:
    """One request the receiver got, and what it answered."""

    token: str  # the path's last part: which test (and route) it belongs to
    type: str  # job.started, job.progress, job.completed, …
    webhook_id: str
    timestamp: str
    status: int  # what the receiver answered
    verified: bool  # standardwebhooks.Webhook(secret).verify accepted it
    body: dict[str, Any]


class WebhookReceiver:
    def __init__(self, secret: str | bytes) -> None:
        self.verifier = Webhook(secret)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()  # requests per webhook-id, for ?fail=N
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, token: str | None = None, **query: Any) -> tuple[str, str]:
        """A fresh hook URL and its token (the path tells the receiver how to answer)."""
        token = token or uuid.uuid4().hex
        suffix = "&".join(f"{key}={value}" for key, value in query.items())
        return f"http://127.0.0.1:{self.port}/hook/{token}" + (f"?{suffix}" if suffix else ""), token

    def of(self, token: str) -> list[Received]:
        with self._lock:
            return [item for item in self.received if item.token == token]

    def wait_for(self, token: str, event_type: str, timeout: float = 60) -> list[Received]:
        """Everything ``token`` received, once a delivery of ``event_type`` was accepted."""

        def arrived() -> list[Received] | None:
            items = self.of(token)
            return items if any(i.type == event_type and i.status < 300 for i in items) else None

        return wait_until(arrived, timeout, 0.05, f"a {event_type} webhook for {token}")

    def trace(self, token: str) -> str:
        """One line per attempt: what a reader of the closing note needs to see."""
        lines = []
        for number, item in enumerate(self.of(token), 1):
            verified = "yes" if item.verified else "NO"
            lines.append(
                f"attempt {number}: {item.type:<14} webhook-id {item.webhook_id}  answered {item.status}  "
                f"signature verified: {verified}"
            )
        return "\n".join(lines)

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        parts = urlsplit(path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        try:
            payload = self.verifier.verify(body, headers)
            verified = True
        except WebhookVerificationError:
            payload, verified = json.loads(body or b"{}"), False
        webhook_id = headers.get("webhook-id", "")
        event_type = str(payload.get("type", ""))
        with self._lock:
            self._seen[webhook_id] += 1
            failing = int(query.get("fail", "0")) >= self._seen[webhook_id]
            if "only" in query and event_type != f"job.{query['only']}":
                failing = False
            status = 500 if failing else 204
            self.received.append(
                Received(
                    token=parts.path.rsplit("/", 1)[-1],
                    type=event_type,
                    webhook_id=webhook_id,
                    timestamp=headers.get("webhook-timestamp", ""),
                    status=status,
                    verified=verified,
                    body=payload,
                )
            )
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {key.lower(): value for key, value in self.headers.items()}
                self.send_response(receiver._answer(self.path, headers, body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # quiet: the test prints its own trace
                pass

        return Handler
