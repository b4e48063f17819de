"""How a job's life is written down in a cluster: its record (``RedisJobRecords``) first, then its event
(``RedisJobEvents``), so that whoever sees an event finds a record at least as new.

Whoever decides a change writes it: the worker node for what its workers do (started, requeued after a local
worker died, ended), the API node for what ends a job before any node took it (cancelled or timed out in the
queue), and any node's ``Janitor`` for jobs whose node vanished (lease expired). Every call is blocking and may
raise ``QueueUnavailable``; callers on a node that must not lose the write retry it (genserve.cluster.node).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from genserve.cluster.redis_queue import QueueUnavailable, RedisJobQueue
from genserve.cluster.redis_records import RedisJobEvents, RedisJobRecords
from genserve.job_manager import terminal_columns
from genserve.jobs import Job, JobEvent, JobState
from genserve.messages import CancelReason

log = logging.getLogger(__name__)

LOST_NODE = "its node stopped renewing the lease (the node died, hung or lost Redis)"


class Ledger:
    def __init__(self, records: RedisJobRecords, events: RedisJobEvents, node_id: str) -> None:
        self.records = records
        self.events = events
        self.node_id = node_id

    def record(self, job_id: str, columns: Mapping[str, Any], kind: str, data: Mapping[str, Any]) -> None:
        """One change: the record's columns, then the event everyone following the job sees."""
        if columns:
            self.records.apply([(job_id, columns)])
        self.events.publish(job_id, kind, data)

    def publish(self, event: JobEvent) -> None:
        """An event with no record change (progress)."""
        self.events.publish(event.job_id, event.kind, event.data, at=event.at)

    def started(self, job: Job, event: JobEvent) -> None:
        columns = {
            "status": JobState.RUNNING.value,
            "started_at": job.started_at,
            "worker_slot": job.worker_slot,
            "device": job.device,
            "node": job.node,
        }
        self.record(job.id, columns, event.kind, event.data)

    def requeued(self, job_id: str, because: str) -> None:
        columns = {"status": JobState.QUEUED.value, "started_at": None, "worker_slot": None, "device": None}
        data = {"task_id": job_id, "status": "queued", "queue_position": None, "requeued_because": because}
        self.record(job_id, {**columns, "node": None}, "queued", data)

    def ended(self, job: Job) -> None:
        """A job this node ended (its Job holds the outcome)."""
        terminal = job.snapshot_events()[-1]  # a finished job's snapshot is its terminal event
        self.record(job.id, {**terminal_columns(job), "node": job.node}, terminal.kind, terminal.data)

    def ended_without_job(self, job_id: str, state: JobState, error_type: str, message: str, reason: str) -> None:
        """A job that ended with no live Job anywhere (a reaped lease): written from what is known."""
        columns: dict[str, Any] = {
            "status": state.value,
            "finished_at": time.time(),
            "error_type": error_type,
            "error_message": message,
        }
        data: dict[str, Any] = {
            "task_id": job_id,
            "status": state.value,
            "error": {"type": error_type, "message": message},
        }
        if state is JobState.CANCELED:
            columns["cancel_reason"] = data["cancel_reason"] = reason
        self.record(job_id, columns, state.value, data)


class Janitor:
    """A thread in every node: every lease_s / 2, expired leases are reaped (``RedisJobQueue.reap_expired``) and
    what happened to each job is written down. Every node runs one, so a cluster finds a dead node as long as any
    node lives; each expired lease is handled by exactly one of them.

    A lease is only evidence of a dead node if its node could have renewed it. While Redis is unreachable (or being
    restarted) no node can, so every lease runs out at once; reaping them when Redis is back would stop every
    running job and run it again, and re-run jobs that ended meanwhile and wait to be reported. So the janitor
    reaps only once Redis has answered it for a whole lease_s — since its start, and again after each failed call:
    the live nodes renew their leases within that time (every lease_s / 3), and what is still expired then is
    dead. An outage long enough to expire a lease (over 2/3 of lease_s between renewals) outlasts the janitor's
    interval, so every janitor sees it."""

    def __init__(self, queue: RedisJobQueue, ledger: Ledger, lease_s: float) -> None:
        self._queue = queue
        self._ledger = ledger
        self._lease_s = lease_s
        self._interval = lease_s / 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genserve-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        reap_from: float | None = None  # monotonic; None until Redis answers (at the start, after an outage)
        while not self._stop.wait(self._interval):
            try:
                if reap_from is None:
                    self._queue.ping()
                    reap_from = time.monotonic() + self._lease_s  # the live nodes renew their leases meanwhile
                if time.monotonic() >= reap_from:
                    self.reap_once()
            except QueueUnavailable as error:
                if reap_from is not None:
                    log.info("janitor: %s; reaping resumes a lease (%g s) after Redis is back", error, self._lease_s)
                reap_from = None
            except Exception:
                log.exception("janitor: reaping failed; trying again")

    def reap_once(self) -> None:
        reaped = self._queue.reap_expired()
        for job_id in reaped.requeued:
            self._ledger.requeued(job_id, LOST_NODE)
        for job_id in reaped.failed:
            message = f"{LOST_NODE}, for the second time; not retried again"
            self._ledger.ended_without_job(job_id, JobState.FAILED, "worker_died", message, "")
        for job_id in reaped.canceled:
            message = "job was canceled (client); its node vanished before it stopped"
            self._ledger.ended_without_job(job_id, JobState.CANCELED, "canceled", message, CancelReason.CLIENT.value)
