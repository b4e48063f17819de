"""The job record: one generation request from submission to its end, as the API process sees it.

Lives in the API process only. The supervisor's monitor thread moves a job through its states; HTTP handlers on the
event loop wait for the end through ``wait_for_job``. All mutation happens under the supervisor's lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from genserve.errors import GenServeError
from genserve.messages import JobRequest, JobResult


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELED)


DoneCallback = Callable[["Job"], None]


@dataclass(eq=False)
class Job:
    request: JobRequest  # what the worker runs
    priority: int  # lower runs first
    submitted_at: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    attempts: int = 0  # how many times a worker was handed this job
    worker_slot: int | None = None  # the worker that runs (or ran) it
    device: str | None = None
    started_at: float | None = None  # worker clock, when the worker began it
    finished_at: float | None = None
    step: int = 0  # denoising steps done
    total_steps: int = 0  # steps the pipeline runs
    cancel_reason: str | None = None  # set when someone asked to stop it
    cancel_sent: bool = False  # CancelJob went to its worker
    result: JobResult | None = None
    error: GenServeError | None = None
    _callbacks: list[DoneCallback] = field(default_factory=list, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    # Guards _callbacks: waiters register from the event loop while the monitor thread may be ending the job.
    _callback_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def id(self) -> str:
        return self.request.job_id

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, callback: DoneCallback) -> None:
        """Call ``callback(job)`` once the job ends (at once, in this thread, if it already has)."""
        with self._callback_lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def finish(self, state: JobState, *, result: JobResult | None = None, error: GenServeError | None = None) -> None:
        """End the job. Idempotent: the first end wins (a late worker message for a timed-out job is dropped)."""
        with self._callback_lock:
            if self._done.is_set():
                return
            self.state = state
            self.result = result
            self.error = error
            self.finished_at = time.time()
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


async def wait_for_job(job: Job) -> Job:
    """Wait on the event loop, without a thread, until ``job`` ends."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def wake(_: Job) -> None:
        try:
            loop.call_soon_threadsafe(_set_if_pending, ended)
        except RuntimeError:  # the loop closed during shutdown: nobody is waiting any more
            pass

    job.add_done_callback(wake)
    await ended
    return job


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
