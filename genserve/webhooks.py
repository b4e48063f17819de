"""Signed webhooks: a job's events POSTed to the URL its request named, the Standard Webhooks way (API process).

The pieces, in the order a job meets them:
- ``webhook_spec`` checks a request's ``webhook_url`` and ``webhook_events`` at submission (thread pool): an http(s)
  URL whose host passes the same SSRF guard as image URLs (genserve.fetch), known event names, and a configured
  ``webhooks.secret`` (an unsigned delivery could be forged by anyone, so without a secret the request is refused).
- ``WebhookDispatcher.watch`` registers the job. Its listener runs in whichever thread moves the job (usually the
  supervisor's monitor), under the job's lock, so it only appends a delivery to the job's lane and returns.
- The ``genserve-webhook-N`` threads deliver. A delivery is one event: a JSON body
  ``{"type": "job.<event>", "timestamp", "data"}`` with the headers ``webhook-id`` (the same on every retry),
  ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` + base64 HMAC-SHA256, made by the ``standardwebhooks``
  package). 2xx is delivered; anything else, a refused address or a connection error is retried after
  ``backoff_s``, doubling up to ``backoff_max_s``, until ``max_attempts``. Each attempt resolves and vets the host
  again (DNS rebinding) and is bounded by ``timeout_s``. Redirects are not followed (a 3xx is a failure).
- Every change of a delivery's status is handed to the persistence writer as the record's ``webhook`` column:
  ``{"url", "events", "deliveries": [{"event", "id", "status", "attempts", "last_status_code", "last_error"}]}``.

Ordering: a job's deliveries wait in its lane, and only the head of a lane is ever tried, by one thread at a time;
so one job's events arrive in order (a retried event holds back the ones after it). Lanes of different jobs go in
parallel, and a lane waiting out its backoff holds no thread. ``progress`` is rate-limited per job
(``progress_interval_s``) and never retried once a later event waits behind it (that one says more).

Lock: ``_cond`` guards the lanes and the schedule. The listener takes it while holding a job's lock (the order
genserve.job_manager writes down: the job's lock first); nothing is taken while it is held, and no I/O happens
under it (the writer's queue is a lock-free put).
"""

from __future__ import annotations

import base64
import binascii
import heapq
import http.client
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from standardwebhooks import Webhook

from genserve import __version__
from genserve.config import Config, ConfigError
from genserve.errors import BadRequest
from genserve.fetch import FetchPolicy, vetted_connection
from genserve.jobs import Job, JobEvent
from genserve.persistence import PersistenceWriter

log = logging.getLogger(__name__)

WebhookEvent = Literal["started", "progress", "completed", "failed", "canceled"]
EVENTS: tuple[WebhookEvent, ...] = ("started", "progress", "completed", "failed", "canceled")
DEFAULT_EVENTS: tuple[WebhookEvent, ...] = ("started", "completed", "failed", "canceled")  # progress when asked
TERMINAL_EVENTS = frozenset({"completed", "failed", "canceled"})

SECRET_PREFIX = "whsec_"  # Standard Webhooks' form: the prefix, then the key in base64
MIN_RAW_SECRET_CHARS = 16  # any other secret is used as raw bytes; shorter ones are too easy to guess
MAX_URL_CHARS = 2048
DELIVERY_THREADS = 4  # jobs whose receivers are slow or down do not hold up the others' deliveries
USER_AGENT = f"GenServe-Webhooks/{__version__}"
URL_FIELD = "webhook_url"
EVENTS_FIELD = "webhook_events"
# The request fields' descriptions (every job-submitting route has both)
URL_HELP = (
    "http(s) URL that receives the job's events as signed POSTs (Standard Webhooks); the server needs "
    "webhooks.secret. Passes the same address checks as image URLs."
)
EVENTS_HELP = (
    "Events to send: started, progress, completed, failed, canceled (default: all but progress); "
    "in form-data a JSON list, names separated by commas, or the field repeated."
)


# --- the request's side: what to deliver, where ----------------------------------------------------------------


