"""The live job: one generation request from submission to its end, as the API process sees it.

Lives in the API process only. A job has two halves:
- ``Schedule``: what the supervisor needs to run it (priority, deadline, attempts, why it was asked to stop). Only
  the supervisor writes it, under its own lock; views read it.
- the job's visible life (state, worker, progress, result or error) and its events. The supervisor moves it through
  queued → running → completed | failed | canceled with the ``mark_*`` / ``finish`` methods; each changes the job
  and publishes one ``JobEvent`` atomically under the job's own lock, so a subscriber that takes a snapshot and
  registers under that lock never misses an event and never sees one twice.
Listeners are called in the emitting thread while the job's lock is held, so they must only hand work on (the
persistence writer's queue); subscribers (SSE streams, waiting HTTP handlers) are woken on their event loop.
The lock order is written down once, in ``genserve.job_manager``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from genserve.errors import GenServeError
from genserve.messages import CancelReason, JobRequest, JobResult


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELED})


def result_json(
    job_id: str, seed: int | None, width: int | None, height: int | None, image_bytes: int | None = None
) -> dict[str, Any]:
    """The ``result`` object of a finished job: the one place it is built (events, job views, history)."""
    image: dict[str, Any] = {"id": job_id, "url": f"/image/{job_id}"}
    if image_bytes is not None:
        image["bytes"] = image_bytes
    return {"images": [image], "seed": seed, "width": width, "height": height}


@dataclass(frozen=True)
class JobEvent:
    """One step of a job's life, as SSE streams it: ``event: <kind>`` with ``data`` as JSON."""

    job_id: str
    seq: int  # 1, 2, 3 … per job: the SSE event id
    kind: str  # queued | started | progress | completed | failed | canceled
    data: dict[str, Any]
    at: float  # wall clock when it happened

    @property
    def is_terminal(self) -> bool:
        return self.kind in ("completed", "failed", "canceled")


JobListener = Callable[["Job", JobEvent], None]


