"""The worker process: loads every enabled pipeline once, then runs one job at a time until told to stop.

Started by the supervisor, one per device, forked from a forkserver that has the heavy modules imported already
(or spawned fresh with ``workers.start_method: spawn``). Its lifetime belongs to the supervisor: it ignores SIGINT
and SIGTERM (a Ctrl-C or a container-wide SIGTERM reaches every process of the group, and the API process must
drain first) and leaves on Shutdown, when the API process dies, or by SIGKILL. Threads inside it:
- main thread: loads pipelines, then runs jobs from the inbox one pipeline call at a time: a JobRequest, or a JobBatch
  (images of one request denoised together; each job is still reported, and can be canceled, on its own);
- ``encoder`` (performance.overlap_encoding): encodes and writes each job's PNG and sends its JobResult while the
  main thread runs the next job (workers.encoder). The main thread sends JobDenoised when it hands an image over;
  from then on the job can no longer be canceled. Before any exit it chooses, the worker drains the encoder;
- ``reader``: receives JobRequest / CancelJob / Shutdown from the pipe. EOF on the pipe means the API process
  died, and the worker exits at once so no orphan holds GPU memory;
- ``heartbeat``: sends Heartbeat every interval, busy or idle, and exits the process if the parent changed.

All sends share one lock: the main thread (progress, results), the encoder and the heartbeat thread write to the
same pipe.
Every message is small (texts are capped), so each is one write the supervisor can read whole.

A fatal device error (the CUDA context is poisoned) fails the job, then the process exits with EXIT_DEVICE_FATAL
so the slot restarts with a fresh context.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, assert_never

from genserve import logs
from genserve.messages import (
    EXIT_AFTER_OOM,
    EXIT_DEVICE_FATAL,
    CancelJob,
    FailureKind,
    Heartbeat,
    JobBatch,
    JobDenoised,
    JobFailure,
    JobProgress,
    JobRequest,
    JobStarted,
    Shutdown,
    WorkerInbound,
    WorkerPlanned,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)

if TYPE_CHECKING:
    from workers.encoder import Encoder
    from workers.pipelines import JobOutput, PipelineSet

log = logging.getLogger(__name__)

Work = JobRequest | JobBatch  # what the main loop runs: one job, or several as one pipeline call

MAX_TEXT = 4000  # characters of an error message sent to the supervisor: keeps every message one small write


class JobCanceledError(Exception):
    """Raised from the step callback to leave the denoising loop at once."""


class _Outbox:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._shutting_down = False  # after Shutdown the supervisor stops reading: a broken pipe is expected

    def send(self, message: object) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except (BrokenPipeError, EOFError, OSError):
                if not self._shutting_down:
                    _exit_because_parent_died()

    def shutting_down(self) -> None:
        self._shutting_down = True


class _CancelBoard:
    """Which jobs are running (one, or the jobs of a batch) and which someone asked to stop (written by the reader,
    read by the step callback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: set[str] = set()
        self._canceled: set[str] = set()  # ids canceled before or while they ran

    def begin(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            self._current = set(job_ids)

    def end(self) -> None:
        with self._lock:
            self._canceled -= self._current
            self._current = set()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._canceled.add(job_id)
            # Keep the set small: a cancel for a job this worker never runs must not pile up forever.
            if len(self._canceled) > 1024:
                self._canceled = {job_id}

    def cancel_current(self) -> None:
        with self._lock:
            self._canceled |= self._current

    def is_canceled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._canceled


def _exit_because_parent_died() -> None:
    log.warning("API process is gone; worker exits")
    os._exit(0)  # skip interpreter teardown: CUDA and thread joins could hang


def _configure_logging(spec: WorkerSpec) -> None:
    logs.configure(spec.log_level, "json" if spec.log_format == "json" else "text", f"genserve-worker-{spec.slot}")
    for noisy in ("diffusers", "transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING if spec.log_level != "debug" else logging.INFO)


def _read_pipe(conn: Connection, inbox: queue.Queue[Work | Shutdown], board: _CancelBoard, outbox: _Outbox) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            _exit_because_parent_died()
            return
        if isinstance(message, Shutdown):
            # The supervisor closes the pipe next: that EOF, and a send that finds the pipe closed (the encoder may
            # be reporting already), are the expected end, not the API process's death.
            outbox.shutting_down()
        _on_message(message, inbox, board)
        if isinstance(message, Shutdown):
            return


def _on_message(message: WorkerInbound, inbox: queue.Queue[Work | Shutdown], board: _CancelBoard) -> None:
    match message:
        case JobRequest() | JobBatch():
            inbox.put(message)
        case CancelJob():
            board.cancel(message.job_id)
        case Shutdown():
            log.info("shutdown requested: %s", message.reason)
            board.cancel_current()
            inbox.put(message)
        case _:
            assert_never(message)


def _exit_while_loading(signum: int, frame: object) -> None:
    log.info("signal %d while loading; exiting", signum)
    os._exit(0)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _api_process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, as another user: a reused pid, but not ours to judge
        return True
    return True


def _beat(outbox: _Outbox, spec: WorkerSpec) -> None:
    while True:
        time.sleep(spec.heartbeat_interval_s)
        # Belt to the pipe's braces. Not getppid(): a forked worker's parent is the forkserver, not the API process.
        if not _api_process_alive(spec.api_pid):
            _exit_because_parent_died()
        outbox.send(Heartbeat(slot=spec.slot, sent_at=time.time()))


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process (the spawn target)."""
    started = time.monotonic()
    # The supervisor decides when a serving worker ends (see the module docstring); one still loading has nothing
    # to lose and leaves at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_while_loading)
    # Never reach for a model hub: weights are local folders or the embedded model built on this machine.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _configure_logging(spec)
    threading.current_thread().name = f"genserve-worker-{spec.slot}"
    outbox = _Outbox(conn)
    inbox: queue.Queue[Work | Shutdown] = queue.Queue()
    board = _CancelBoard()
    threading.Thread(target=_read_pipe, args=(conn, inbox, board, outbox), name="reader", daemon=True).start()
    threading.Thread(target=_beat, args=(outbox, spec), name="heartbeat", daemon=True).start()

    from workers.pipelines import MemoryPlanRefusedError, PipelineSet

    try:
        pipelines = PipelineSet.load(
            spec, on_plan=lambda plan: outbox.send(WorkerPlanned(slot=spec.slot, plan=plan)), on_adapters=outbox.send
        )
    except MemoryPlanRefusedError as exc:  # no reload loop: the same plan would be refused again
        log.error("%s", exc)
        outbox.send(
            WorkerStartupFailed(
                slot=spec.slot, error_type="MemoryPlanRefused", message=str(exc)[:MAX_TEXT], permanent=True
            )
        )
        sys.exit(1)
    except BaseException as exc:  # report why, then die: the supervisor decides about respawning
        log.exception("loading pipelines failed")
        outbox.send(WorkerStartupFailed(slot=spec.slot, error_type=type(exc).__name__, message=str(exc)[:MAX_TEXT]))
        sys.exit(1)

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outbox.send(
        WorkerReady(
            slot=spec.slot,
            pid=os.getpid(),
            device=pipelines.device,
            modes=pipelines.modes,
            embedded_model=pipelines.embedded,
            load_time_s=time.monotonic() - started,
            peak_rss_mb=_peak_rss_mb(),
            device_memory_mb=pipelines.device_memory_mb(),
            attention=pipelines.attention,
            warmup_s=pipelines.compile_stats.warmup_s,
            compile_cache_hits=pipelines.compile_stats.cache_hits,
            compile_cache_misses=pipelines.compile_stats.cache_misses,
        )
    )
    from workers.encoder import Encoder

    encoder = Encoder(outbox.send) if spec.performance.overlap_encoding else None
    ooms_in_a_row = 0
    while True:
        message = inbox.get()
        if isinstance(message, Shutdown):
            break
        jobs = [message] if isinstance(message, JobRequest) else list(message.jobs)
        outcome = _run_jobs(jobs, pipelines, outbox, board, encoder)
        if outcome is FailureKind.DEVICE_FATAL:
            # The context is poisoned: every later kernel fails too. Only a fresh process gets a working GPU back;
            # os._exit because interpreter teardown could touch CUDA again and hang. The images waiting for the
            # encoder are on the host already (encoding touches no device): they are written and reported first.
            log.error("fatal device error; exiting so the worker restarts with a fresh device context")
            _drain(encoder)
            os._exit(EXIT_DEVICE_FATAL)
        if outcome is not FailureKind.OUT_OF_MEMORY:
            ooms_in_a_row = 0
            continue
        ooms_in_a_row += 1
        pipelines.free_memory()
        if ooms_in_a_row >= spec.max_consecutive_oom:
            # Fragmented or leaked memory does not come back by itself: a fresh process does. The supervisor
            # respawns this slot as after any death (no job is lost: this one has already been answered).
            log.error("%d out-of-memory failures in a row; exiting so the worker restarts clean", ooms_in_a_row)
            _drain(encoder)
            sys.exit(EXIT_AFTER_OOM)
    _drain(encoder)  # Shutdown: what was denoised is written and reported before the worker leaves
    log.info("worker %d exits", spec.slot)


def _drain(encoder: Encoder | None) -> None:
    if encoder is not None:
        encoder.drain()


class _Batch:
    """The jobs of one pipeline call and which of them are still wanted: a job canceled mid-call is answered at
    once and dropped; the call goes on for the others (its latent is computed anyway: a batch cannot shrink)."""

    def __init__(self, jobs: list[JobRequest], outbox: _Outbox, board: _CancelBoard) -> None:
        self.jobs = jobs
        self.live = list(jobs)
        self.started_at = time.time()
        self._outbox = outbox
        self._board = board

    def drop_canceled(self, why: str) -> None:
        """Answer every live job someone canceled; raise JobCanceledError when none is left to run for."""
        for job in [job for job in self.live if self._board.is_canceled(job.job_id)]:
            self.live.remove(job)
            log.info("job %s canceled %s", job.job_id, why)
            failure = JobFailure(
                job.job_id, kind=FailureKind.CANCELED, error_type="canceled", message=f"canceled {why}"
            )
            self._outbox.send(failure)
        if not self.live:
            raise JobCanceledError(why)

    def on_step(self, step: int, total: int) -> None:
        elapsed = time.time() - self.started_at
        for job in self.live:
            self._outbox.send(JobProgress(job_id=job.job_id, step=step, total_steps=total, elapsed_s=elapsed))
        self.drop_canceled(f"after step {step} of {total}")

    def fail(self, kind: FailureKind, error_type: str, message: str) -> None:
        for job in self.live:
            self._outbox.send(JobFailure(job_id=job.job_id, kind=kind, error_type=error_type, message=message))


def _run_jobs(
    jobs: list[JobRequest], pipelines: PipelineSet, outbox: _Outbox, board: _CancelBoard, encoder: Encoder | None
) -> FailureKind | None:
    """Run one job, or a batch of them as one pipeline call, and report each; returns None when the call completed
    (its images reported, or handed to the encoder, which reports them), else what kind of failure it was."""
    with logs.job_context((job.job_id, job.request_id) for job in jobs):
        return _run_tagged(jobs, pipelines, outbox, board, encoder)


def _run_tagged(
    jobs: list[JobRequest], pipelines: PipelineSet, outbox: _Outbox, board: _CancelBoard, encoder: Encoder | None
) -> FailureKind | None:
    batch = _Batch(jobs, outbox, board)
    board.begin(job.job_id for job in jobs)
    for job in jobs:
        outbox.send(JobStarted(job_id=job.job_id, started_at=batch.started_at))
    first = jobs[0]
    log.info(
        "running %s %dx%d, %d steps%s",
        first.mode,
        first.width,
        first.height,
        first.num_inference_steps,
        f", a batch of {len(jobs)}" if len(jobs) > 1 else "",
    )
    try:
        batch.drop_canceled("before it started")
        outputs = pipelines.run(jobs, batch.on_step)
        _deliver(batch, outputs, outbox, encoder)
        return None
    except JobCanceledError:
        return FailureKind.CANCELED  # each job was answered when its cancel was seen
    except Exception as exc:
        from workers.pipelines import classify_error

        kind = classify_error(exc)
        log.exception("job %s failed (%s)", ", ".join(job.job_id for job in batch.live), kind.value)
        batch.fail(kind, type(exc).__name__, (str(exc) or type(exc).__name__)[:MAX_TEXT])
        return kind
    finally:
        board.end()


def _deliver(batch: _Batch, outputs: list[JobOutput], outbox: _Outbox, encoder: Encoder | None) -> None:
    """Encode and report each wanted image here, or hand them all to the encoder thread."""
    from workers.encoder import Denoised, finish

    denoised = [
        Denoised(
            job=job,
            image=output.image,
            started_at=batch.started_at,
            pipeline_s=output.pipeline_s,
            batch_size=len(batch.jobs),
        )
        for job, output in zip(batch.jobs, outputs, strict=True)
        if job in batch.live
    ]
    if encoder is None:
        for done in denoised:
            finish(done, outbox.send)  # encoded and written here, before the next job
        return
    # Wait for room first (the encoder is behind): JobDenoised tells the supervisor this loop is free, so it must go
    # out only once the images are off the main thread's hands. A batch's images go over together (they are in
    # memory already; holding them here would cost the same).
    encoder.wait_for_room()
    for done in denoised:
        outbox.send(JobDenoised(job_id=done.job.job_id, pipeline_s=done.pipeline_s))
        encoder.put(done)
