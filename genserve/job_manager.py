"""Jobs as the routes see them: submit, look up, cancel, list — the one owner of a job's life in the API process.

Every job, synchronous (POST /generate) or not (POST /jobs), goes through ``submit``: its input pixels are written
to its input folder, its record is inserted, and the supervisor queues it. From then on the supervisor moves the
job; a listener here turns each state change into a write for the persistence writer (no I/O in the emitting
thread). A job stays in ``_live`` until its final record is committed; after that the store answers for it, so a
reader never sees a finished job as anything older. The supervisor knows nothing of this class (no cycle): queue
positions are published by a thread of ours (``genserve-positions``) that waits for the supervisor's signal.

Locks, and the one order they may nest in (each is held briefly, and never across I/O):
1. ``Supervisor._lock`` — the queue, the slots, every job's Schedule.
2. ``Job._lock`` — one job's visible state and its subscribers; its listeners only enqueue.
3. ``JobManager._lock`` — the ``_live`` map only; nothing else is taken while it is held.
   ``WebhookDispatcher._cond`` (genserve.webhooks) is at this level too: its listener takes it under a job's lock to
   enqueue a delivery, and nothing else is taken while it is held.
A thread holding a later lock never takes an earlier one. SQLite has no Python lock at all (see genserve.store).
"""

from __future__ import annotations

import builtins
import logging
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from genserve import logs
from genserve.auth import ANYONE, Caller
from genserve.cluster.mirror import mirror_of_record
from genserve.config import Config
from genserve.errors import AlreadyEnded, GenServeError, NotFound, TooManyRequests
from genserve.jobs import Job, JobEvent, JobListener, JobState, result_json
from genserve.messages import CancelReason
from genserve.persistence import PersistenceWriter
from genserve.pool import JobPool
from genserve.prepare import PreparedJob
from genserve.store import JobRecord, JobStore
from genserve.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)