@dataclass(eq=False)
class Subscription:
    """Events of one job delivered onto one event loop, from whichever thread emits them."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)

    def deliver(self, event: JobEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed at shutdown: nobody listens any more
            pass


@dataclass(eq=False)
class Schedule:
    """The supervisor's half of a job: written only by the supervisor, under its lock."""

    priority: int  # lower runs first
    timeout_s: float = float("inf")  # the job's time budget from submission
    deadline: float = float("inf")  # time.monotonic() by which it must have ended
    attempts: int = 0  # how many times a worker was handed this job
    cancel_reason: CancelReason | None = None  # set when someone asked to stop it
    cancel_sent: bool = False  # CancelJob went to its worker
    group: str | None = None  # the images of one request share it: queued ones may run as one batch

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass(eq=False)
class Job:
    request: JobRequest  # what the worker runs
    schedule: Schedule
    model_id: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # the effective request, without image bytes
    submitted_at: float = field(default_factory=time.time)
    owner: str | None = None  # API key name that submitted it (None when keys are off)
    request_id: str | None = None  # X-Request-ID of the request that submitted it (logs, the record)
    state: JobState = JobState.QUEUED
    worker_slot: int | None = None  # the worker that runs (or ran) it
    device: str | None = None
    node: str | None = None  # the cluster node of that worker (cluster.backend redis); None on one machine
    started_at: float | None = None  # worker clock, when the worker began it
    finished_at: float | None = None
    queue_position: int | None = None  # last published place in line (0 = next)
    step: int = 0  # denoising steps done
    total_steps: int = 0  # steps the pipeline runs
    step_elapsed_s: float = 0.0  # worker seconds from job start to the last finished step
    result: JobResult | None = None
    error: GenServeError | None = None
    seq: int = 0  # events published so far
    _listeners: list[JobListener] = field(default_factory=list, repr=False)
    _subscribers: list[Subscription] = field(default_factory=list, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def create(
        cls, request: JobRequest, priority: int, timeout_s: float, group: str | None = None, **fields: Any
    ) -> Job:
        deadline = time.monotonic() + timeout_s
        schedule = Schedule(priority=priority, timeout_s=timeout_s, deadline=deadline, group=group)
        return cls(request=request, schedule=schedule, **fields)

    @property
    def id(self) -> str:
        return self.request.job_id

    @property
    def priority(self) -> int:
        return self.schedule.priority

    @property
    def cancel_reason(self) -> CancelReason | None:
        return self.schedule.cancel_reason

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block the calling thread until the job ends (tests and blocking callers; routes use wait_for_job)."""
        return self._done.wait(timeout)

    # --- observers -----------------------------------------------------------------------------------------------

    def add_listener(self, listener: JobListener) -> None:
        """Called with every event, in the thread that emits it, under the job's lock: hand work on, do none."""
        with self._lock:
            self._listeners.append(listener)

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> tuple[list[JobEvent], Subscription]:
        """The current state as events, plus a subscription that receives every later event on ``loop``."""
        subscription = Subscription(loop=loop)
        with self._lock:
            snapshot = self.snapshot_events()
            if not self.done:
                self._subscribers.append(subscription)
        return snapshot, subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    @property
    def watched(self) -> bool:
        """Someone streams this job's events (so its queue position is worth publishing)."""
        return bool(self._subscribers)

    def snapshot_events(self) -> list[JobEvent]:
        """What a late subscriber needs to know first: the state the job is in now."""
        with self._lock:
            now = time.time()
            if self.done:
                return [self._event(self.state.value, self._terminal_data(), now)]
            if self.state is JobState.QUEUED:
                return [self._event("queued", self._queued_data(), now)]
            events = [self._event("started", self._started_data(), now)]
            if self.step:
                events.append(self._event("progress", self.progress_data(), now))
            return events

    # --- lifecycle (called by the supervisor) --------------------------------------------------------------------

    def mark_queued(self, position: int | None, *, requeued_because: str | None = None) -> None:
        with self._lock:
            if self.done:
                return
            if requeued_because is None and self.state is JobState.QUEUED and position == self.queue_position:
                return  # nothing changed for anyone watching
            self.state = JobState.QUEUED
            self.queue_position = position
            if requeued_because is not None:
                self.worker_slot = self.device = self.node = None
                self.started_at = None
                self.step = self.total_steps = 0
            data = self._queued_data()
            if requeued_because is not None:
                data["requeued_because"] = requeued_because
            self._emit("queued", data)

    def mark_dispatched(self, slot: int, device: str, node: str | None = None) -> None:
        with self._lock:
            self.state = JobState.RUNNING
            self.worker_slot, self.device = slot, device
            self.node = node or self.node
            self.queue_position = None

    def mark_started(self, started_at: float) -> None:
        with self._lock:
            if self.done:
                return
            self.started_at = started_at
            self._emit("started", self._started_data())

    def mark_progress(self, step: int, total_steps: int, elapsed_s: float) -> None:
        with self._lock:
            if self.done:
                return
            self.step, self.total_steps, self.step_elapsed_s = step, total_steps, elapsed_s
            self._emit("progress", self.progress_data())

    def finish(
        self,
        state: JobState,
        *,
        result: JobResult | None = None,
        error: GenServeError | None = None,
        finished_at: float | None = None,
    ) -> bool:
        """End the job. Idempotent: the first end wins (a late worker message for a timed-out job is dropped).
        ``finished_at``: when it ended, if not now (a cluster's mirror learns it from the node that ended it).

        Returns whether this call ended it."""
        with self._lock:
            if self.done:
                return False
            self.state = state
            self.result = result
            self.error = error
            self.finished_at = time.time() if finished_at is None else finished_at
            if state is JobState.COMPLETED:
                self.step = self.total_steps or self.request.num_inference_steps
            self._emit(state.value, self._terminal_data())
            self._done.set()
            self._subscribers.clear()
            return True

    # --- views ---------------------------------------------------------------------------------------------------

    def progress_data(self) -> dict[str, Any]:
        total = self.total_steps or self.request.num_inference_steps
        percent = round(100.0 * self.step / total, 1) if total else 0.0
        eta = None
        if self.step and total:
            eta = round(self.step_elapsed_s / self.step * (total - self.step), 3)  # at the running rate
        return {"task_id": self.id, "step": self.step, "total_steps": total, "percent": percent, "eta_s": eta}

    def _queued_data(self) -> dict[str, Any]:
        return {"task_id": self.id, "status": "queued", "queue_position": self.queue_position}

    def _started_data(self) -> dict[str, Any]:
        data = {
            "task_id": self.id,
            "status": "running",
            "worker": self.worker_slot,
            "device": self.device,
            "started_at": self.started_at,
        }
        if self.node is not None:
            data["node"] = self.node
        return data

    def _terminal_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"task_id": self.id, "status": self.state.value, "finished_at": self.finished_at}
        if self.result is not None:
            result = self.result
            data["result"] = result_json(self.id, result.seed, result.width, result.height, result.image_bytes)
            # What the worker measured: a cluster's API node learns the job's end from this event alone.
            data["timings"] = {
                "started_at": result.started_at,
                "pipeline_s": round(result.pipeline_s, 6),
                "encode_s": round(result.encode_s, 6),
                "batch_size": result.batch_size,
            }
            data["result_url"] = f"/image/{self.id}"
        if self.error is not None:
            data["error"] = {"type": self.error.error_type, "message": self.error.message}
        if self.state is JobState.CANCELED:
            data["cancel_reason"] = self.cancel_reason.value if self.cancel_reason else None
        return data

    def _event(self, kind: str, data: dict[str, Any], at: float) -> JobEvent:
        return JobEvent(job_id=self.id, seq=self.seq, kind=kind, data=data, at=at)

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self.seq += 1
        event = JobEvent(job_id=self.id, seq=self.seq, kind=kind, data=data, at=time.time())
        for listener in self._listeners:
            listener(self, event)
        for subscription in self._subscribers:
            subscription.deliver(event)


async def wait_for_job(job: Job) -> Job:
    """Wait on the event loop, without a thread, until ``job`` ends."""
    if job.done:
        return job
    snapshot, subscription = job.subscribe(asyncio.get_running_loop())
    try:
        if any(event.is_terminal for event in snapshot):
            return job
        while not (await subscription.events.get()).is_terminal:
            pass
        return job
    finally:
        job.unsubscribe(subscription)
