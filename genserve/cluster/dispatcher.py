"""The API node's side of the cluster: what the supervisor is on one machine, with the pool spread over nodes.

``ClusterDispatcher`` answers the job manager and the routes with the supervisor's methods (``genserve.pool``), so
everything above it — the job manager, sync waits, SSE, webhooks, metrics, every route — runs unchanged:
- ``submit_all`` packs each job (genserve.cluster.payload) into the Redis queue, where the first idle worker of any
  node claims it, and keeps a mirror of it (genserve.cluster.mirror) moved by the job's events;
- ``cancel`` takes a waiting job out of the queue, or asks the node running it to stop it (pub/sub); it is called
  from the event loop, so the Redis work is done by the ``genserve-cancels`` thread;
- deadlines of jobs still waiting are enforced here (``genserve-deadlines``), those of running ones by their node;
- ``status()`` is the pool of every live node (genserve.cluster.directory), refreshed by a thread
  (``genserve-cluster-status``) so that /status, /ready and /models never wait on Redis on the event loop, and say
  plainly when Redis cannot be reached.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from genserve.cluster.directory import NodeDirectory, NodeReport
from genserve.cluster.ledger import Ledger
from genserve.cluster.mirror import EventFollower
from genserve.cluster.payload import pack
from genserve.cluster.redis_queue import QueueItem, QueueUnavailable, RedisJobQueue, retry_backoff
from genserve.config import Config
from genserve.errors import NotReady, ShuttingDown
from genserve.jobs import Job, JobState
from genserve.messages import CancelReason
from genserve.supervisor import end_stopped, expire_in_queue

log = logging.getLogger(__name__)

CANCEL_RETRY_S = 60.0  # how long a cancel is retried while Redis is unreachable before it is given up
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class _Cancel:
    job: Job
    reason: CancelReason
    queued_only: bool


@dataclass(frozen=True)
class ClusterSnapshot:
    status: dict[str, Any]
    ready_workers: int
    total_workers: int
    reason: str | None
    can_take_jobs: bool


class ClusterDispatcher:
    def __init__(
        self,
        config: Config,
        queue_: RedisJobQueue,
        ledger: Ledger,
        follower: EventFollower,
        directory: NodeDirectory,
        node_id: str,
    ) -> None:
        self.config = config
        self._queue = queue_
        self._ledger = ledger
        self._follower = follower
        self._directory = directory
        self.node_id = node_id
        self._accepting = True
        self._stop = threading.Event()
        self._started_at = time.time()
        self._cancels: queue.SimpleQueue[_Cancel | None] = queue.SimpleQueue()
        self._deadlines: list[tuple[float, int, Job]] = []
        self._deadline_order = itertools.count()
        self._deadline_cond = threading.Condition()
        self._restarts: dict[str, tuple[int, int]] = {}  # node id -> (restarts of its earlier processes, its last)
        self._restarts_lock = threading.Lock()  # the status thread and a drain may refresh at once
        self._snapshot = self._unavailable_snapshot("the cluster's status has not been read yet")
        self._threads = [
            threading.Thread(target=self._run_cancels, name="genserve-cancels", daemon=True),
            threading.Thread(target=self._run_deadlines, name="genserve-deadlines", daemon=True),
            threading.Thread(target=self._run_status, name="genserve-cluster-status", daemon=True),
        ]

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._refresh_status()
        try:
            self._follower.start()
        except QueueUnavailable as error:  # it retries on its own; /ready says Redis is down meanwhile
            log.error("%s", error)
        for thread in self._threads:
            thread.start()

    def drain(self, grace_s: float) -> None:
        """Stop taking jobs; wait up to ``grace_s`` for the jobs clients wait on here. Nothing is failed: queued
        and running jobs belong to the cluster and go on without this node."""
        self._accepting = False
        self._refresh_status()
        deadline = time.monotonic() + grace_s
        for job in self._followed_running():
            job.wait_done(max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        self.drain(0.0)
        self._stop.set()
        self._cancels.put(None)
        with self._deadline_cond:
            self._deadline_cond.notify_all()
        self._follower.stop()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)

    @property
    def fatal_reason(self) -> str | None:
        return None

    # --- jobs ------------------------------------------------------------------------------------------------

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        """Queue the jobs in the cluster, all or none: raises ShuttingDown, NotReady (no worker node has been ready),
        QueueFull (the cluster-wide cap), QueueUnavailable (Redis down) or BadRequest (a priority outside the
        cluster queue's range)."""
        if not self._accepting:
            raise ShuttingDown("this API node is shutting down; not taking new jobs", headers=self._retry())
        if not self._snapshot.can_take_jobs:
            raise NotReady(self.not_ready_reason(), headers=self._retry())
        items = [QueueItem(job.id, job.priority, pack(job), job.schedule.group) for job in jobs]
        try:
            for job in jobs:
                self._follower.follow(job)  # before the submit: a job's first event may come a millisecond after it
            self._queue.submit_all(items)
        except BaseException:
            for job in jobs:
                self._follower.forget(job.id)
            raise
        positions = self._queue.positions([job.id for job in jobs])
        with self._deadline_cond:
            for job, position in zip(jobs, positions, strict=True):
                job.mark_queued(position)
                if job.schedule.deadline != float("inf"):
                    heapq.heappush(self._deadlines, (job.schedule.deadline, next(self._deadline_order), job))
            self._deadline_cond.notify_all()
        return jobs

    def last_event_id(self, job_id: str) -> str:
        return self._follower.last_id(job_id)

    def adopt(self, job: Job, after: str) -> None:
        """Mirror a job submitted through another API node (genserve.cluster.mirror.mirror_of_record), applying its
        events after stream id ``after``."""
        self._follower.follow(job, after)

    def cancel(self, job: Job, reason: CancelReason) -> None:
        """Stop a job wherever it is; returns at once (the event loop calls it). Idempotent."""
        if job.done:
            return
        job.schedule.cancel_reason = job.schedule.cancel_reason or reason
        self._cancels.put(_Cancel(job, reason, queued_only=False))

    def cancel_queued(self, job: Job, reason: CancelReason) -> bool:
        """Cancel a job only if it still waits; a running one is left alone. Returns at once: whether it was
        waiting when asked."""
        if job.done or job.state is not JobState.QUEUED:
            return False
        self._cancels.put(_Cancel(job, reason, queued_only=True))
        return True

    def queue_position(self, job: Job) -> int | None:
        if job.done or job.state is not JobState.QUEUED:
            return None
        try:
            return self._queue.position(job.id)
        except QueueUnavailable:
            return job.queue_position  # the last one known

    def wait_for_queue_change(self, timeout: float | None = None) -> bool:
        """The position publisher's pace: each second it asks Redis for the places of watched jobs."""
        self._stop.wait(min(timeout or 1.0, 1.0))
        return not self._stop.is_set()

    def queue_depth_by_priority(self) -> dict[int, int]:
        try:
            return self._queue.depth_by_priority()
        except QueueUnavailable:
            return {}

    def queued_ids(self) -> list[str]:
        return self._queue.queued_ids()

    # --- status ----------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(self._snapshot.status)

    def ready_count(self) -> int:
        return self._snapshot.ready_workers

    def total_workers(self) -> int:
        return self._snapshot.total_workers

    def retry_after_s(self) -> int:
        return int(self._snapshot.status["queue"]["retry_after_s"])

    def not_ready_reason(self) -> str:
        return self._snapshot.reason or "no worker node is ready yet; retry shortly"

    # --- threads ---------------------------------------------------------------------------------------------

    def _run_cancels(self) -> None:
        while (cancel := self._cancels.get()) is not None:
            self._with_retries(functools.partial(self._cancel_now, cancel), f"cancel job {cancel.job.id}")

    def _cancel_now(self, cancel: _Cancel) -> None:
        job = cancel.job
        if job.done:
            return
        outcome = self._queue.cancel(job.id, cancel.reason.value, queued_only=cancel.queued_only)
        if outcome != "dequeued":
            return  # running: its node stops it and reports; unknown: it has just ended
        job.schedule.cancel_reason = cancel.reason
        if cancel.reason is CancelReason.TIMEOUT:
            expire_in_queue(job)
        else:
            end_stopped(job, self._retry())
        self._ledger.ended(job)

    def _run_deadlines(self) -> None:
        """Jobs submitted here whose deadline passed while they waited: out of the queue, failed as timed out."""
        with self._deadline_cond:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._deadlines and (self._deadlines[0][2].done or self._deadlines[0][0] <= now):
                    _, _, job = heapq.heappop(self._deadlines)
                    if not job.done and job.state is JobState.QUEUED:
                        self._cancels.put(_Cancel(job, CancelReason.TIMEOUT, queued_only=True))
                wait = self._deadlines[0][0] - now if self._deadlines else None
                self._deadline_cond.wait(wait)

    def _run_status(self) -> None:
        while not self._stop.wait(self.config.cluster.node_report_s):
            self._refresh_status()

    def _with_retries(self, action: Callable[[], None], what: str) -> None:
        backoff = retry_backoff()
        give_up = time.monotonic() + CANCEL_RETRY_S
        for failures in itertools.count(1):
            try:
                action()
                return
            except QueueUnavailable as error:
                if time.monotonic() > give_up or self._stop.is_set():
                    log.error("%s: given up after %g s: %s", what, CANCEL_RETRY_S, error)
                    return
                self._stop.wait(backoff.compute(failures))
            except Exception:
                log.exception("%s failed", what)
                return

    def _followed_running(self) -> list[Job]:
        return [job for job in self._follower.jobs() if not job.done and job.state is JobState.RUNNING]

    # --- the cluster's status --------------------------------------------------------------------------------

    def _refresh_status(self) -> None:
        try:
            nodes = self._directory.live_nodes()
            size = self._queue.size()
        except QueueUnavailable as error:
            self._snapshot = self._unavailable_snapshot(str(error))
            return
        self._snapshot = self._build_snapshot(nodes, size)

    def _build_snapshot(self, nodes: list[NodeReport], queue_size: int) -> ClusterSnapshot:
        workers = [{**worker, "node": node.node_id} for node in nodes for worker in node.status["workers"]]
        ready = sum(worker["state"] in ("ready", "busy") for worker in workers)
        status, reason = self._overall(nodes, ready)
        max_size = self._queue.max_size
        retry = min((int(node.status["queue"]["retry_after_s"]) for node in nodes), default=RETRY_AFTER_S)
        alive = sum(worker["state"] != "dead" for worker in workers)
        body = {
            "status": status,
            "reason": reason,
            "concurrent_manager": {
                "alive_processes": alive,
                "dead_processes": len(workers) - alive,
                "total_restarts": self._total_restarts(nodes),
                "global_queue_size": queue_size,
            },
            "workers": workers,
            "queue": {
                "size": queue_size,
                "max_size": max_size,
                "saturated": queue_size >= max_size,
                "retry_after_s": retry,
            },
            "loras": {
                "adapter_loads": sum(node.status["loras"]["adapter_loads"] for node in nodes),
                "adapter_loads_avoided": sum(node.status["loras"]["adapter_loads_avoided"] for node in nodes),
            },
            "cluster": {"backend": "redis", "node_id": self.node_id, "redis": "ok"},
            "nodes": [_node_view(node) for node in nodes],
            "uptime_s": round(time.time() - self._started_at, 3),
        }
        can_take = self._accepting and any(node.ever_ready or node.ready_workers for node in nodes)
        return ClusterSnapshot(body, ready, len(workers), reason, can_take)

    def _total_restarts(self, nodes: list[NodeReport]) -> int:
        """Worker restarts across the cluster, never going down: a node that restarts (or vanishes) keeps what it
        counted before, so tools that take differences of it (chaos, performance_monitor) stay right."""
        with self._restarts_lock:
            for node in nodes:
                count = int(node.status["concurrent_manager"]["total_restarts"])
                before, last = self._restarts.get(node.node_id, (0, 0))
                if count < last:  # a new process under the same node id counts from 0 again
                    before += last
                self._restarts[node.node_id] = (before, count)
            return sum(before + last for before, last in self._restarts.values())

    def _overall(self, nodes: list[NodeReport], ready: int) -> tuple[str, str | None]:
        if not self._accepting:
            return "stopping", "this API node is shutting down"
        if not nodes:
            return "starting", (
                "no worker node has reported: start nodes with cluster.role worker (or all) on this Redis"
            )
        troubled = [node for node in nodes if node.status["status"] != "running"]
        reasons = "; ".join(f"node {node.node_id}: {node.status['reason']}" for node in troubled)
        if not ready:
            return "starting", f"no worker of any node is ready yet: {reasons}" if reasons else None
        if troubled:
            return "degraded", reasons
        return "running", None

    def _unavailable_snapshot(self, why: str) -> ClusterSnapshot:
        body = {
            "status": "unavailable",
            "reason": why,
            "concurrent_manager": {"alive_processes": 0, "dead_processes": 0, "total_restarts": 0},
            "workers": [],
            "queue": {"size": None, "max_size": self._queue.max_size, "saturated": False, "retry_after_s": 5},
            "loras": {"adapter_loads": 0, "adapter_loads_avoided": 0},
            "cluster": {"backend": "redis", "node_id": self.node_id, "redis": why},
            "nodes": [],
            "uptime_s": round(time.time() - self._started_at, 3),
        }
        return ClusterSnapshot(body, 0, 0, why, False)

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


def _node_view(node: NodeReport) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "status": node.status["status"],
        "reason": node.status["reason"],
        "ready_workers": node.ready_workers,
        "total_workers": len(node.status["workers"]),
        "last_report_s": round(max(0.0, time.time() - node.at), 3),
    }