@dataclass(frozen=True)
class WebhookSpec:
    """A request's webhook, checked: where to POST and which of the job's events."""

    url: str
    events: tuple[WebhookEvent, ...]

    def initial_view(self) -> dict[str, Any]:
        """The record's ``webhook`` column before anything was sent."""
        return {"url": self.url, "events": list(self.events), "deliveries": []}


def parse_events_field(value: Any) -> Any:
    """Pydantic 'before' validator of webhook_events: a list (JSON), or text in form-data (a JSON list or names
    separated by commas). Unknown names get a message listing the known ones."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError('webhook_events must be a list like ["started", "completed"]') from None
        else:
            value = [name for name in text.split(",") if name.strip()]
    if not isinstance(value, list):
        return value  # pydantic says what type it wanted
    names = [name.strip().lower() if isinstance(name, str) else name for name in value]
    if not names:
        raise ValueError("webhook_events must name at least one event, or be left out for the default")
    for name in names:
        if name not in EVENTS:
            raise ValueError(f"unknown webhook event {name!r}; use any of {', '.join(EVENTS)}")
    return list(dict.fromkeys(names))  # each once, in the order given


def url_policy(config: Config) -> FetchPolicy:
    """The SSRF guard of image URLs (genserve.fetch), with the webhook's own time limit."""
    return FetchPolicy(allow_private=config.inputs.allow_private_urls, timeout_s=config.webhooks.timeout_s)


def webhook_spec(url: str | None, events: list[WebhookEvent] | None, config: Config) -> WebhookSpec | None:
    """Check a request's webhook at submission (blocking: resolves the host); None when it asked for none.

    Raises BadRequest naming the field: not an http(s) URL, a host the SSRF guard refuses, or no webhooks.secret."""
    if url is None:
        if events is not None:
            raise BadRequest("webhook_events needs a webhook_url to send them to", param=EVENTS_FIELD)
        return None
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise BadRequest(f"webhook_url is longer than {MAX_URL_CHARS} characters", param=URL_FIELD)
    if not url.lower().startswith(("http://", "https://")):
        shown = url if len(url) <= 100 else url[:100] + "…"
        raise BadRequest(f"webhook_url must be an http:// or https:// URL, got {shown!r}", param=URL_FIELD)
    try:
        vetted_connection(url, URL_FIELD, url_policy(config)).connection.close()  # nothing opened: the checks only
    except TimeoutError:
        raise BadRequest(
            f"webhook_url: resolving its host took longer than webhooks.timeout_s ({config.webhooks.timeout_s:g} s)",
            param=URL_FIELD,
        ) from None
    except BadRequest as exc:
        exc.param = URL_FIELD
        raise
    if not config.webhooks.secret:
        raise BadRequest(
            "webhooks are off on this server: webhooks.secret (or GENSERVE_WEBHOOK_SECRET) is not set, and GenServe "
            "does not send unsigned webhooks",
            param=URL_FIELD,
        )
    return WebhookSpec(url=url, events=tuple(events) if events else DEFAULT_EVENTS)


