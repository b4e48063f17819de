"""The worker process: loads every enabled pipeline once, then runs one job at a time until told to stop.

Started by the supervisor with the ``spawn`` method, one per device. Threads inside it:
- main thread: loads pipelines, then runs jobs from the inbox (one at a time);
- ``reader``: receives JobRequest / CancelJob / Shutdown from the pipe. EOF on the pipe means the API process
  died, and the worker exits at once so no orphan holds GPU memory;
- ``heartbeat``: sends Heartbeat every interval, busy or idle, and exits the process if the parent changed.

All sends share one lock: the main thread (results, progress) and the heartbeat thread write to the same pipe.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from genserve.messages import (
    EXIT_AFTER_OOM,
    CancelJob,
    Heartbeat,
    JobFailure,
    JobProgress,
    JobRequest,
    JobResult,
    JobStarted,
    Shutdown,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)

if TYPE_CHECKING:
    from workers.pipelines import PipelineSet

log = logging.getLogger(__name__)


class JobCanceledError(Exception):
    """Raised from the step callback to leave the denoising loop at once."""


class _Outbox:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except (BrokenPipeError, EOFError, OSError):
                _exit_because_parent_died()


class _CancelBoard:
    """Which job is running and whether someone asked to stop it (written by the reader, read by the callback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: str | None = None
        self._canceled: set[str] = set()  # ids canceled before or while they ran

    def begin(self, job_id: str) -> None:
        with self._lock:
            self._current = job_id

    def end(self) -> None:
        with self._lock:
            if self._current is not None:
                self._canceled.discard(self._current)
            self._current = None

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._canceled.add(job_id)
            # Keep the set small: a cancel for a job this worker never runs must not pile up forever.
            if len(self._canceled) > 1024:
                self._canceled = {job_id}

    def cancel_current(self) -> None:
        with self._lock:
            if self._current is not None:
                self._canceled.add(self._current)

    def is_canceled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._canceled


def _exit_because_parent_died() -> None:
    log.warning("API process is gone; worker exits")
    os._exit(0)  # skip interpreter teardown: CUDA and thread joins could hang


def _configure_logging(spec: WorkerSpec) -> None:
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s genserve-worker-{spec.slot} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("diffusers", "transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING if spec.log_level != "debug" else logging.INFO)


def _read_pipe(conn: Connection, inbox: queue.Queue[JobRequest | Shutdown], board: _CancelBoard) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            _exit_because_parent_died()
            return
        if isinstance(message, JobRequest):
            inbox.put(message)
        elif isinstance(message, CancelJob):
            board.cancel(message.job_id)
        elif isinstance(message, Shutdown):
            log.info("shutdown requested: %s", message.reason)
            board.cancel_current()
            inbox.put(message)
        else:
            log.warning("ignoring unknown message %r", type(message).__name__)


def _beat(outbox: _Outbox, spec: WorkerSpec, parent_pid: int) -> None:
    while True:
        time.sleep(spec.heartbeat_interval_s)
        if os.getppid() != parent_pid:  # re-parented: the API process died (belt to the pipe's braces)
            _exit_because_parent_died()
        outbox.send(Heartbeat(slot=spec.slot, sent_at=time.time()))


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process (the spawn target)."""
    started = time.monotonic()
    # Never reach for a model hub: weights are local folders or the embedded model built on this machine.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _configure_logging(spec)
    threading.current_thread().name = f"genserve-worker-{spec.slot}"
    outbox = _Outbox(conn)
    inbox: queue.Queue[JobRequest | Shutdown] = queue.Queue()
    board = _CancelBoard()
    threading.Thread(target=_read_pipe, args=(conn, inbox, board), name="reader", daemon=True).start()
    threading.Thread(target=_beat, args=(outbox, spec, os.getppid()), name="heartbeat", daemon=True).start()

    try:
        from workers.pipelines import PipelineSet

        pipelines = PipelineSet.load(spec)
    except BaseException as exc:  # report why, then die: the supervisor decides about respawning
        log.exception("loading pipelines failed")
        outbox.send(WorkerStartupFailed(slot=spec.slot, error_type=type(exc).__name__, message=str(exc)))
        sys.exit(1)

    outbox.send(
        WorkerReady(
            slot=spec.slot,
            pid=os.getpid(),
            device=pipelines.device,
            modes=pipelines.modes,
            embedded_model=pipelines.embedded,
            load_time_s=time.monotonic() - started,
        )
    )
    ooms_in_a_row = 0
    while True:
        message = inbox.get()
        if isinstance(message, Shutdown):
            break
        outcome = _run_job(message, pipelines, outbox, board)
        if outcome != "out_of_memory":
            ooms_in_a_row = 0
            continue
        ooms_in_a_row += 1
        pipelines.free_memory()
        if ooms_in_a_row >= spec.max_consecutive_oom:
            # Fragmented or leaked memory does not come back by itself: a fresh process does. The supervisor
            # respawns this slot as after any death (no job is lost: this one has already been answered).
            log.error("%d out-of-memory failures in a row; exiting so the worker restarts clean", ooms_in_a_row)
            sys.exit(EXIT_AFTER_OOM)
    log.info("worker %d exits", spec.slot)


def _run_job(job: JobRequest, pipelines: PipelineSet, outbox: _Outbox, board: _CancelBoard) -> str:
    """Run one job and report it; returns "completed", "canceled" or the failure's error type."""
    started_at = time.time()
    board.begin(job.job_id)
    outbox.send(JobStarted(job_id=job.job_id, started_at=started_at))
    try:
        if board.is_canceled(job.job_id):
            raise JobCanceledError("canceled before it started")

        def on_step(step: int, total: int) -> None:
            outbox.send(
                JobProgress(job_id=job.job_id, step=step, total_steps=total, elapsed_s=time.time() - started_at)
            )
            if board.is_canceled(job.job_id):
                raise JobCanceledError(f"canceled after step {step} of {total}")

        output = pipelines.run(job, on_step)
        outbox.send(
            JobResult(
                job_id=job.job_id,
                image_path=job.output_path,
                image_bytes=output.image_bytes,
                width=output.width,
                height=output.height,
                seed=job.seed,
                started_at=started_at,
                pipeline_s=output.pipeline_s,
                encode_s=output.encode_s,
            )
        )
        return "completed"
    except JobCanceledError as exc:
        log.info("job %s %s", job.job_id, exc)
        outbox.send(JobFailure(job_id=job.job_id, error_type="canceled", message=str(exc)))
        return "canceled"
    except Exception as exc:
        error_type = pipelines.classify_error(exc)
        log.exception("job %s failed (%s)", job.job_id, error_type)
        outbox.send(JobFailure(job_id=job.job_id, error_type=error_type, message=str(exc) or type(exc).__name__))
        return error_type
    finally:
        board.end()
