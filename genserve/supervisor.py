"""The supervisor: owns the worker processes, the global queue, and every job between queue and result.

Lives in the API process. One thread, ``genserve-monitor``, does all the talking to workers: it blocks in
``multiprocessing.connection.wait`` on every worker's pipe, every worker's process sentinel and a wake-up pipe, so
a message, a death or a new job is acted on the moment it happens (no sleep-polling). HTTP handlers only call
``submit`` / ``cancel`` (which take the lock briefly and wake the monitor) and read ``status()``, a snapshot the
monitor publishes, without any lock.

The monitor never waits on a worker. Every message to a worker is small (inputs travel as files, see
``genserve.messages``) and is handed to that slot's sender thread (``genserve-sender-N``), which alone writes to the
worker's pipe: a worker that stops reading (SIGSTOP, a GIL-holding hang) blocks only its own sender, and the
monitor goes on detecting hangs and dispatching on every other slot. Under the lock there is no disk I/O and no
work that grows with the queue: queue operations are O(log n), job events only enqueue work for the persistence
writer, and expiry reads a deadline heap.

Channels: per worker one duplex pipe (JobRequest / CancelJob / Shutdown out; WorkerPlanned, WorkerReady,
WorkerStartupFailed, Heartbeat, JobStarted, JobProgress, JobDenoised, JobResult, JobFailure in) and the process
sentinel (readable once it exits).

Overlapped encoding (performance.overlap_encoding): a worker says JobDenoised when its pipeline call for a job
returned and the image went to its encoder thread. The slot is READY again and gets the next job at once, while the
job stays the slot's, "encoding", until its JobResult (or JobFailure: the PNG could not be written) arrives. A
cancel no longer reaches such a job (too late: it completes), its deadline no longer stops it, and hang detection
judges the slot by its heartbeat and the job it is denoising, if any: an encoder that stalls holds up the main loop
of the worker (it waits for room), and the next job's missing first step shows that.

Death of a worker: its jobs (recorded per slot: the one it ran and those it was encoding) are re-queued once at the
head of their priority, in the order they were dispatched; a job that was on a second worker that died fails with
WorkerDied, so a poison job cannot crash-loop the pool. The slot respawns on the same device after a doubling
backoff. Within ``workers.max_restarts`` per ``restart_window_s`` that is all; once the budget is spent the slot does
not give up: it retries every ``restart_backoff_max_s`` while /ready says "degraded" (Kubernetes' CrashLoopBackOff),
or, with ``workers.on_budget_spent: exit``, the service exits non-zero so an orchestrator replaces it. A worker whose
memory plan does not fit its device (WorkerStartupFailed with permanent=True) is the exception: its slot is marked
failed and never respawned, since the same plan would be refused again after reloading nothing but time.

Workers start from a forkserver that has already imported torch, diffusers and transformers (``workers.preload``),
so a respawn costs the model load and little else. Nothing touches CUDA before the fork.

Shutdown is two calls: ``drain(grace)`` stops taking jobs, fails what is queued, lets running jobs (those still
encoding too) finish within the grace and fails the rest; ``shutdown()`` then asks each worker to exit (it drains its
encoder first), waits ``workers.shutdown_timeout_s`` and kills what is left. A worker that exits during either is
never counted as a crash nor respawned.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection, wait
from typing import Any, assert_never

import torch.multiprocessing as torch_mp

from genserve import forkserver
from genserve.config import Config, expand_path
from genserve.errors import (
    DeviceError,
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
    EXIT_DEVICE_FATAL,
    AdaptersChanged,
    CancelJob,
    CancelReason,
    FailureKind,
    Heartbeat,
    JobBatch,
    JobDenoised,
    JobFailure,
    JobProgress,
    JobResult,
    JobStarted,
    MemoryPlan,
    Mode,
    Shutdown,
    WorkerInbound,
    WorkerOutbound,
    WorkerPlanned,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
    adapter_key,
)
from genserve.queue import PriorityQueue

log = logging.getLogger(__name__)

_DEADLINE_SOURCE = "the request's timeout, capped by queue.task_timeout_s"
MONITOR_JOIN_S = 60.0  # at shutdown, the longest wait for the monitor to finish what it is doing

WorkerTarget = Callable[[WorkerSpec, Connection], None]
FatalHandler = Callable[[str], None]


class WorkerState(StrEnum):
    STARTING = "starting"  # process spawned, loading pipelines
    READY = "ready"  # idle, takes the next job (its encoder may still be writing earlier jobs' images)
    BUSY = "busy"  # running a job
    DEAD = "dead"  # no process: waiting to respawn, or stopped
    FAILED = "failed"  # its models cannot be loaded on its device (memory plan refused): never respawned


class _Sender:
    """The one writer of a worker's pipe: a thread fed by a queue, so a stuck worker blocks only this thread.

    It ends when told to close or when the pipe breaks (the worker died); it closes the connection itself, so no
    other thread ever closes a descriptor this one might still be writing to."""

    _CLOSE = object()

    def __init__(self, conn: Connection, slot: int) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"genserve-sender-{slot}", daemon=True)
        self._thread.start()

    def send(self, message: WorkerInbound) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._CLOSE)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while (message := self._queue.get()) is not self._CLOSE:
                self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            pass  # the worker is gone; its sentinel reports the death
        finally:
            self._conn.close()


@dataclass(eq=False)
class WorkerSlot:
    """One place in the pool, bound to one device; its process comes and goes, the slot stays."""

    index: int
    device: str
    state: WorkerState = WorkerState.DEAD
    process: Any = None  # torch.multiprocessing Process while one runs
    conn: Connection | None = None  # our end of the pipe, read by the monitor only
    sender: _Sender | None = None  # writes to the same pipe
    pid: int | None = None
    jobs: list[Job] = field(default_factory=list)  # what the worker denoises: one job, or the jobs of a batch
    encoding: deque[Job] = field(default_factory=deque)  # denoised, PNG not reported yet: oldest first
    restarts: int = 0  # respawns so far
    hangs: int = 0  # processes killed as hung (no heartbeat, or no step in time): metrics
    oom_failures: int = 0  # jobs its processes failed with out-of-memory: metrics
    restart_times: deque[float] = field(default_factory=deque)  # monotonic, within the budget window
    consecutive_failures: int = 0  # deaths since the last time it became ready: drives the backoff
    respawn_at: float | None = None  # monotonic time of the next (re)spawn
    spawned_once: bool = False  # the first spawn is no restart
    spawned_at: float | None = None  # monotonic
    ready_since: float | None = None  # wall clock
    last_heartbeat: float | None = None  # monotonic: any message counts
    last_progress: float | None = None  # monotonic: the current job's last finished step (or its hand-over)
    steps_seen: int = 0  # steps of the current job reported so far
    slowest_step_s: float = 0.0  # the current job's slowest step: what a "slow step, not a hang" is judged by
    jobs_done: int = 0
    load_time_s: float | None = None  # the last start's load time, as the worker measured it
    peak_rss_mb: float | None = None  # the last start's peak host memory while loading
    last_error: str | None = None  # why the slot's process last died or failed to start (kept after recovery)
    memory_plan: MemoryPlan | None = None  # the last start's memory plan, as the worker reported it
    speed: dict[str, Any] | None = None  # the last start's attention backend, warm-up time and compile-cache use
    refused: str | None = None  # the worker refused to load for a reason a retry cannot change: no respawn
    adapters: AdaptersChanged | None = None  # the LoRA adapters its process holds (None: none loaded yet)
    death_cause: str | None = None  # set just before a death we caused or were told about; read by _on_death

    @property
    def alive(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.BUSY)

    @property
    def loaded(self) -> bool:
        return self.state in (WorkerState.READY, WorkerState.BUSY)


@dataclass(frozen=True)
class PoolSnapshot:
    """The pool as the monitor last published it; read by /status, /ready and /models without a lock."""

    status: str  # running | degraded | starting | stopping
    reason: str | None  # why not running, when it is not
    workers: tuple[dict[str, Any], ...]  # per slot; ages as monotonic stamps, rendered by Supervisor.status()
    queue_size: int
    max_queue_size: int
    retry_after_s: int
    ready_workers: int
    total_restarts: int
    adapter_loads_avoided: int  # LoRA loads the dispatcher's affinity saved


class Supervisor:
    def __init__(
        self,
        config: Config,
        devices: list[str],
        enabled_modes: tuple[Mode, ...],
        worker_target: WorkerTarget | None = None,
        on_fatal: FatalHandler | None = None,
    ) -> None:
        self.config = config
        self.enabled_modes = enabled_modes
        self._target = worker_target or _default_worker_target()
        # Called (outside the lock) when a slot spends its restart budget under workers.on_budget_spent: exit.
        self._on_fatal = on_fatal or (lambda reason: None)
        self._ctx = _worker_context(config.workers.start_method)
        self._lock = threading.RLock()
        self._job_left_worker = threading.Condition(self._lock)  # drain() waits on it
        self._queue_changed = threading.Event()  # the job manager's position publisher waits on it
        self._slot_freed = threading.Condition(self._lock)  # a cluster node's claimer waits on it (spare_workers)
        self._queue: PriorityQueue[Job] = PriorityQueue(config.queue.max_size)
        self._slots = [WorkerSlot(index=i, device=device) for i, device in enumerate(devices)]
        self._cpu_threads = self._threads_per_cpu_worker(devices)
        self._wake_reader, self._wake_writer = self._ctx.Pipe(duplex=False)
        self._wake_pending = False  # one byte in the wake pipe is enough; never let it fill up
        self._monitor: threading.Thread | None = None
        self._accepting = False
        self._draining = False  # no new jobs, no respawns: the service is going away
        self._stopping = False  # the monitor ends
        self._started_at = time.time()
        self._ever_ready = False  # some worker has reported ready at least once
        self._outgoing: list[tuple[WorkerSlot, WorkerInbound]] = []  # sent once the monitor drops the lock
        self._fatal: str | None = None  # set once when on_budget_spent=exit fires
        self._spawned: set[Any] = set()  # processes this supervisor started that have not been seen to end
        self._finishes: deque[float] = deque(maxlen=64)  # monotonic times jobs left workers: the drain rate
        self._adapter_loads_avoided = 0  # LoRA loads affinity saved: held by the chosen worker, not by the first idle
        self._snapshot = self._build_snapshot()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the monitor, which spawns every worker; returns at once (workers report ready later)."""
        with self._lock:
            self._accepting = True
            now = time.monotonic()
            for slot in self._slots:
                slot.respawn_at = now
            self._publish()
        # Runs before multiprocessing's own exit hook (atexit is last-in, first-out), even when shutdown() never ran.
        atexit.register(self._kill_stragglers)
        self._monitor = threading.Thread(target=self._monitor_loop, name="genserve-monitor", daemon=True)
        self._monitor.start()

    def drain(self, grace_s: float) -> None:
        """Stop taking jobs; fail queued ones; give running ones ``grace_s`` to finish, then fail them. Blocking.

        Sync clients of failed jobs get their 503 answer from their own route; workers keep running (idle) until
        shutdown(), and none of them is respawned from now on."""
        with self._lock:
            if self._draining:
                return
            self._draining = True
            self._accepting = False
            self._fail_queued(ShuttingDown("service shutting down; the job had not started", headers=self._retry()))
            self._publish()
        self._wake()
        log.info("draining: waiting up to %.1f s for running jobs", grace_s)
        deadline = time.monotonic() + grace_s
        with self._job_left_worker:
            while self._running_jobs() and (left := deadline - time.monotonic()) > 0:
                self._job_left_worker.wait(left)
            self._fail_running(
                f"service shutting down; the job was still running after server.shutdown_grace_s={grace_s:g} s"
            )
            self._publish()
        self._wake()

    def shutdown(self) -> None:
        """Drain at once if nobody did, then ask → wait → kill each worker. Blocking; idempotent."""
        self.drain(0.0)
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            slots = [slot for slot in self._slots if slot.process is not None]
            self._publish()
        self._wake()
        if self._monitor is not None:
            # It may be starting a process (the forkserver's first start imports torch): wait for that to end,
            # so no worker can appear after the sweep below.
            self._monitor.join(timeout=MONITOR_JOIN_S)
        for slot in slots:
            if slot.sender is not None:
                slot.sender.send(Shutdown(reason="service shutting down"))
                slot.sender.close()
        deadline = time.monotonic() + self.config.workers.shutdown_timeout_s
        for slot in slots:
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for slot in slots:
            # Workers ignore SIGTERM (a group-wide SIGTERM must not kill them before the drain is over), so the
            # step after asking is SIGKILL.
            if slot.process.is_alive():
                log.warning("worker %d (pid %s) did not exit in time; killing it", slot.index, slot.pid)
                slot.process.kill()
                slot.process.join(timeout=5)
        self._kill_stragglers()
        with self._lock:
            for slot in slots:
                self._forget_process(slot)
                slot.state = WorkerState.DEAD
            self._publish()
        log.info("all workers stopped")

    def _kill_stragglers(self) -> None:
        """Kill every worker process still alive: after shutdown() only one no slot knew of (a race with a spawn); at
        interpreter exit without shutdown() (a forced stop), all of them.

        Workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join) would wait on one for ever."""
        with self._lock:
            leftovers = [process for process in self._spawned if process.is_alive()]
        for process in leftovers:
            log.warning("killing leftover worker process %s (pid %s)", process.name, process.pid)
            process.kill()
            process.join(timeout=5)

    @property
    def fatal_reason(self) -> str | None:
        """Why the service must exit (a slot spent its budget under on_budget_spent: exit), or None."""
        return self._fatal

    # --- requests from the HTTP side -------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue a job; raises NotReady / QueueFull / ShuttingDown (nothing is queued then)."""
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        """Queue the jobs of one request (the images of n > 1) together, or none of them: raises NotReady /
        QueueFull / ShuttingDown. Together, so the monitor sees a group whole and can batch it (see _dispatch)."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("service is shutting down; not taking new jobs", headers=self._retry())
            if not self._can_take_jobs():
                raise NotReady(self._not_ready_reason())
            if len(self._queue) + len(jobs) > self._queue.max_size:
                retry = self._retry_after_s()
                room = self._queue.max_size - len(self._queue)
                asked = f"; this request needs {len(jobs)} places, {room} are free" if len(jobs) > 1 else ""
                raise QueueFull(
                    f"queue is full ({len(self._queue)} of {self._queue.max_size} jobs waiting{asked}); "
                    f"retry in about {retry} s",
                    headers={"Retry-After": str(retry)},
                )
            for job in jobs:
                self._queue.push(job, job.priority, job.schedule.deadline, job.schedule.group)
                job.mark_queued(self._queue.position(job))
            self._queue_changed.set()
            self._publish()
        self._wake()
        return jobs

    def cancel(self, job: Job, reason: CancelReason) -> None:
        """Stop a job: out of the queue at once if waiting; at its next step if running. Idempotent.

        A job already denoised (encoding on its worker) is not stopped: too late, it completes. Its cancel_reason
        stays set, so should its worker die before the result, it ends canceled instead of running again."""
        with self._lock:
            if job.done:
                return
            job.schedule.cancel_reason = job.schedule.cancel_reason or reason
            if self._queue.remove(job):
                self._end_stopped(job)
                self._queue_changed.set()
                self._publish()
                return
        self._wake()  # the monitor sends CancelJob to the job's worker

    def cancel_queued(self, job: Job, reason: CancelReason) -> bool:
        """Cancel a job only if it is still waiting; a running one is left alone. True if it was cancelled."""
        with self._lock:
            if job.done or not self._queue.remove(job):
                return False
            job.schedule.cancel_reason = reason
            self._end_stopped(job)
            self._queue_changed.set()
            self._publish()
            return True

    def wait_for_queue_change(self, timeout: float | None = None) -> bool:
        """Block until the queue's order changed since the last call (the job manager's position publisher)."""
        changed = self._queue_changed.wait(timeout)
        self._queue_changed.clear()
        return changed

    def spare_workers(self) -> int:
        """Loaded idle workers that no queued job is waiting for: how many jobs a cluster node may claim now."""
        with self._lock:
            if self._draining:
                return 0
            return max(0, sum(slot.state is WorkerState.READY for slot in self._slots) - len(self._queue))

    def wait_for_spare_worker(self, timeout: float) -> bool:
        """Block until some worker may be spare (a slot became ready or idle), or ``timeout``; then ask
        spare_workers."""
        with self._slot_freed:
            if self.spare_workers():
                return True
            return self._slot_freed.wait(timeout)

    @property
    def ever_ready(self) -> bool:
        return self._ever_ready

    def queued_jobs(self) -> list[Job]:
        """Waiting jobs in the order they will run (O(n): for status pages)."""
        with self._lock:
            return list(self._queue.ordered())

    def queued_ids(self) -> list[str]:
        return [job.id for job in self.queued_jobs()]

    def queue_position(self, job: Job) -> int | None:
        with self._lock:
            return self._queue.position(job)

    def queue_depth_by_priority(self) -> dict[int, int]:
        """Waiting jobs per priority (the metrics scrape): the lock for O(priorities log n), no scan."""
        with self._lock:
            return self._queue.depth_by_priority()

    # --- status (lock-free reads of the last snapshot) -------------------------------------------------------

    def ready_count(self) -> int:
        return self._snapshot.ready_workers

    def total_workers(self) -> int:
        return len(self._slots)

    def retry_after_s(self) -> int:
        return self._snapshot.retry_after_s

    def not_ready_reason(self) -> str:
        return self._snapshot.reason or "no worker is ready yet (pipelines still loading); retry shortly"

    def status(self) -> dict[str, Any]:
        snap = self._snapshot
        now = time.monotonic()
        workers = []
        for view in snap.workers:
            worker = dict(view)
            heartbeat = worker.pop("_last_heartbeat")
            respawn_at = worker.pop("_respawn_at")
            worker["last_heartbeat_s"] = round(now - heartbeat, 3) if heartbeat is not None else None
            worker["respawn_in_s"] = round(max(0.0, respawn_at - now), 3) if respawn_at is not None else None
            workers.append(worker)
        alive = sum(worker["state"] != WorkerState.DEAD.value for worker in workers)
        return {
            "status": snap.status,
            "reason": snap.reason,
            "concurrent_manager": {
                "alive_processes": alive,
                "dead_processes": len(workers) - alive,
                "total_restarts": snap.total_restarts,
                "global_queue_size": snap.queue_size,
            },
            "workers": workers,
            "queue": {
                "size": snap.queue_size,
                "max_size": snap.max_queue_size,
                "saturated": snap.queue_size >= snap.max_queue_size,
                "retry_after_s": snap.retry_after_s,
            },
            "loras": {
                "adapter_loads": sum(worker["loras"]["loads"] for worker in workers),
                "adapter_loads_avoided": snap.adapter_loads_avoided,
            },
            "uptime_s": round(time.time() - self._started_at, 3),
        }

    def _publish(self) -> None:
        """Under the lock: replace the snapshot (O(slots)); readers see the old or the new one, whole."""
        self._snapshot = self._build_snapshot()

    def _build_snapshot(self) -> PoolSnapshot:
        workers = tuple(
            {
                "slot": slot.index,
                "pid": slot.pid,
                "device": slot.device,
                "state": slot.state.value,
                "restarts": slot.restarts,
                "hangs": slot.hangs,
                "oom_failures": slot.oom_failures,
                "budget_left": self._budget_left(slot),
                "budget_spent": self._budget_left(slot) == 0,
                "current_job": slot.jobs[0].id if slot.jobs else None,
                "current_jobs": [job.id for job in slot.jobs],
                "encoding_jobs": [job.id for job in slot.encoding],
                "jobs_done": slot.jobs_done,
                "ready_since": slot.ready_since,
                "load_time_s": slot.load_time_s,
                "peak_rss_mb": slot.peak_rss_mb,
                "last_error": slot.last_error,
                "memory_plan": slot.memory_plan.as_dict() if slot.memory_plan else None,
                "speed": slot.speed,
                "loras": _adapters_view(slot.adapters),
                "_last_heartbeat": slot.last_heartbeat,
                "_respawn_at": slot.respawn_at,
            }
            for slot in self._slots
        )
        status, reason = self._overall_status()
        return PoolSnapshot(
            status=status,
            reason=reason,
            workers=workers,
            queue_size=len(self._queue),
            max_queue_size=self._queue.max_size,
            retry_after_s=self._retry_after_s(),
            ready_workers=sum(slot.loaded for slot in self._slots),
            total_restarts=sum(slot.restarts for slot in self._slots),
            adapter_loads_avoided=self._adapter_loads_avoided,
        )

    def _overall_status(self) -> tuple[str, str | None]:
        if self._draining or self._stopping:
            return "stopping", "service is shutting down"
        loaded = sum(slot.loaded for slot in self._slots)
        failed = [slot for slot in self._slots if slot.state is WorkerState.FAILED]
        if failed:
            status = "failed" if len(failed) == len(self._slots) else "degraded"
            return status, (
                f"{len(failed)} of {len(self._slots)} worker(s) cannot load the models and are not retried "
                f"(see memory_plan in /status; memory.* in config.yaml): {self._refusals()}"
            )
        spent = [slot for slot in self._slots if self._budget_left(slot) == 0 and not slot.loaded]
        if spent:
            cfg = self.config.workers
            errors = "; ".join(f"worker {slot.index}: {slot.last_error}" for slot in spent)
            return "degraded", (
                f"{len(spent)} of {len(self._slots)} worker(s) spent their restart budget ({cfg.max_restarts} "
                f"restarts in {cfg.restart_window_s:g} s) and retry every {cfg.restart_backoff_max_s:g} s: {errors}"
            )
        if loaded == len(self._slots):
            return "running", None
        down = [slot for slot in self._slots if not slot.loaded and slot.last_error]
        errors = "; ".join(f"worker {slot.index}: {slot.last_error}" for slot in down)
        if loaded:
            return "degraded", f"{len(self._slots) - loaded} of {len(self._slots)} worker(s) restarting: {errors}"
        if self._ever_ready or errors:
            return "starting", f"every worker is restarting: {errors}" if errors else "every worker is restarting"
        return "starting", "no worker is ready yet (pipelines still loading); retry shortly"

    def _budget_left(self, slot: WorkerSlot) -> int:
        cfg = self.config.workers
        now = time.monotonic()
        recent = sum(1 for at in slot.restart_times if now - at <= cfg.restart_window_s)
        return max(0, cfg.max_restarts - recent)

    def _can_take_jobs(self) -> bool:
        """A loaded worker exists, or the pool has served before and a slot is only restarting.

        Before the first worker is ever ready, clients get 503 as GenServe gives them. After that, a job that
        arrives while every worker is being respawned waits in the queue (bounded by its deadline) instead of
        failing: slots never give up, so some worker will take it.
        """
        return any(slot.loaded for slot in self._slots) or self._ever_ready

    def _not_ready_reason(self) -> str:
        _, reason = self._overall_status()
        return reason or "no worker is ready yet (pipelines still loading); retry shortly"

    def _retry_after_s(self) -> int:
        """Seconds until a place in line is likely free, from how fast jobs have been leaving the workers."""
        if len(self._finishes) >= 2 and self._finishes[-1] > self._finishes[0]:
            rate = (len(self._finishes) - 1) / (self._finishes[-1] - self._finishes[0])
        else:  # nothing measured yet: guess half a minute per job per loaded worker
            rate = max(1, sum(slot.loaded for slot in self._slots)) / 30.0
        return int(min(3600, max(1, math.ceil(1 / rate))))

    def _retry(self) -> dict[str, str]:
        """Retry-After of a refusal during shutdown: by then this process is gone and a replacement may be up."""
        seconds = self.config.server.shutdown_grace_s + self.config.workers.shutdown_timeout_s
        return {"Retry-After": str(max(1, math.ceil(seconds)))}

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
                self._monitor_turn(ready, waitables)
            except Exception:  # never let one bad message take supervision down with it
                log.exception("monitor iteration failed; continuing")
        log.debug("monitor stopped")

    def _monitor_turn(self, ready: list[Any], waitables: dict[Any, tuple[str, WorkerSlot | None]]) -> None:
        fatal_before = self._fatal
        with self._lock:
            if self._stopping:
                return
            self._handle_ready(ready, waitables)
            self._kill_slow_starters()
            self._kill_hung_workers()
            self._expire_deadlines()
            self._send_pending_cancels()
            self._dispatch()
            to_spawn = self._slots_due_to_spawn()
            outgoing, self._outgoing = self._outgoing, []
            self._publish()
        # Outside the lock: handing a message to a sender never blocks, but starting a process can take a while
        # (the first start of the forkserver imports torch), and HTTP handlers must not wait on the lock for it.
        for slot, message in outgoing:
            if slot.sender is not None:
                slot.sender.send(message)
        for slot in to_spawn:
            self._spawn(slot)
        if self._fatal is not None and fatal_before is None:
            self._on_fatal(self._fatal)

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
        # Worker messages are a few hundred bytes, written in one syscall, so a readable pipe holds whole
        # messages and recv() does not wait on a half-written one.
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._on_message(slot, conn.recv())
        except (EOFError, OSError):
            pass  # the worker is gone; its sentinel reports the death

    def _on_message(self, slot: WorkerSlot, message: WorkerOutbound) -> None:
        slot.last_heartbeat = time.monotonic()  # any message proves life
        match message:
            case Heartbeat():
                pass
            case JobProgress():
                if (job := self._current_job(slot, message.job_id)) is not None:
                    if job is slot.jobs[0]:  # the jobs of a batch step together: count each step once
                        self._note_step(slot)
                    job.mark_progress(message.step, message.total_steps, message.elapsed_s)
            case JobStarted():
                if (job := self._current_job(slot, message.job_id)) is not None:
                    job.mark_started(message.started_at)
            case JobDenoised():
                self._on_denoised(slot, message)
            case JobResult():
                if (job := self._release_job(slot, message.job_id)) is not None:
                    job.finish(JobState.COMPLETED, result=message)
                    slot.jobs_done += 1
            case JobFailure():
                if message.kind is FailureKind.OUT_OF_MEMORY:
                    slot.oom_failures += 1
                if (job := self._release_job(slot, message.job_id)) is not None:
                    self._fail_job(job, message)
                if message.kind is FailureKind.DEVICE_FATAL:
                    slot.death_cause = f"fatal device error ({message.error_type}: {message.message}); restarted"
            case WorkerReady():
                self._on_ready(slot, message)
            case WorkerPlanned():
                slot.memory_plan = message.plan
            case AdaptersChanged():
                slot.adapters = message
            case WorkerStartupFailed():
                first_line = message.message.splitlines()[0] if message.message else message.error_type
                if message.permanent:
                    slot.refused = first_line
                slot.death_cause = f"startup failed: {message.error_type}: {first_line}"
                log.error("worker %d could not start: %s: %s", slot.index, message.error_type, message.message)
            case _:
                assert_never(message)

    def _on_ready(self, slot: WorkerSlot, message: WorkerReady) -> None:
        self._ever_ready = True
        slot.state = WorkerState.READY
        self._slot_freed.notify_all()
        slot.pid = message.pid
        slot.ready_since = time.time()
        slot.consecutive_failures = 0
        slot.load_time_s = round(message.load_time_s, 3)
        slot.peak_rss_mb = round(message.peak_rss_mb, 1)
        slot.speed = {
            "attention": message.attention,
            "warmup_s": round(message.warmup_s, 3),
            "compile_cache_hits": message.compile_cache_hits,
            "compile_cache_misses": message.compile_cache_misses,
        }
        log.info(
            "worker %d ready on %s (pid %d, loaded in %.2f s, peak RSS %.0f MiB%s, modes %s)%s",
            slot.index,
            message.device,
            message.pid,
            message.load_time_s,
            message.peak_rss_mb,
            f", device memory {message.device_memory_mb:.0f} MiB" if message.device_memory_mb else "",
            ",".join(message.modes),
            " — EMBEDDED RANDOM-WEIGHT TEST MODEL: images are noise" if message.embedded_model else "",
        )

    def _current_job(self, slot: WorkerSlot, job_id: str) -> Job | None:
        return next((job for job in slot.jobs if job.id == job_id), None)

    def _on_denoised(self, slot: WorkerSlot, message: JobDenoised) -> None:
        """The worker's main loop is free: the slot takes the next job while this one's PNG is encoded."""
        job = self._current_job(slot, message.job_id)
        if job is None:
            log.warning("worker %d denoised job %s it does not hold; ignored", slot.index, message.job_id)
            return
        self._leave_pipeline(slot, job)
        slot.encoding.append(job)

    def _release_job(self, slot: WorkerSlot, job_id: str) -> Job | None:
        """The worker is done with job_id, the one it ran (the slot is idle again) or one it was encoding."""
        job = self._current_job(slot, job_id)
        if job is not None:
            self._leave_pipeline(slot, job)
        else:
            job = next((encoding for encoding in slot.encoding if encoding.id == job_id), None)
            if job is None:
                log.warning("worker %d reported on job %s it does not hold; ignored", slot.index, job_id)
                return None
            slot.encoding.remove(job)
        self._finishes.append(time.monotonic())
        self._job_left_worker.notify_all()
        return job

    def _leave_pipeline(self, slot: WorkerSlot, job: Job) -> None:
        """``job`` is out of its worker's pipeline call; once every job of the call is, the worker is free."""
        slot.jobs.remove(job)
        if not slot.jobs and slot.state is WorkerState.BUSY:
            slot.state = WorkerState.READY
            self._slot_freed.notify_all()

    def _fail_job(self, job: Job, failure: JobFailure) -> None:
        match failure.kind:
            case FailureKind.CANCELED:
                self._end_stopped(job)
            case FailureKind.OUT_OF_MEMORY:
                job.finish(JobState.FAILED, error=OutOfMemory(f"out of memory: {failure.message}"))
            case FailureKind.DEVICE_FATAL:
                job.finish(
                    JobState.FAILED,
                    error=DeviceError(
                        f"fatal device error: {failure.error_type}: {failure.message}; "
                        "the worker restarts with a fresh device context"
                    ),
                )
            case FailureKind.ERROR:
                job.finish(
                    JobState.FAILED, error=JobFailed(f"generation failed: {failure.error_type}: {failure.message}")
                )
            case _:
                assert_never(failure.kind)

    def _end_stopped(self, job: Job) -> None:
        end_stopped(job, self._retry())

    def _running_jobs(self) -> list[Job]:
        """Jobs on a worker that have not ended: running, or denoised and still encoding."""
        return [job for slot in self._slots for job in (*slot.encoding, *slot.jobs) if not job.done]

    def _fail_queued(self, error: ShuttingDown) -> None:
        while (job := self._queue.pop()) is not None:
            job.schedule.cancel_reason = CancelReason.SHUTDOWN
            job.finish(JobState.FAILED, error=error)
        self._queue_changed.set()

    def _fail_running(self, message: str) -> None:
        """Under the lock, at the end of the grace: jobs still running fail now; their workers are told to stop."""
        for job in self._running_jobs():
            job.schedule.cancel_reason = CancelReason.SHUTDOWN
            job.finish(JobState.FAILED, error=ShuttingDown(message, headers=self._retry()))
        self._send_pending_cancels()

    def _on_death(self, slot: WorkerSlot) -> None:
        process = slot.process
        # With the forkserver the sentinel fires after the exit status is known; with spawn it can fire a moment
        # before waitpid can report it, so wait a little (bounded: this runs under the lock).
        process.join(timeout=0.2)
        exitcode = process.exitcode
        self._spawned.discard(process)
        # Oldest first: those it was encoding, then those it ran. Their PNGs died with it, so all are lost alike.
        lost = [*slot.encoding, *slot.jobs]
        slot.jobs.clear()
        slot.encoding.clear()
        self._forget_process(slot)
        slot.state = WorkerState.DEAD
        slot.ready_since = None
        if self._draining:
            log.info("worker %d (pid %s) exited during shutdown (code %s)", slot.index, slot.pid, exitcode)
            for job in lost:
                job.schedule.cancel_reason = CancelReason.SHUTDOWN
                self._end_stopped(job)
            self._job_left_worker.notify_all()
            return
        log.warning("worker %d (pid %s, %s) died with exit code %s", slot.index, slot.pid, slot.device, exitcode)
        if exitcode == EXIT_AFTER_OOM:
            slot.last_error = "restarted itself after repeated out-of-memory failures"
        elif exitcode == EXIT_DEVICE_FATAL:
            slot.last_error = slot.death_cause or "restarted itself after a fatal device error"
        else:
            slot.last_error = slot.death_cause or f"process exited with code {exitcode}"
        slot.death_cause = None
        # push_front puts each at the head of its priority: newest first, so the oldest ends up in front.
        for job in reversed(lost):
            if not job.done:
                self._recover_job(job, slot)
        if slot.refused is not None:
            self._give_up_on(slot)
            return
        self._schedule_respawn(slot)

    def _give_up_on(self, slot: WorkerSlot) -> None:
        """The worker refused to load for good (its memory plan does not fit): respawning would only reload the
        same tens of GB to be refused again."""
        slot.state = WorkerState.FAILED
        log.error("worker %d is not respawned: %s", slot.index, slot.refused)
        if all(other.state is WorkerState.FAILED for other in self._slots):
            reason = f"no worker can load the models: {self._refusals()}"
            if self.config.workers.on_budget_spent == "exit":
                log.critical("%s; the service exits (workers.on_budget_spent is exit)", reason)
                self._fatal = self._fatal or reason

    def _refusals(self) -> str:
        return "; ".join(f"worker {slot.index}: {slot.refused}" for slot in self._slots if slot.refused)

    def _recover_job(self, job: Job, slot: WorkerSlot) -> None:
        if job.schedule.cancel_reason is not None:
            self._end_stopped(job)
        elif job.schedule.attempts >= 2:
            log.error("job %s was running on two workers that both died; failing it", job.id)
            job.finish(
                JobState.FAILED,
                error=WorkerDied(
                    f"worker died while running this job (twice, on worker {slot.index} last); not retried again"
                ),
            )
        else:
            log.warning("re-queueing job %s at the head of priority %d", job.id, job.priority)
            self._queue.push_front(job, job.priority, job.schedule.deadline, job.schedule.group)
            job.mark_queued(self._queue.position(job), requeued_because=f"worker {slot.index} died")
            self._queue_changed.set()

    def _schedule_respawn(self, slot: WorkerSlot) -> None:
        cfg = self.config.workers
        if self._budget_left(slot) > 0:
            delay = min(cfg.restart_backoff_s * (2**slot.consecutive_failures), cfg.restart_backoff_max_s)
        elif cfg.on_budget_spent == "exit":
            reason = (
                f"worker {slot.index} spent its restart budget ({cfg.max_restarts} restarts in "
                f"{cfg.restart_window_s:g} s; last error: {slot.last_error}) and workers.on_budget_spent is exit"
            )
            log.critical("%s: the service exits so that its supervisor can replace it", reason)
            self._fatal = self._fatal or reason
            return
        else:
            delay = cfg.restart_backoff_max_s
            log.error(
                "worker %d spent its restart budget (%d in %g s); retrying every %g s (last error: %s)",
                slot.index,
                cfg.max_restarts,
                cfg.restart_window_s,
                delay,
                slot.last_error,
            )
        slot.consecutive_failures += 1
        slot.respawn_at = time.monotonic() + delay
        log.info("worker %d respawns in %.2f s", slot.index, delay)

    def _slots_due_to_spawn(self) -> list[WorkerSlot]:
        """Slots whose (re)spawn is due, at most workers.parallel_loads loading at once; marked STARTING here."""
        if self._draining:
            return []
        now = time.monotonic()
        limit = self.config.workers.parallel_loads or len(self._slots)
        loading = sum(slot.state is WorkerState.STARTING for slot in self._slots)
        due: list[WorkerSlot] = []
        for slot in self._slots:
            if loading >= limit:
                break
            if slot.respawn_at is None or slot.respawn_at > now or slot.state is not WorkerState.DEAD:
                continue
            slot.respawn_at = None
            if slot.spawned_once:
                slot.restarts += 1
                slot.restart_times.append(now)
                while slot.restart_times and now - slot.restart_times[0] > self.config.workers.restart_window_s:
                    slot.restart_times.popleft()
            slot.spawned_once = True
            slot.state = WorkerState.STARTING
            slot.spawned_at = slot.last_heartbeat = now
            loading += 1
            due.append(slot)
        return due

    def _kill_slow_starters(self) -> None:
        limit = self.config.workers.ready_timeout_s
        now = time.monotonic()
        for slot in self._slots:
            starting = slot.state is WorkerState.STARTING and slot.process is not None
            if starting and slot.spawned_at is not None and now - slot.spawned_at > limit:
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
                    cause = f"hung ({what}); killed"
                    if slot.death_cause != cause:  # a turn before the kill is reaped sees the same hang again
                        slot.hangs += 1
                    slot.death_cause = cause
                    log.error("worker %d (pid %s) is hung: %s; killing it", slot.index, slot.pid, what)
                    slot.process.kill()  # the sentinel reports the death; its job is handled as for any death
                    break

    def _expire_deadlines(self) -> None:
        """Jobs past their deadline: out of the queue now (O(log n) each), or stopped at the running job's next step."""
        now = time.monotonic()
        expired = self._queue.pop_expired(now)
        for job in expired:
            expire_in_queue(job)
        if expired:
            self._queue_changed.set()
        for slot in self._slots:
            for running in slot.jobs:
                if running.schedule.cancel_reason is None and running.schedule.deadline <= now:
                    running.schedule.cancel_reason = CancelReason.TIMEOUT  # _send_pending_cancels tells the worker

    def _send_pending_cancels(self) -> None:
        for slot in self._slots:
            for job in slot.jobs:
                if job.schedule.cancel_reason is not None and not job.schedule.cancel_sent:
                    job.schedule.cancel_sent = True
                    self._outgoing.append((slot, CancelJob(job_id=job.id)))

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers, lowest slot first, until one runs out.

        The images of one request (a group) spread over the idle workers first, one each; what is left is batched,
        evenly over those workers (see _batch_size), instead of waiting in the queue for a worker to come free."""
        if self._draining:
            return
        idle = [slot for slot in self._slots if slot.state is WorkerState.READY]
        dispatched = False
        while idle and (job := self._queue.pop()) is not None:
            slot = self._warmest(job, idle)
            idle.remove(slot)
            group = job.schedule.group
            extra = self._batch_size(job, len(idle) + 1) - 1
            batch = [job, *self._queue.take_group(group, extra)] if group is not None and extra > 0 else [job]
            self._hand_over(slot, batch)
            dispatched = True
        if dispatched:
            self._queue_changed.set()

    def _warmest(self, job: Job, idle: list[WorkerSlot]) -> WorkerSlot:
        """The idle worker that already holds most of ``job``'s LoRA adapters; among equals the one holding fewest
        adapters (loading there unloads nobody else's), then the lowest slot. A job without LoRAs takes the lowest
        idle slot. Affinity saves loads; it never keeps a job waiting while any worker is idle."""
        needed = {adapter_key(job.request.mode, lora) for lora in job.request.loras}
        if not needed:
            return idle[0]

        def held(slot: WorkerSlot) -> int:
            return len(needed.intersection(slot.adapters.held)) if slot.adapters else 0

        def others(slot: WorkerSlot) -> int:
            return len(slot.adapters.held) if slot.adapters else 0

        chosen = min(idle, key=lambda slot: (-held(slot), others(slot), slot.index))
        self._adapter_loads_avoided += held(chosen) - held(idle[0])
        return chosen

    def _batch_size(self, job: Job, idle_workers: int) -> int:
        """How many images of ``job``'s group one worker takes now: its share when the group's images are spread
        evenly over the idle workers (so they all finish together; one worker running all that are left would
        finish last), at most performance.max_batch, no more pixels than performance.batch_pixels (past it a
        batch no longer pays) and never more than one limits.max_size² image, the largest activations the memory
        plan reserves for."""
        if job.schedule.group is None:
            return 1
        waiting = 1 + self._queue.group_size(job.schedule.group)
        share = math.ceil(waiting / idle_workers)
        performance = self.config.performance
        pixels = min(self.config.limits.max_size**2, performance.batch_pixels)
        fits = max(1, pixels // (job.request.width * job.request.height))
        return min(share, performance.max_batch, fits)

    def _hand_over(self, slot: WorkerSlot, batch: list[Job]) -> None:
        for job in batch:
            job.schedule.attempts += 1
            job.schedule.cancel_sent = False
            job.mark_dispatched(slot.index, slot.device)
        slot.jobs, slot.state = batch, WorkerState.BUSY
        slot.last_progress = time.monotonic()
        slot.steps_seen, slot.slowest_step_s = 0, 0.0
        requests = tuple(job.request for job in batch)
        if len(batch) > 1:
            log.info("worker %d runs %d images of one request as a batch", slot.index, len(batch))
        # If the worker died meanwhile the send fails quietly; its sentinel fires and _on_death re-queues.
        self._outgoing.append((slot, requests[0] if len(requests) == 1 else JobBatch(jobs=requests)))

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines: list[float] = []
        for slot in self._slots:
            if slot.respawn_at is not None:
                deadlines.append(slot.respawn_at)
            if slot.state is WorkerState.STARTING and slot.spawned_at is not None:
                deadlines.append(slot.spawned_at + self.config.workers.ready_timeout_s + 0.01)
            deadlines.extend(deadline + 0.01 for deadline, _ in self._hang_deadlines(slot))
            deadlines.extend(job.schedule.deadline for job in slot.jobs if job.schedule.cancel_reason is None)
        queued = self._queue.next_deadline()
        if queued is not None:
            deadlines.append(queued)
        deadlines = [deadline for deadline in deadlines if deadline != float("inf")]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # --- process plumbing ------------------------------------------------------------------------------------

    def _spawn(self, slot: WorkerSlot) -> None:
        """Start the slot's process (monitor thread, without the lock held) and attach it under the lock."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=self._target,
            args=(self._spec(slot), child_conn),
            name=f"genserve-worker-{slot.index}",
            # Daemon or not, multiprocessing's exit hook joins it, and a loaded worker ignores SIGTERM: the atexit
            # hook registered in start() kills what is left first, so a forced exit never hangs on a worker.
            daemon=True,
        )
        try:
            process.start()
        except Exception as exc:  # e.g. the forkserver could not start: a death like any other
            log.exception("worker %d could not be started", slot.index)
            parent_conn.close()
            child_conn.close()
            with self._lock:
                slot.state = WorkerState.DEAD
                slot.last_error = f"could not start a process: {type(exc).__name__}: {exc}"
                if not self._draining:
                    self._schedule_respawn(slot)
                self._publish()
            return
        child_conn.close()  # the child holds its own copy; ours would hide EOF
        with self._lock:
            if self._draining:  # shutdown began while this process was starting: it must not outlive us
                log.info("worker %d started during shutdown; stopping it", slot.index)
                process.kill()
                process.join(timeout=5)
                parent_conn.close()
                slot.state = WorkerState.DEAD
                self._publish()
                return
            self._spawned.add(process)
            slot.process, slot.conn, slot.pid = process, parent_conn, process.pid
            slot.sender = _Sender(parent_conn, slot.index)
            slot.spawned_at = slot.last_heartbeat = time.monotonic()
            self._publish()
        log.info("worker %d spawned on %s (pid %d)", slot.index, slot.device, process.pid)
        self._wake()  # the monitor must start waiting on the new pipe and sentinel

    def _spec(self, slot: WorkerSlot) -> WorkerSpec:
        cfg = self.config
        embedded = cfg.uses_embedded_model
        return WorkerSpec(
            slot=slot.index,
            api_pid=os.getpid(),
            device=slot.device,
            model_path=str(expand_path(cfg.model.path)) if cfg.model.path else "",
            fill_path=str(expand_path(cfg.fill.path)) if cfg.fill.path else "",
            controlnet_path=str(expand_path(cfg.controlnet.path)) if cfg.controlnet.path else "",
            redux_path=str(expand_path(cfg.redux.path)) if cfg.redux.path else "",
            embedded_cache_dir=str(expand_path(cfg.model.embedded_cache_dir)) if embedded else "",
            modes=self.enabled_modes,
            dtype=cfg.model.dtype,
            memory=cfg.memory_settings(),
            performance=cfg.performance_settings(),
            loras=cfg.lora_settings(),
            cpu_threads=self._cpu_threads if slot.device == "cpu" else 0,
            heartbeat_interval_s=cfg.workers.heartbeat_interval_s,
            max_consecutive_oom=cfg.workers.max_consecutive_oom,
            log_level=cfg.server.log_level,
            log_format=cfg.server.log_format,
        )

    def _threads_per_cpu_worker(self, devices: list[str]) -> int:
        if self.config.workers.cpu_threads:
            return self.config.workers.cpu_threads
        cpu_workers = sum(device == "cpu" for device in devices) or 1
        return max(1, (os.cpu_count() or 1) // cpu_workers)

    def _forget_process(self, slot: WorkerSlot) -> None:
        """The slot's process is gone: stop reading its pipe here; its sender closes the pipe after its queue."""
        if slot.sender is not None:
            slot.sender.close()
        slot.sender = None
        slot.conn = None
        slot.process = None
        slot.adapters = None  # its adapters died with it; a new process starts with none

    def _wake(self) -> None:
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._wake_writer.send_bytes(b"!")
        except OSError:
            pass


def end_stopped(job: Job, retry_headers: dict[str, str]) -> None:
    """End a job that stopped because someone asked: canceled, or failed when a deadline or shutdown stopped it."""
    reason = job.schedule.cancel_reason
    match reason:
        case CancelReason.TIMEOUT:
            error: JobTimeout | ShuttingDown | JobCanceled = JobTimeout(
                f"job ran past its deadline of {job.schedule.timeout_s:g} s ({_DEADLINE_SOURCE}) and was stopped"
            )
            job.finish(JobState.FAILED, error=error)
        case CancelReason.SHUTDOWN:
            job.finish(JobState.FAILED, error=ShuttingDown("service shutting down", headers=retry_headers))
        case None:
            job.finish(JobState.CANCELED, error=JobCanceled("job was canceled (by request)"))
        case _:
            job.finish(JobState.CANCELED, error=JobCanceled(f"job was canceled ({reason.value})"))


def expire_in_queue(job: Job) -> None:
    """End a job whose deadline passed before any worker took it."""
    job.schedule.cancel_reason = CancelReason.TIMEOUT
    job.finish(
        JobState.FAILED,
        error=JobTimeout(
            f"job waited past its deadline of {job.schedule.timeout_s:g} s ({_DEADLINE_SOURCE}) in the queue"
        ),
    )


def _adapters_view(adapters: AdaptersChanged | None) -> dict[str, Any]:
    """A worker's LoRA adapters as /status shows them."""
    if adapters is None:
        return {"held": [], "loads": 0, "unloads": 0, "adapter_mib": 0.0}
    return {
        "held": list(adapters.held),
        "loads": adapters.loads,
        "unloads": adapters.unloads,
        "adapter_mib": round(adapters.adapter_bytes / 2**20, 3),
    }


def _worker_context(start_method: str) -> Any:
    """The multiprocessing context workers start from.

    forkserver: a server process imports genserve.forkserver.PRELOAD_MODULES once; each worker is a fork of it, so
    a respawn skips importing torch, diffusers and transformers. It never touches CUDA, so each worker still
    initialises CUDA itself, as with spawn. spawn: a fresh interpreter per worker (slower; for platforms without
    fork)."""
    ctx = torch_mp.get_context(start_method)
    if start_method == "forkserver":
        forkserver.configure()
    return ctx


def _default_worker_target() -> WorkerTarget:
    # Imported here so the API process does not import the worker's heavy modules at start.
    from workers.main import run_worker

    return run_worker