class JobManager:
    def __init__(self, config: Config, store: JobStore, supervisor: JobPool, *, cluster: Adopter | None = None) -> None:
        """``cluster``: on an API node of a cluster (genserve.cluster), the dispatcher that mirrors jobs. The nodes
        that run the jobs write their records then; this manager only inserts them, and mirrors a job submitted
        through another API node when a client asks about it here."""
        self.config = config
        self.cluster = cluster
        self.store = store
        self.supervisor = supervisor
        self.writer = PersistenceWriter(store)
        self.webhooks = WebhookDispatcher(config, self.writer)  # delivers on its own threads, fed by a listener
        self._live: dict[str, Job] = {}
        self._lock = threading.Lock()  # guards _live only
        self.listeners: list[JobListener] = []  # more listeners every job gets (the metrics): they only count
        self._running = False
        self._positions = threading.Thread(target=self._publish_positions, name="genserve-positions", daemon=True)

    def start(self) -> None:
        self.writer.start()
        self.webhooks.start()
        self._running = True
        self._positions.start()

    def stop(self) -> None:
        """After the supervisor has shut down: write every pending record change, then stop the threads."""
        self._running = False
        self.webhooks.stop()  # a last try of pending terminal events; it writes outcomes, so before the writer
        self.writer.stop()

    # --- submission ----------------------------------------------------------------------------------------------

    def submit(
        self,
        prepared: PreparedJob,
        *,
        owner: str | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Job:
        """Record and queue a prepared job within ``timeout_s``; see submit_all."""
        return self.submit_all([prepared], owner=owner, request_id=request_id, timeout_s=timeout_s)[0]

    def submit_all(
        self,
        batch: list[PreparedJob],
        *,
        owner: str | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> list[Job]:
        """Record and queue the jobs of one request (the images of n > 1), all or none. Raises TooManyRequests
        (per-key cap, full queue), NotReady or ShuttingDown; nothing is kept then.

        ``owner`` (the API key's name) owns the jobs: only it and admin keys see them. ``request_id`` is stored on
        each job and travels to its worker, whose log lines for the job carry it.

        Blocking (writes input files and the records): call it from the thread pool, not the event loop.
        """
        timeout_s = self.config.queue.task_timeout_s if timeout_s is None else timeout_s
        jobs = [
            Job.create(
                prepared.request,
                prepared.priority,
                timeout_s,
                group=prepared.group,
                model_id=prepared.model_id,
                params={**prepared.params, "timeout_s": timeout_s},
                owner=owner,
                request_id=request_id,
            )
            for prepared in batch
        ]
        recorded = self._recorded_in_flight(owner)  # before the lock: a store read
        with self._lock:  # the quota check and the reservation are one step, or two requests could both pass
            in_flight = self._jobs_in_flight(owner, adding=len(jobs), recorded=recorded)
            if not in_flight.over:
                self._live.update((job.id, job) for job in jobs)
        if in_flight.over:
            raise TooManyRequests(
                f"API key '{owner}' has {in_flight.count} jobs queued or running, and its limit "
                f"(auth.max_jobs_per_key) leaves no room for {len(jobs)} more",
                headers={"Retry-After": str(self.supervisor.retry_after_s())},
                code="key_quota_exceeded",
            )
        try:
            for job, prepared in zip(jobs, batch, strict=True):
                self._record(job, prepared)
            self.supervisor.submit_all(jobs)
        except BaseException:
            for job in jobs:
                self._withdraw(job.id)
            raise
        with logs.job_context((job.id, request_id or "") for job in jobs):
            log.info("queued %s (key %s)", ", ".join(f"{job.request.mode} job {job.id}" for job in jobs), owner or "-")
        return jobs

    def _withdraw(self, job_id: str) -> None:
        """Undo a submission that failed: nothing of the job may stay, even if its record cannot be deleted now
        (a cluster's Redis went down: the record then stays queued, and no node will ever claim it)."""
        with self._lock:
            self._live.pop(job_id, None)
        self.store.remove_inputs(job_id)
        self.webhooks.unwatch(job_id)
        try:
            self.store.delete(job_id)
        except GenServeError as error:
            log.error("job %s was refused, but its record could not be deleted: %s", job_id, error)

    def _record(self, job: Job, prepared: PreparedJob) -> None:
        """Write the job's input files and its record; its request now names the files and the output path."""
        files = self.store.write_inputs(job.id, prepared.images)
        job.request = replace(
            prepared.request,
            request_id=job.request_id or "",
            output_path=str(self.store.image_path(job.id)),
            input_image=files.get("input_image"),
            mask_image=files.get("mask_image"),
            control_image=files.get("control_image"),
        )
        record = record_of(job)
        if prepared.webhook is not None:
            record = replace(record, webhook=prepared.webhook.initial_view())
        self.store.insert(record)
        job.add_listener(self._on_event)
        if prepared.webhook is not None:  # after the record's listener, so the terminal columns are written first
            self.webhooks.watch(job, prepared.webhook)
        for listener in self.listeners:
            job.add_listener(listener)

    def _jobs_in_flight(self, owner: str | None, adding: int, recorded: int = 0) -> _Quota:
        """Under self._lock: how many live jobs ``owner`` has (or, in a cluster, the ``recorded`` count across every
        API node when that is more), and whether ``adding`` more would pass its limit."""
        cap = self.config.auth.max_jobs_per_key
        if not cap or owner is None:
            return _Quota(0, False)
        count = max(recorded, sum(1 for job in self._live.values() if job.owner == owner and not job.done))
        return _Quota(count, count + adding > cap)

    def _recorded_in_flight(self, owner: str | None) -> int:
        """In a cluster: ``owner``'s queued and running jobs as the shared records count them, whichever API node
        took them (two nodes admitting at the same instant may still both pass: the cap is exact per node)."""
        if self.cluster is None or owner is None or not self.config.auth.max_jobs_per_key:
            return 0
        return sum(self.store.list(status, 1, 0, owner=owner)[1] for status in UNFINISHED)

    def _on_event(self, job: Job, event: JobEvent) -> None:
        """Listener (any thread, job lock held): hand the record change to the writer; progress is not stored."""
        if self.cluster is not None:  # the node that decided the change wrote the record already
            if event.is_terminal:  # through the writer: after the webhook outcomes queued before it
                self.writer.write(job.id, {}, after_commit=lambda: self._forget(job.id))
            return
        if event.kind == "started":
            self.writer.write(
                job.id,
                {
                    "status": JobState.RUNNING.value,
                    "started_at": job.started_at,
                    "worker_slot": job.worker_slot,
                    "device": job.device,
                },
            )
        elif event.kind == "queued" and event.data.get("requeued_because"):
            self.writer.write(
                job.id, {"status": JobState.QUEUED.value, "started_at": None, "worker_slot": None, "device": None}
            )
        elif event.is_terminal:
            self.writer.write(job.id, terminal_columns(job), after_commit=lambda: self._forget(job.id))

    def _forget(self, job_id: str) -> None:
        """Writer thread, after the final record is committed: the store answers for the job from now on."""
        with self._lock:
            self._live.pop(job_id, None)
        self.store.remove_inputs(job_id)

    # --- queue positions -----------------------------------------------------------------------------------------

    def _publish_positions(self) -> None:
        """Thread: when the queue's order changes, queued jobs that someone watches publish their new place.

        Each lookup takes the supervisor's lock for O(log n); the events go out with no lock but the job's."""
        while self._running:
            if not self.supervisor.wait_for_queue_change(timeout=1.0):
                continue
            for job in self.live_jobs():
                if job.state is JobState.QUEUED and job.watched:
                    position = self.supervisor.queue_position(job)
                    if position is not None:
                        job.mark_queued(position)

    # --- queries -------------------------------------------------------------------------------------------------

    def live(self, job_id: str) -> Job | None:
        with self._lock:
            return self._live.get(job_id)

    def live_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._live.values())

    def find(self, job_id: str, caller: Caller = ANYONE) -> Job | JobRecord:
        """The live job, else its record; NotFound when neither exists, or when it is another key's job and
        ``caller`` is not an admin (the same answer: a tenant cannot learn that someone else's id exists).
        Blocking (SQLite): thread pool."""
        found: Job | JobRecord | None = self.live(job_id)
        if found is None:
            found = self.store.get(job_id)
            if found is not None and self.cluster is not None and found.status in UNFINISHED:
                found = self._mirror(found)
        if found is None or not caller.sees(found.owner):
            raise NotFound(f"no job with id {job_id!r}")
        return found

    def _mirror(self, record: JobRecord) -> Job | JobRecord:
        """A live mirror of an unfinished job submitted through another API node of the cluster, so it can be
        followed, waited on and cancelled here too. Its events are followed from the newest one before the record
        is read again: every later event is applied, every earlier one is in the record."""
        assert self.cluster is not None
        with self._lock:
            known = self._live.get(record.id)
        if known is not None:
            return known
        after = self.cluster.last_event_id(record.id)
        fresh = self.store.get(record.id)
        if fresh is None or fresh.status not in UNFINISHED:
            return fresh or record
        job = mirror_of_record(fresh)
        with self._lock:
            if record.id in self._live:
                return self._live[record.id]
            self._live[record.id] = job
        job.add_listener(self._on_event)
        for listener in self.listeners:
            job.add_listener(listener)
        self.cluster.adopt(job, after)
        return job

    def view(self, job_id: str, caller: Caller = ANYONE) -> dict[str, Any]:
        found = self.find(job_id, caller)
        return self.job_view(found) if isinstance(found, Job) else record_view(found)

    def job_view(self, job: Job) -> dict[str, Any]:
        # The position first: it takes the supervisor's lock, which must never be taken while holding a job's.
        position = self.supervisor.queue_position(job)
        view = record_view(record_of(job))
        if job.state is JobState.QUEUED:
            view["queue_position"] = position
        elif job.state is JobState.RUNNING:
            view["progress"] = job.progress_data()
            view["attempts"] = job.schedule.attempts
        view["webhook"] = self.webhooks.view(job.id) or view["webhook"]  # the newest: the store's lags a little
        return view

    def list(self, status: str | None, limit: int, offset: int, caller: Caller = ANYONE) -> dict[str, Any]:
        """Jobs newest first: every job for an admin (or with keys off), else only the caller's."""
        records, total = self.store.list(status, limit, offset, owner=caller.only_owner)
        jobs = []
        for record in records:
            job = self.live(record.id)
            jobs.append(self.job_view(job) if job is not None else record_view(record))
        return {"jobs": jobs, "total": total, "limit": limit, "offset": offset}

    def queue_listing(self, caller: Caller = ANYONE) -> dict[str, builtins.list[dict[str, Any]]]:
        """GET /queue: running jobs, then waiting ones with their place in line. Places count every job ahead,
        whoever owns it; a tenant is shown only its own jobs. Blocking (store reads): thread pool."""
        running: builtins.list[tuple[JobRecord, Job | None]]
        if self.cluster is None:
            running = [(record_of(job), job) for job in self.live_jobs() if job.state is JobState.RUNNING]
        else:  # the jobs of every node
            records, _ = self.store.list(JobState.RUNNING.value, MAX_LISTED, 0)
            running = [(record, self.live(record.id)) for record in records]
        pending = []
        for position, job_id in enumerate(self.supervisor.queued_ids()[:MAX_LISTED]):
            job = self.live(job_id)
            record = record_of(job) if job is not None else self.store.get(job_id)
            if record is not None and caller.sees(record.owner):
                pending.append(
                    {
                        "task_id": record.id,
                        "mode": record.mode,
                        "priority": record.priority,
                        "queue_position": position,
                        "submitted_at": record.submitted_at,
                    }
                )
        return {
            "queue_running": [_running_entry(record, job) for record, job in running if caller.sees(record.owner)],
            "queue_pending": pending,
        }

    # --- cancellation --------------------------------------------------------------------------------------------

    def cancel(self, job_id: str, reason: CancelReason = CancelReason.CLIENT, caller: Caller = ANYONE) -> Job:
        """Ask a live job to stop; a finished or unknown one is an error (409 / 404), and so is another key's job
        for a caller without admin (404, as unknown). Blocking: thread pool."""
        job = self.live(job_id)
        if job is None and self.cluster is not None:
            found = self.find(job_id, caller)  # mirrors a job another API node submitted
            job = found if isinstance(found, Job) else None
        if job is None or job.done or not caller.sees(job.owner):
            found = self.find(job_id, caller)  # NotFound for an unknown id, or one the caller may not see
            status = found.state.value if isinstance(found, Job) else found.status
            raise AlreadyEnded(f"job {job_id} already ended ({status}); nothing to cancel")
        self.supervisor.cancel(job, reason)
        return job


UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)
MAX_LISTED = 1000  # jobs GET /queue lists of each kind (the queue's default cap)


