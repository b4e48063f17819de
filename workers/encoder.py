"""The worker's encoder: PNG encoding and the file write, off the critical path of the next job.

Lives in the worker process. With ``performance.overlap_encoding`` (the default) the main loop hands each job's
decoded image to the thread ``encoder`` as soon as the pipeline call returns, tells the supervisor (JobDenoised) and
starts the next job at once; this thread encodes the PNG (genserve.images.encode_png), writes it atomically to the
job's output_path and sends the job's JobResult, or a JobFailure when encoding or writing fails. So on a GPU the
encode and the write of one image overlap the denoising of the next.

- One thread, one FIFO: results leave in the order the jobs were denoised.
- A short line: at most MAX_WAITING images wait behind the one being encoded. The main loop calls wait_for_room()
  before it hands an image over, so when encoding falls behind the main loop waits instead of piling decoded images
  up in host memory.
- drain() waits until every image handed over is written and reported: the worker calls it before any exit it
  chooses (Shutdown, repeated out-of-memory failures, a fatal device error: the images are already on the host and
  encoding touches no device). A process that dies (SIGKILL, a crash) loses what was waiting; the supervisor
  re-queues those jobs as it does a running job.

Without overlap the main loop calls finish() itself, inline: the same code either way. The thread writes to the
pipe through the worker's outbox, whose lock it shares with the main loop and the heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from genserve import logs
from genserve.images import encode_png
from genserve.messages import FailureKind, JobFailure, JobRequest, JobResult
from workers.main import MAX_TEXT
from workers.pipelines import write_atomically

log = logging.getLogger(__name__)

MAX_WAITING = 1  # decoded images that may wait behind the one being encoded (a 1024² RGB image is 3 MiB)

Report = Callable[[JobResult | JobFailure], None]


@dataclass(frozen=True)
class Denoised:
    """A job whose pipeline call returned: everything its JobResult needs but the PNG."""

    job: JobRequest  # the job (its output_path, seed)
    image: Image.Image  # the decoded output, in host memory
    started_at: float  # worker's time.time() when the job began
    pipeline_s: float  # seconds inside the pipeline call
    batch_size: int = 1  # images that call made together


def encode(done: Denoised) -> JobResult:
    """Encode the PNG, write it atomically to the job's output_path; the JobResult to send. Raises on failure."""
    began = time.perf_counter()
    png = encode_png(done.image, parameters=done.job.parameters)
    write_atomically(Path(done.job.output_path), png)
    return JobResult(
        job_id=done.job.job_id,
        image_path=done.job.output_path,
        image_bytes=len(png),
        width=done.image.width,
        height=done.image.height,
        seed=done.job.seed,
        started_at=done.started_at,
        pipeline_s=done.pipeline_s,
        encode_s=time.perf_counter() - began,
        batch_size=done.batch_size,
    )


def finish(done: Denoised, report: Report) -> FailureKind | None:
    """Encode, write and report one job: None when it completed, else the kind of the failure it reported."""
    try:
        result = encode(done)
    except Exception as exc:
        kind = FailureKind.OUT_OF_MEMORY if isinstance(exc, MemoryError) else FailureKind.ERROR
        log.exception("job %s: its image could not be encoded or written (%s)", done.job.job_id, kind.value)
        message = f"the image could not be encoded or written: {str(exc) or type(exc).__name__}"[:MAX_TEXT]
        report(JobFailure(job_id=done.job.job_id, kind=kind, error_type=type(exc).__name__, message=message))
        return kind
    log.info("image written (%d bytes; encoded in %.2f s)", result.image_bytes, result.encode_s)
    report(result)
    return None


class Encoder:
    """The encoder thread and its bounded FIFO. One producer (the worker's main thread), one consumer (the thread)."""

    def __init__(self, report: Report, max_waiting: int = MAX_WAITING) -> None:
        self._report = report
        self._max_waiting = max_waiting
        self._changed = threading.Condition()
        self._waiting: deque[Denoised] = deque()
        self._busy = False  # the thread holds an image it has not reported yet
        # A daemon: once drained it only waits for work, and the worker's exit must not wait for it.
        self._thread = threading.Thread(target=self._run, name="encoder", daemon=True)
        self._thread.start()

    def wait_for_room(self) -> None:
        """Block until one more image may wait. The main thread is the only producer, so the room it waited for is
        still there when it calls put(): it can tell the supervisor the job is denoised in between."""
        with self._changed:
            while len(self._waiting) >= self._max_waiting:
                self._changed.wait()

    def put(self, done: Denoised) -> None:
        """Hand an image over (after wait_for_room; the images of one batch all after one wait); returns at once."""
        with self._changed:
            self._waiting.append(done)
            self._changed.notify_all()

    def drain(self) -> None:
        """Block until every image handed over has been written and reported."""
        with self._changed:
            while self._waiting or self._busy:
                self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._waiting:
                    self._changed.wait()
                done = self._waiting.popleft()
                self._busy = True
                self._changed.notify_all()  # room for the next image
            try:
                with logs.job_context([(done.job.job_id, done.job.request_id)]):
                    finish(done, self._report)
            except Exception:  # finish() reports encode errors itself; never let the thread die with work queued
                log.exception("encoder: reporting job %s failed", done.job.job_id)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