# --- signing ------------------------------------------------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """The HMAC key of webhooks.secret: 'whsec_' + base64 decodes to its bytes (as every Standard Webhooks library
    reads it); any other string of 16+ characters is used as its UTF-8 bytes. ConfigError otherwise."""
    if secret.startswith(SECRET_PREFIX):
        encoded = secret.removeprefix(SECRET_PREFIX).rstrip("=")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ConfigError("webhooks.secret starts with 'whsec_' but the rest is not base64") from None
        if len(key) < MIN_RAW_SECRET_CHARS:
            raise ConfigError(f"webhooks.secret: a 'whsec_' key must hold at least {MIN_RAW_SECRET_CHARS} bytes")
        return key
    if len(secret) < MIN_RAW_SECRET_CHARS:
        raise ConfigError(
            f"webhooks.secret must be 'whsec_' + base64, or any string of at least {MIN_RAW_SECRET_CHARS} characters"
        )
    return secret.encode("utf-8")


class Signer:
    """Standard Webhooks headers for one attempt: the event's id, this attempt's time, and the signature of both
    and the body (``standardwebhooks.Webhook.sign``)."""

    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(signing_key(secret))  # bytes: used as the key as they are

    def headers(self, message_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        timestamp = int(time.time() if now is None else now)
        signed_at = datetime.fromtimestamp(timestamp, tz=UTC)
        signature = self._webhook.sign(message_id, signed_at, body.decode("utf-8"))
        return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def payload(event: JobEvent) -> bytes:
    """The body of an event's deliveries: the same bytes on every retry (only the headers change)."""
    data = dict(event.data)
    data.setdefault("status", "running" if event.kind == "progress" else event.kind)
    when = datetime.fromtimestamp(event.at, tz=UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": f"job.{event.kind}", "timestamp": when, "data": data}, separators=(",", ":")).encode()


def backoff_s(failed_attempts: int, config: Config) -> float:
    """The wait after the n-th failed attempt: backoff_s, doubling, at most backoff_max_s."""
    settings = config.webhooks
    return float(min(settings.backoff_max_s, settings.backoff_s * 2 ** (failed_attempts - 1)))


# --- deliveries ---------------------------------------------------------------------------------------------------


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(eq=False)
class Delivery:
    """One event of one job on its way to the receiver; written only under the dispatcher's lock."""

    event: str  # started | progress | completed | failed | canceled
    id: str  # webhook-id: one per event, the same on every attempt
    body: bytes
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def view(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "id": self.id,
            "status": self.status.value,
            "attempts": self.attempts,
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code, or the error that stopped it."""

    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(eq=False)
class _Lane:
    """One job's webhook: its spec, the deliveries still to settle (only the head is tried) and those shown."""

    job_id: str
    spec: WebhookSpec
    waiting: deque[Delivery] = field(default_factory=deque)
    shown: list[Delivery] = field(default_factory=list)  # every event's delivery, but only the last progress one
    scheduled: bool = False  # in the schedule, or a thread is trying its head
    ended: bool = False  # the job's terminal event has been seen: nothing more will come
    last_progress_at: float = float("-inf")

    def view(self) -> dict[str, Any]:
        return {**self.spec.initial_view(), "deliveries": [delivery.view() for delivery in self.shown]}


class WebhookDispatcher:
    """Delivers the webhooks of watched jobs on its own threads; see the module docstring."""

    def __init__(self, config: Config, writer: PersistenceWriter) -> None:
        self.config = config
        self.settings = config.webhooks
        self.writer = writer
        self.signer = Signer(config.webhooks.secret) if config.webhooks.secret else None  # ConfigError if unusable
        self._policy = url_policy(config)
        self._cond = threading.Condition()
        self._lanes: dict[str, _Lane] = {}
        self._schedule: list[tuple[float, int, str]] = []  # heap of (monotonic time due, tie-break, job id)
        self._order = 0
        self._closing = False
        self._close_by = float("inf")  # monotonic end of the last effort at shutdown
        self._threads = [
            threading.Thread(target=self._deliver_loop, name=f"genserve-webhook-{index}", daemon=True)
            for index in range(DELIVERY_THREADS)
        ]
        self._started = False

    def start(self) -> None:
        if self.signer is None:
            return  # no secret: every request with a webhook is refused, so no thread is needed
        for thread in self._threads:
            thread.start()
        self._started = True

    def stop(self) -> None:
        """At shutdown, after the workers stopped: one last try of every pending terminal event (completed, failed,
        canceled) within webhooks.timeout_s in all; other pending events are given up. Blocking."""
        if not self._started:
            return
        with self._cond:
            self._closing = True
            self._close_by = time.monotonic() + self.settings.timeout_s
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, self._close_by - time.monotonic()) + 1.0)
        with self._cond:
            left = [delivery for lane in self._lanes.values() for delivery in lane.waiting]
            for lane in list(self._lanes.values()):
                for delivery in lane.waiting:
                    self._give_up(delivery, "not delivered before the service stopped")
                lane.waiting.clear()
                self._publish(lane)
            self._lanes.clear()
        if left:
            log.warning("%d webhook delivery(ies) not delivered before the service stopped", len(left))

    # --- the job's side (any thread) -----------------------------------------------------------------------------

    def watch(self, job: Job, spec: WebhookSpec) -> None:
        """Deliver ``job``'s events (those ``spec`` asks for) from now on. Call before the job is queued."""
        with self._cond:
            self._lanes[job.id] = _Lane(job_id=job.id, spec=spec)
        job.add_listener(self._on_event)

    def unwatch(self, job_id: str) -> None:
        """The job was never queued (its submission failed): forget it."""
        with self._cond:
            self._lanes.pop(job_id, None)

    def view(self, job_id: str) -> dict[str, Any] | None:
        """The job's webhook as the record shows it, while this dispatcher still tracks it."""
        with self._cond:
            lane = self._lanes.get(job_id)
            return lane.view() if lane is not None else None

    def _on_event(self, job: Job, event: JobEvent) -> None:
        """Listener: in the emitting thread, under the job's lock. Enqueue only."""
        with self._cond:
            lane = self._lanes.get(job.id)
            if lane is None or lane.ended:
                return
            lane.ended = event.is_terminal
            if event.kind in lane.spec.events and not self._progress_too_soon(lane, event):
                self._add(lane, Delivery(event=event.kind, id=f"msg_{uuid.uuid4().hex}", body=payload(event)))
            elif lane.ended and not lane.scheduled:
                self._finish(lane)

    def _progress_too_soon(self, lane: _Lane, event: JobEvent) -> bool:
        if event.kind != "progress":
            return False
        now = time.monotonic()
        if now - lane.last_progress_at < self.settings.progress_interval_s:
            return True
        lane.last_progress_at = now
        return False

    # --- the schedule (under self._cond) -------------------------------------------------------------------------

    def _add(self, lane: _Lane, delivery: Delivery) -> None:
        if delivery.event == "progress":  # show the latest progress delivery only, once the earlier one settled
            lane.shown = [d for d in lane.shown if d.event != "progress" or d.status is DeliveryStatus.PENDING]
        lane.shown.append(delivery)
        lane.waiting.append(delivery)
        if not lane.scheduled:
            self._schedule_lane(lane, time.monotonic())
        self._publish(lane)

    def _schedule_lane(self, lane: _Lane, due: float) -> None:
        lane.scheduled = True
        self._order += 1
        heapq.heappush(self._schedule, (due, self._order, lane.job_id))
        self._cond.notify()

    def _publish(self, lane: _Lane, last: bool = False) -> None:
        """Hand the lane's current view to the persistence writer; the last one also forgets the lane, once
        written, so a reader always finds the newest view in one place or the other."""
        after_commit = (lambda: self._forget(lane)) if last else None
        self.writer.write(lane.job_id, {"webhook": lane.view()}, after_commit=after_commit)

    def _forget(self, lane: _Lane) -> None:
        with self._cond:
            if self._lanes.get(lane.job_id) is lane and not lane.waiting:
                del self._lanes[lane.job_id]

    def _finish(self, lane: _Lane) -> None:
        """The job ended and nothing waits: the last write of its webhook column."""
        self._publish(lane, last=True)

    def _next_lane(self) -> tuple[_Lane, Delivery] | None:
        """Block until a lane's head is due; None when the thread should end (shutdown)."""
        while True:
            now = time.monotonic()
            if self._closing and (now >= self._close_by or not self._schedule):
                return None
            if self._schedule and (self._closing or self._schedule[0][0] <= now):
                _, _, job_id = heapq.heappop(self._schedule)
                lane = self._lanes.get(job_id)
                if lane is None or not lane.waiting:
                    continue
                head = lane.waiting[0]
                if self._closing and not head.terminal:  # the last effort is for the events that end a job
                    self._settle_given_up(lane, head, "not delivered before the service stopped")
                    continue
                return lane, head
            wait = (self._schedule[0][0] - now) if self._schedule else None
            if self._closing:
                wait = max(0.0, self._close_by - now)
            self._cond.wait(wait)

    def _settle(self, lane: _Lane, delivery: Delivery, outcome: Outcome) -> None:
        """After an attempt: delivered, retried later, or given up; then the lane's next head, if any."""
        if not lane.waiting or lane.waiting[0] is not delivery:
            return  # stop() gave it up while this attempt ran past the last effort's end
        delivery.attempts += 1
        delivery.last_status_code = outcome.status_code
        delivery.last_error = outcome.error
        if outcome.delivered:
            delivery.status = DeliveryStatus.DELIVERED
            self._advance(lane)
            return
        superseded = delivery.event == "progress" and len(lane.waiting) > 1
        if superseded or self._closing or delivery.attempts >= self.settings.max_attempts:
            why = "a later event superseded it" if superseded else None
            self._settle_given_up(lane, delivery, why)
            return
        wait = backoff_s(delivery.attempts, self.config)
        log.info(
            "webhook %s (job %s, %s) attempt %d failed (%s); retrying in %.2f s",
            delivery.id,
            lane.job_id,
            delivery.event,
            delivery.attempts,
            outcome.error or outcome.status_code,
            wait,
        )
        self._publish(lane)
        self._schedule_lane(lane, time.monotonic() + wait)

    def _settle_given_up(self, lane: _Lane, delivery: Delivery, why: str | None) -> None:
        self._give_up(delivery, why)
        log.warning(
            "webhook %s (job %s, %s) not delivered after %d attempt(s): %s",
            delivery.id,
            lane.job_id,
            delivery.event,
            delivery.attempts,
            delivery.last_error or delivery.last_status_code,
        )
        self._advance(lane)

    @staticmethod
    def _give_up(delivery: Delivery, why: str | None) -> None:
        delivery.status = DeliveryStatus.FAILED
        if why:
            delivery.last_error = f"{delivery.last_error}; {why}" if delivery.last_error else why

    def _advance(self, lane: _Lane) -> None:
        """The head settled: on to the next delivery of the lane, or the lane rests (and ends with its job)."""
        lane.waiting.popleft()
        lane.scheduled = False
        if lane.waiting:
            self._schedule_lane(lane, time.monotonic())
            self._publish(lane)
        elif lane.ended:
            self._finish(lane)
        else:
            self._publish(lane)

    # --- the delivery threads ------------------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        while True:
            with self._cond:
                picked = self._next_lane()
            if picked is None:
                return
            lane, delivery = picked
            outcome = self._attempt(lane.spec, delivery)  # no lock held: a slow receiver holds up only this lane
            with self._cond:
                self._settle(lane, delivery, outcome)

    def _attempt(self, spec: WebhookSpec, delivery: Delivery) -> Outcome:
        """One POST, bounded by webhooks.timeout_s; the host is resolved and vetted again for it."""
        assert self.signer is not None
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Connection": "close",
            **self.signer.headers(delivery.id, delivery.body),
        }
        try:
            vetted = vetted_connection(spec.url, URL_FIELD, self._policy)
            connection = vetted.connection
            headers["Host"] = vetted.host_header  # the URL's host, though the connection goes to a vetted address
            try:
                connection.request("POST", vetted.path, body=delivery.body, headers=headers)
                with connection.getresponse() as response:
                    status = response.status
                    reason = (response.reason or "")[:100]
            finally:
                connection.close()
        except BadRequest as exc:  # the host now resolves to an address the guard refuses
            return Outcome(None, exc.message)
        except TimeoutError:
            return Outcome(None, f"no answer within webhooks.timeout_s ({self.settings.timeout_s:g} s)")
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(None, str(exc) or type(exc).__name__)
        error = None if 200 <= status < 300 else f"HTTP {status} {reason}".rstrip()
        return Outcome(status, error)