def _running_entry(record: JobRecord, job: Job | None) -> dict[str, Any]:
    entry = {
        "task_id": record.id,
        "mode": record.mode,
        "priority": record.priority,
        "worker": record.worker_slot,
        "device": record.device,
        "started_at": record.started_at,
        "progress": job.progress_data() if job is not None else None,
    }
    if record.node is not None:
        entry["node"] = record.node
    return entry


class Adopter(Protocol):
    """What the job manager asks of a cluster's dispatcher to mirror a job submitted elsewhere."""

    def last_event_id(self, job_id: str) -> str: ...

    def adopt(self, job: Job, after: str) -> None: ...


@dataclass(frozen=True)
class _Quota:
    count: int
    over: bool


def terminal_columns(job: Job) -> dict[str, Any]:
    columns: dict[str, Any] = {"status": job.state.value, "finished_at": job.finished_at}
    if job.result is not None:
        columns.update(
            image_bytes=job.result.image_bytes, seed=job.result.seed, width=job.result.width, height=job.result.height
        )
    if job.error is not None:
        columns.update(error_type=job.error.error_type, error_message=job.error.message)
    if job.cancel_reason is not None:
        columns["cancel_reason"] = job.cancel_reason.value
    return columns


def record_of(job: Job) -> JobRecord:
    """A live job as the store would hold it."""
    request = job.request
    record = JobRecord(
        id=job.id,
        status=job.state.value,
        mode=request.mode,
        model_id=job.model_id,
        priority=job.priority,
        params=job.params,
        submitted_at=job.submitted_at,
        started_at=job.started_at,
        worker_slot=job.worker_slot,
        device=job.device,
        seed=request.seed,
        width=request.width,
        height=request.height,
        owner=job.owner,
        request_id=job.request_id,
        node=job.node,
    )
    if job.done:
        record = JobRecord(**{**asdict(record), **terminal_columns(job)})
    return record


def record_view(record: JobRecord) -> dict[str, Any]:
    """The public JSON of a job (GET /jobs/{id}, lists, history)."""
    view: dict[str, Any] = {
        "task_id": record.id,
        "status": record.status,
        "mode": record.mode,
        "model_id": record.model_id,
        "priority": record.priority,
        "params": record.params,
        "worker": record.worker_slot,
        "device": record.device,
        "submitted_at": record.submitted_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "queue_position": None,
        "progress": None,
        "result": None,
        "error": None,
        "cancel_reason": record.cancel_reason,
        "webhook": record.webhook,  # url, events and each delivery's outcome (genserve.webhooks); never the secret
        "owner": record.owner,
        "request_id": record.request_id,
    }
    if record.node is not None:  # a cluster's: the node its worker belongs to
        view["node"] = record.node
    if record.started_at and record.finished_at:
        view["execution_time"] = round(record.finished_at - record.started_at, 4)
    if record.status == JobState.COMPLETED.value:
        view["progress"] = {"percent": 100.0}
        view["result"] = result_json(record.id, record.seed, record.width, record.height, record.image_bytes)
        view["result_url"] = f"/image/{record.id}"
    if record.error_type:
        view["error"] = {"type": record.error_type, "message": record.error_message}
    return view
