"""The supervisor: owns the worker processes, the global queue, and every job between queue and result.

Lives in the API process. One thread, ``genserve-monitor``, does all the talking to workers: it blocks in
``multiprocessing.connection.wait`` on every worker's pipe, every worker's process sentinel and a wake-up pipe, so
a message, a death or a new job is acted on the moment it happens (no sleep-polling). It alone sends on worker
pipes, which keeps pipe writes single-threaded. HTTP handlers only call ``submit`` / ``cancel`` / ``status``, which
take the lock briefly and wake the monitor.

Channels: per worker one duplex pipe (JobRequest / CancelJob / Shutdown out; WorkerReady, WorkerStartupFailed,
Heartbeat, JobStarted, JobProgress, JobResult, JobFailure in) and the process sentinel (readable once it exits).

Death of a worker: its job (recorded per slot) is re-queued once at the head of its priority; a job that was running
on a second worker that died fails with WorkerDied, so a poison job cannot crash-loop the pool. The slot respawns
on the same device after a doubling backoff, within a restart budget; once the budget is spent the slot stays dead
and /ready and /status say why.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.multiprocessing as torch_mp

from genserve.config import Config, expand_path
from genserve.errors import (
    JobCanceled,
    JobFailed,
    JobTimeout,
    NotReady,
    OutOfMemory,
    QueueFull,
    ShuttingDown,
    WorkerDied,
)
from genserve.jobs import Job, JobState
from genserve.messages import (
    EXIT_AFTER_OOM,
    CancelJob,
    Heartbeat,
    JobFailure,
    JobProgress,
    JobResult,
    JobStarted,
    Mode,
    Shutdown,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)
from genserve.queue import PriorityQueue, QueueFullError

log = logging.getLogger(__name__)

_DEADLINE_SOURCE = "the request's timeout, capped by queue.task_timeout_s"
TIMEOUT_REASON = "timeout"  # cancel reason of a job stopped by its deadline: it ends failed, not canceled

WorkerTarget = Callable[[WorkerSpec, Connection], None]


class WorkerState(str, Enum):
    STARTING = "starting"  # process spawned, loading pipelines
    READY = "ready"  # idle, takes the next job
    BUSY = "busy"  # running a job
    DEAD = "dead"  # no process: waiting to respawn, out of restart budget, or stopped


@dataclass(eq=False)
class WorkerSlot:
    """One place in the pool, bound to one device; its process comes and goes, the slot stays."""

    index: int
    device: str
    state: WorkerState = WorkerState.DEAD
    process: Any = None  # torch.multiprocessing Process while one runs
    conn: Connection | None = None
    pid: int | None = None
    job: Job | None = None
    restarts: int = 0  # respawns so far
    restart_times: deque[float] = field(default_factory=deque)  # monotonic, within the budget window
    consecutive_failures: int = 0  # deaths since the last time it became ready: drives the backoff
    respawn_at: float | None = None  # monotonic time of the scheduled respawn
    spawned_at: float | None = None  # monotonic
    ready_since: float | None = None  # wall clock
    last_heartbeat: float | None = None  # monotonic: any message counts
    job_began: float | None = None  # monotonic: when the current job was handed over
    last_progress: float | None = None  # monotonic: the current job's last finished step (or its hand-over)
    steps_seen: int = 0  # steps of the current job reported so far
    slowest_step_s: float = 0.0  # the current job's slowest step: what a "slow step, not a hang" is judged by
    jobs_done: int = 0
    last_error: str | None = None  # why the slot's process last died or failed to start (kept after recovery)
    death_cause: str | None = None  # set just before a death we caused or were told about; read by _on_death
    gave_up: bool = False  # restart budget spent: no more respawns

    @property
    def alive(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.BUSY)

    @property
    def loaded(self) -> bool:
        return self.state in (WorkerState.READY, WorkerState.BUSY)


class Supervisor:
    def __init__(
        self,
        config: Config,
        devices: list[str],
        enabled_modes: tuple[Mode, ...],
        worker_target: WorkerTarget | None = None,
        on_queue_change: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # Called under the lock whenever the queue's order changes, so waiting jobs can publish their new place.
        self._on_queue_change = on_queue_change or (lambda: None)
        self.enabled_modes = enabled_modes
        self._target = worker_target or _default_worker_target()
        self._ctx = torch_mp.get_context("spawn")
        self._lock = threading.RLock()
        self._queue: PriorityQueue[Job] = PriorityQueue(config.queue.max_size)
        self._slots = [WorkerSlot(index=i, device=device) for i, device in enumerate(devices)]
        self._cpu_threads = self._threads_per_cpu_worker(devices)
        self._wake_reader, self._wake_writer = self._ctx.Pipe(duplex=False)
        self._wake_pending = False  # one byte in the wake pipe is enough; never let it fill up
        self._monitor: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._started_at = time.time()
        self._ever_ready = False  # some worker has reported ready at least once
        self._outgoing: list[tuple[WorkerSlot, object]] = []  # messages the monitor sends once it drops the lock
        self._finishes: deque[float] = deque(maxlen=64)  # monotonic times jobs left workers: the drain rate

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn every worker and the monitor thread; returns at once (workers report ready later)."""
        with self._lock:
            self._accepting = True
            for slot in self._slots:
                self._spawn(slot)
        self._monitor = threading.Thread(target=self._monitor_loop, name="genserve-monitor", daemon=True)
        self._monitor.start()

    def shutdown(self) -> None:
        """Stop accepting, fail what is still queued, then ask → terminate → kill each worker. Blocking."""
        with self._lock:
            if self._stopping:
                return
            self._accepting = False
            self._stopping = True
            while (job := self._queue.pop()) is not None:
                job.finish(JobState.FAILED, error=ShuttingDown("service is shutting down; job was not started"))
            self._on_queue_change()
        self._wake()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._lock:
            slots = [slot for slot in self._slots if slot.process is not None]
            for slot in slots:
                self._send(slot, Shutdown(reason="service shutting down"))
        deadline = time.monotonic() + self.config.workers.shutdown_timeout_s
        for slot in slots:
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for slot in slots:
            if slot.process.is_alive():
                log.warning("worker %d (pid %s) did not exit in time; terminating", slot.index, slot.pid)
                slot.process.terminate()
                slot.process.join(timeout=3)
            if slot.process.is_alive():
                log.warning("worker %d (pid %s) ignored SIGTERM; killing", slot.index, slot.pid)
                slot.process.kill()
                slot.process.join(timeout=3)
        with self._lock:
            for slot in slots:
                if slot.job is not None:
                    slot.job.finish(JobState.FAILED, error=ShuttingDown("service shut down while the job ran"))
                    slot.job = None
                self._close(slot)
                slot.state = WorkerState.DEAD
        log.info("all workers stopped")

    # --- requests from the HTTP side -------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue a job; raises NotReady / QueueFull / ShuttingDown (nothing is queued then)."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("service is shutting down")
            if not self._can_take_jobs():
                raise NotReady(self._not_ready_reason())
            try:
                self._queue.push(job, job.priority)
            except QueueFullError:
                retry = self._retry_after_s()
                raise QueueFull(
                    f"queue is full ({self._queue.max_size} jobs waiting); retry in about {retry} s",
                    headers={"Retry-After": str(retry)},
                ) from None
            job.mark_queued(self._queue.position(job))
            self._on_queue_change()
        self._wake()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a job: out of the queue at once if waiting; at its next step if running. Idempotent."""
        with self._lock:
            if job.done:
                return
            job.cancel_reason = job.cancel_reason or reason
            if self._queue.remove(job):
                self._end_canceled(job)
                self._on_queue_change()
                return
        self._wake()  # the monitor sends CancelJob to the job's worker

    def cancel_queued(self, job: Job, reason: str) -> bool:
        """Cancel a job only if it is still waiting; a running one is left alone. True if it was cancelled."""
        with self._lock:
            if job.done or job not in self._queue:
                return False
            job.cancel_reason = reason
            self._queue.remove(job)
            self._end_canceled(job)
            self._on_queue_change()
            return True

    def retry_after_s(self) -> int:
        with self._lock:
            return self._retry_after_s()

    def _retry_after_s(self) -> int:
        """Seconds until a place in line is likely free, from how fast jobs have been leaving the workers."""
        if len(self._finishes) >= 2 and self._finishes[-1] > self._finishes[0]:
            rate = (len(self._finishes) - 1) / (self._finishes[-1] - self._finishes[0])
        else:  # nothing measured yet: guess half a minute per job per loaded worker
            rate = max(1, sum(slot.loaded for slot in self._slots)) / 30.0
        return int(min(3600, max(1, math.ceil(1 / rate))))

    def queued_jobs(self) -> list[Job]:
        """Waiting jobs in the order they will run."""
        with self._lock:
            return list(self._queue.ordered())

    def queue_position(self, job: Job) -> int | None:
        with self._lock:
            return self._queue.position(job)

    # --- status ----------------------------------------------------------------------------------------------

    def ready_count(self) -> int:
        with self._lock:
            return sum(slot.loaded for slot in self._slots)

    def status(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            workers = [
                {
                    "slot": slot.index,
                    "pid": slot.pid,
                    "device": slot.device,
                    "state": slot.state.value,
                    "restarts": slot.restarts,
                    "current_job": slot.job.id if slot.job else None,
                    "jobs_done": slot.jobs_done,
                    "last_heartbeat_s": round(now - slot.last_heartbeat, 3) if slot.last_heartbeat else None,
                    "ready_since": slot.ready_since,
                    "respawn_in_s": round(max(0.0, slot.respawn_at - now), 3) if slot.respawn_at else None,
                    "gave_up": slot.gave_up,
                    "last_error": slot.last_error,
                }
                for slot in self._slots
            ]
            alive = sum(slot.alive for slot in self._slots)
            return {
                "status": self._overall_status(),
                "concurrent_manager": {
                    "alive_processes": alive,
                    "dead_processes": len(self._slots) - alive,
                    "total_restarts": sum(slot.restarts for slot in self._slots),
                    "global_queue_size": len(self._queue),
                },
                "workers": workers,
                "queue": {
                    "size": len(self._queue),
                    "max_size": self._queue.max_size,
                    "saturated": len(self._queue) >= self._queue.max_size,
                    "retry_after_s": self._retry_after_s(),
                },
                "uptime_s": round(time.time() - self._started_at, 3),
            }

    def total_workers(self) -> int:
        return len(self._slots)

    def _overall_status(self) -> str:
        if self._stopping:
            return "stopping"
        loaded = sum(slot.loaded for slot in self._slots)
        if loaded == len(self._slots):
            return "running"
        if loaded:
            return "degraded"
        if any(slot.alive or slot.respawn_at is not None for slot in self._slots):
            return "starting"
        return "down"

    def _can_take_jobs(self) -> bool:
        """A loaded worker exists, or the pool has served before and a slot is only restarting.

        Before the first worker is ever ready, clients get 503 as GenServe gives them. After that, a job that
        arrives while every worker is being respawned waits in the queue instead of failing.
        """
        if any(slot.loaded for slot in self._slots):
            return True
        return self._ever_ready and not all(slot.gave_up for slot in self._slots)

    def not_ready_reason(self) -> str:
        with self._lock:
            return self._not_ready_reason()

    def _not_ready_reason(self) -> str:
        if self._stopping:
            return "service is shutting down"
        if all(slot.gave_up for slot in self._slots):
            errors = "; ".join(f"worker {s.index}: {s.last_error}" for s in self._slots if s.last_error)
            return f"no worker can start (restart budget spent): {errors}"
        return "no worker is ready yet (pipelines still loading); retry shortly"

    # --- the monitor thread ----------------------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        log.debug("monitor started")
        while True:
            with self._lock:
                if self._stopping:
                    break
                waitables: dict[Any, tuple[str, WorkerSlot | None]] = {self._wake_reader: ("wake", None)}
                for slot in self._slots:
                    if slot.conn is not None:
                        waitables[slot.conn] = ("conn", slot)
                    if slot.process is not None:
                        waitables[slot.process.sentinel] = ("sentinel", slot)
                timeout = self._seconds_to_next_deadline()
            ready = wait(list(waitables), timeout)
            try:
                with self._lock:
                    if self._stopping:
                        break
                    self._handle_ready(ready, waitables)
                    self._respawn_due_slots()
                    self._kill_slow_starters()
                    self._kill_hung_workers()
                    self._expire_deadlines()
                    self._send_pending_cancels()
                    self._dispatch()
                    outgoing, self._outgoing = self._outgoing, []
                # Sent without the lock: a job's input images can be tens of MB, and HTTP handlers must not wait
                # on the lock meanwhile. Only this thread ever writes to worker pipes, so order is kept.
                for slot, message in outgoing:
                    self._send(slot, message)
            except Exception:  # never let one bad message take supervision down with it
                log.exception("monitor iteration failed; continuing")
        log.debug("monitor stopped")

    def _handle_ready(self, ready: list[Any], waitables: dict[Any, tuple[str, WorkerSlot | None]]) -> None:
        deaths: list[WorkerSlot] = []
        for obj in ready:
            kind, slot = waitables[obj]
            if kind == "wake":
                self._drain_wakeups()
            elif kind == "conn" and slot is not None:
                self._drain_messages(slot)
            elif kind == "sentinel" and slot is not None:
                deaths.append(slot)
        # Messages first: a worker may send its result and then die; the result must count.
        for slot in deaths:
            self._drain_messages(slot)
            self._on_death(slot)

    def _drain_wakeups(self) -> None:
        self._wake_pending = False
        while self._wake_reader.poll():
            self._wake_reader.recv_bytes()

    def _drain_messages(self, slot: WorkerSlot) -> None:
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._on_message(slot, conn.recv())
        except (EOFError, OSError):
            pass  # the worker is gone; its sentinel reports the death

    def _on_message(self, slot: WorkerSlot, message: object) -> None:
        slot.last_heartbeat = time.monotonic()  # any message proves life
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, JobProgress):
            job = self._current_job(slot, message.job_id)
            if job is not None:
                self._note_step(slot)
                job.mark_progress(message.step, message.total_steps, message.elapsed_s)
        elif isinstance(message, JobStarted):
            job = self._current_job(slot, message.job_id)
            if job is not None:
                job.mark_started(message.started_at)
        elif isinstance(message, JobResult):
            job = self._release_job(slot, message.job_id)
            if job is not None:
                job.finish(JobState.COMPLETED, result=message)
                slot.jobs_done += 1
        elif isinstance(message, JobFailure):
            job = self._release_job(slot, message.job_id)
            if job is not None:
                self._fail_job(job, message)
        elif isinstance(message, WorkerReady):
            self._ever_ready = True
            slot.state = WorkerState.READY
            slot.pid = message.pid
            slot.ready_since = time.time()
            slot.consecutive_failures = 0
            log.info(
                "worker %d ready on %s (pid %d, %.1f s, modes %s)%s",
                slot.index,
                message.device,
                message.pid,
                message.load_time_s,
                ",".join(message.modes),
                " — EMBEDDED RANDOM-WEIGHT TEST MODEL: images are noise" if message.embedded_model else "",
            )
        elif isinstance(message, WorkerStartupFailed):
            slot.death_cause = f"startup failed: {message.error_type}: {message.message}"
            log.error("worker %d could not start: %s: %s", slot.index, message.error_type, message.message)
        else:
            log.warning("worker %d sent an unknown message %r", slot.index, type(message).__name__)

    def _current_job(self, slot: WorkerSlot, job_id: str) -> Job | None:
        return slot.job if slot.job is not None and slot.job.id == job_id else None

    def _release_job(self, slot: WorkerSlot, job_id: str) -> Job | None:
        """The worker is done with job_id: the slot is idle again."""
        job = self._current_job(slot, job_id)
        if job is None:
            log.warning("worker %d reported on job %s it does not hold; ignored", slot.index, job_id)
            return None
        self._finishes.append(time.monotonic())
        slot.job = None
        if slot.state is WorkerState.BUSY:
            slot.state = WorkerState.READY
        return job

    def _fail_job(self, job: Job, failure: JobFailure) -> None:
        if failure.error_type == "canceled":
            self._end_canceled(job)
            return
        if failure.error_type == "out_of_memory":
            job.finish(
                JobState.FAILED,
                error=OutOfMemory(f"out of memory: {failure.message}", worker_error_type=failure.error_type),
            )
            return
        job.finish(
            JobState.FAILED,
            error=JobFailed(
                f"generation failed: {failure.error_type}: {failure.message}",
                worker_error_type=failure.error_type,
            ),
        )

    @staticmethod
    def _end_canceled(job: Job) -> None:
        """A stopped job ends canceled, or failed with reason timeout when its deadline stopped it."""
        if job.cancel_reason == TIMEOUT_REASON:
            job.finish(
                JobState.FAILED,
                error=JobTimeout(
                    f"job ran past its deadline of {job.timeout_s:g} s ({_DEADLINE_SOURCE}) and was stopped"
                ),
            )
        else:
            job.finish(JobState.CANCELED, error=JobCanceled(f"job was canceled ({job.cancel_reason or 'by request'})"))

    def _on_death(self, slot: WorkerSlot) -> None:
        process = slot.process
        # The sentinel fires when the child's descriptors close, which can be tens of ms before the kernel has
        # torn down a large torch process and waitpid can report its exit code.
        process.join(timeout=2)
        exitcode = process.exitcode
        job, slot.job = slot.job, None
        self._close(slot)
        slot.state = WorkerState.DEAD
        slot.ready_since = None
        log.warning("worker %d (pid %s, %s) died with exit code %s", slot.index, slot.pid, slot.device, exitcode)
        if exitcode == EXIT_AFTER_OOM:
            slot.last_error = "restarted itself after repeated out-of-memory failures"
        else:
            slot.last_error = slot.death_cause or f"process exited with code {exitcode}"
        slot.death_cause = None
        if job is not None:
            self._recover_job(job, slot)
        self._schedule_respawn(slot)

    def _recover_job(self, job: Job, slot: WorkerSlot) -> None:
        if job.cancel_reason is not None:
            self._end_canceled(job)
        elif job.attempts >= 2:
            log.error("job %s was running on two workers that both died; failing it", job.id)
            job.finish(
                JobState.FAILED,
                error=WorkerDied(
                    f"worker died while running this job (twice, on worker {slot.index} last); not retried again"
                ),
            )
        else:
            log.warning("re-queueing job %s at the head of priority %d", job.id, job.priority)
            self._queue.push_front(job, job.priority)
            job.mark_queued(self._queue.position(job), requeued_because=f"worker {slot.index} died")
            self._on_queue_change()

    def _schedule_respawn(self, slot: WorkerSlot) -> None:
        cfg = self.config.workers
        now = time.monotonic()
        while slot.restart_times and now - slot.restart_times[0] > cfg.restart_window_s:
            slot.restart_times.popleft()
        if len(slot.restart_times) >= cfg.max_restarts:
            slot.gave_up = True
            slot.respawn_at = None
            slot.last_error = (
                f"{slot.last_error}; restart budget spent ({cfg.max_restarts} restarts in "
                f"{cfg.restart_window_s:g} s), not respawned"
            )
            log.error("worker %d: %s", slot.index, slot.last_error)
            self._fail_queue_if_no_worker_left()
            return
        delay = min(cfg.restart_backoff_s * (2**slot.consecutive_failures), cfg.restart_backoff_max_s)
        slot.consecutive_failures += 1
        slot.respawn_at = now + delay
        log.info("worker %d respawns in %.2f s", slot.index, delay)

    def _fail_queue_if_no_worker_left(self) -> None:
        """Every slot spent its budget: nothing will ever run the queued jobs, so end them now."""
        if not all(slot.gave_up for slot in self._slots):
            return
        reason = self._not_ready_reason()
        while (job := self._queue.pop()) is not None:
            job.finish(JobState.FAILED, error=NotReady(reason))
        self._on_queue_change()

    def _respawn_due_slots(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.respawn_at is not None and slot.respawn_at <= now:
                slot.respawn_at = None
                slot.restarts += 1
                slot.restart_times.append(now)
                self._spawn(slot)

    def _kill_slow_starters(self) -> None:
        limit = self.config.workers.ready_timeout_s
        now = time.monotonic()
        for slot in self._slots:
            if slot.state is WorkerState.STARTING and slot.spawned_at and now - slot.spawned_at > limit:
                slot.death_cause = (
                    f"not ready within workers.ready_timeout_s={limit:g} s; raise it if loading is just slow"
                )
                log.error("worker %d: %s; killing it", slot.index, slot.death_cause)
                slot.process.kill()  # its sentinel reports the death on the next turn

    def _note_step(self, slot: WorkerSlot) -> None:
        now = time.monotonic()
        if slot.last_progress is not None:
            slot.slowest_step_s = max(slot.slowest_step_s, now - slot.last_progress)
        slot.last_progress = now
        slot.steps_seen += 1

    def _stall_limit_s(self, slot: WorkerSlot) -> float:
        """How long a busy worker may go without finishing a step before it counts as hung."""
        cfg = self.config.workers
        if slot.steps_seen == 0:
            return cfg.first_step_timeout_s  # prompt encoding and the first step, maybe cold kernels
        return max(cfg.stall_timeout_s, cfg.stall_pace_factor * slot.slowest_step_s)

    def _hang_deadlines(self, slot: WorkerSlot) -> list[tuple[float, str]]:
        """(monotonic deadline, what it means) for each way this slot could turn out hung."""
        deadlines: list[tuple[float, str]] = []
        if slot.loaded and slot.last_heartbeat is not None:
            limit = self.config.workers.heartbeat_timeout_s
            deadlines.append((slot.last_heartbeat + limit, f"no heartbeat for {limit:g} s"))
        if slot.state is WorkerState.BUSY and slot.last_progress is not None:
            limit = self._stall_limit_s(slot)
            what = "no first step" if slot.steps_seen == 0 else f"no step after step {slot.steps_seen}"
            deadlines.append((slot.last_progress + limit, f"{what} within {limit:.1f} s"))
        return deadlines

    def _kill_hung_workers(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            for deadline, what in self._hang_deadlines(slot):
                if now >= deadline and slot.process is not None:
                    slot.death_cause = f"hung ({what}); killed"
                    log.error("worker %d (pid %s) is hung: %s; killing it", slot.index, slot.pid, what)
                    slot.process.kill()  # the sentinel reports the death; its job is handled as for any death
                    break

    def _expire_deadlines(self) -> None:
        """Jobs past their deadline: out of the queue now, or stopped at the running job's next step."""
        now = time.monotonic()
        expired = [job for job in self._queue if job.deadline <= now]
        for job in expired:
            self._queue.remove(job)
            job.cancel_reason = TIMEOUT_REASON
            job.finish(
                JobState.FAILED,
                error=JobTimeout(
                    f"job waited past its deadline of {job.timeout_s:g} s ({_DEADLINE_SOURCE}) in the queue"
                ),
            )
        if expired:
            self._on_queue_change()
        for slot in self._slots:
            running = slot.job
            if running is not None and running.cancel_reason is None and running.deadline <= now:
                running.cancel_reason = TIMEOUT_REASON  # _send_pending_cancels tells the worker

    def _send_pending_cancels(self) -> None:
        for slot in self._slots:
            job = slot.job
            if job is not None and job.cancel_reason is not None and not job.cancel_sent:
                job.cancel_sent = True
                self._outgoing.append((slot, CancelJob(job_id=job.id)))

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers, lowest slot first, until one runs out."""
        dispatched = False
        for slot in self._slots:
            if not len(self._queue):
                break
            if slot.state is not WorkerState.READY:
                continue
            job = self._queue.pop()
            if job is None:
                break
            job.mark_dispatched(slot.index, slot.device)
            slot.job, slot.state = job, WorkerState.BUSY
            slot.job_began = slot.last_progress = time.monotonic()
            slot.steps_seen, slot.slowest_step_s = 0, 0.0
            # If the worker died meanwhile the send fails quietly; its sentinel fires and _on_death re-queues.
            self._outgoing.append((slot, job.request))
            dispatched = True
        if dispatched:
            self._on_queue_change()

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines: list[float] = []
        for slot in self._slots:
            if slot.respawn_at is not None:
                deadlines.append(slot.respawn_at)
            if slot.state is WorkerState.STARTING and slot.spawned_at is not None:
                deadlines.append(slot.spawned_at + self.config.workers.ready_timeout_s + 0.01)
            deadlines.extend(deadline + 0.01 for deadline, _ in self._hang_deadlines(slot))
            if slot.job is not None and slot.job.cancel_reason is None:
                deadlines.append(slot.job.deadline)
        # Runs on every monitor wake-up (each progress message): an unsorted scan, not ordered()'s sort.
        deadlines.extend(job.deadline for job in self._queue)
        deadlines = [deadline for deadline in deadlines if deadline != float("inf")]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # --- process plumbing ------------------------------------------------------------------------------------

    def _spawn(self, slot: WorkerSlot) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=self._target,
            args=(self._spec(slot), child_conn),
            name=f"genserve-worker-{slot.index}",
            daemon=True,  # multiprocessing's exit hook terminates it if the API process exits normally
        )
        process.start()
        child_conn.close()  # the child holds its own copy; ours would hide EOF
        slot.process, slot.conn, slot.pid = process, parent_conn, process.pid
        slot.state = WorkerState.STARTING
        slot.spawned_at = slot.last_heartbeat = time.monotonic()
        log.info("worker %d spawned on %s (pid %d)", slot.index, slot.device, process.pid)

    def _spec(self, slot: WorkerSlot) -> WorkerSpec:
        cfg = self.config
        embedded = cfg.uses_embedded_model
        return WorkerSpec(
            slot=slot.index,
            device=slot.device,
            model_path=str(expand_path(cfg.model.path)) if cfg.model.path else "",
            fill_path=str(expand_path(cfg.fill.path)) if cfg.fill.path else "",
            controlnet_path=str(expand_path(cfg.controlnet.path)) if cfg.controlnet.path else "",
            embedded_cache_dir=str(expand_path(cfg.model.embedded_cache_dir)) if embedded else "",
            modes=self.enabled_modes,
            dtype=cfg.model.dtype,
            cpu_threads=self._cpu_threads if slot.device == "cpu" else 0,
            heartbeat_interval_s=cfg.workers.heartbeat_interval_s,
            max_consecutive_oom=cfg.workers.max_consecutive_oom,
            log_level=cfg.server.log_level,
        )

    def _threads_per_cpu_worker(self, devices: list[str]) -> int:
        if self.config.workers.cpu_threads:
            return self.config.workers.cpu_threads
        cpu_workers = sum(device == "cpu" for device in devices) or 1
        return max(1, (os.cpu_count() or 1) // cpu_workers)

    def _send(self, slot: WorkerSlot, message: object) -> bool:
        if slot.conn is None:
            return False
        try:
            slot.conn.send(message)
            return True
        except (BrokenPipeError, EOFError, OSError):
            return False

    def _close(self, slot: WorkerSlot) -> None:
        if slot.conn is not None:
            slot.conn.close()
        slot.conn = None
        slot.process = None

    def _wake(self) -> None:
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._wake_writer.send_bytes(b"!")
        except OSError:
            pass


def _default_worker_target() -> WorkerTarget:
    # Imported here so the API process does not import the worker's heavy modules at start.
    from workers.main import run_worker

    return run_worker
