"""The worker node's side of the cluster: a local supervisor and its workers, fed from the Redis queue.

The supervisor is the one-machine supervisor, unchanged: it spawns, watches and respawns the workers, re-queues a
job whose worker died (locally, once), and enforces deadlines. ``WorkerNode`` stands between it and Redis:
- the claimer (``genserve-claimer``) takes the head of the cluster queue only while a worker is spare — a pull, so
  the global order holds across nodes — blocked in Redis (BLPOP) until a job comes, and hands the job to the
  supervisor; a job starts on an idle worker within milliseconds of its submission on any API node;
- the lease keeper (``genserve-leases``) renews the lease of every job the node holds every lease_s / 3; a lease
  it lost (Redis took the job back, the node was cut off too long) stops the job here — someone else owns it now;
- the cancel listener (``genserve-cancel-listener``) stops jobs whose cancellation any API node asked for;
- the reporter (``genserve-reporter``) writes what the node's jobs do into Redis (records, events, images, the
  end of each lease) in order, from one queue, retrying with backoff while Redis is unreachable: a job that ends
  while Redis is down keeps its result here until it can be reported, and its lease is renewed meanwhile;
- the node publishes its pool every cluster.node_report_s (genserve.cluster.directory).

Stopping: the claimer stops first; running jobs get server.shutdown_grace_s to finish; a job the drain has to stop
is given back to the queue (at the head, no attempt spent) rather than failed: another node runs it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from genserve.cluster.directory import NodeDirectory
from genserve.cluster.ledger import Ledger
from genserve.cluster.payload import unpack
from genserve.cluster.redis_queue import CancelSubscription, Claim, QueueUnavailable, RedisJobQueue, retry_backoff
from genserve.cluster.store import ClusterStore
from genserve.config import Config
from genserve.errors import GenServeError
from genserve.jobs import TERMINAL_STATES, Job, JobEvent, JobListener, JobState
from genserve.messages import CancelReason
from genserve.supervisor import Supervisor, expire_in_queue

log = logging.getLogger(__name__)

CLAIM_BLOCK_S = 1.0  # the longest one claim blocks: how late a drain stops the claimer
FLUSH_AT_STOP_S = 10.0  # at shutdown, how long the reporter may go on writing what is left


class Reporter:
    """One thread that runs the node's Redis writes in order, retrying each until Redis takes it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: deque[tuple[str, Callable[[], None], str | None]] = deque()  # (what, action, progress of)
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="genserve-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, what: str, action: Callable[[], None], progress_of: str | None = None) -> None:
        """Queue a write. A progress write replaces the previous one of the same job still waiting: while Redis is
        slow or down only the newest step matters."""
        with self._cond:
            if progress_of is not None and self._pending and self._pending[-1][2] == progress_of:
                self._pending[-1] = (what, action, progress_of)
            else:
                self._pending.append((what, action, progress_of))
            self._cond.notify_all()

    def stop(self, flush_s: float) -> None:
        """Let it write what is queued for up to ``flush_s``, then stop."""
        deadline = time.monotonic() + flush_s
        with self._cond:
            while (self._pending or self._busy) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._pending:
                log.error("stopping with %d write(s) Redis never took: %s", len(self._pending), self._what())
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _what(self) -> str:
        return ", ".join(what for what, _, _ in list(self._pending)[:5])

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                what, action, _ = self._pending.popleft()
                self._busy = True
            try:
                self._until_done(what, action)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _until_done(self, what: str, action: Callable[[], None]) -> None:
        backoff = retry_backoff()
        for failures in itertools.count(1):
            try:
                action()
                if failures > 1:
                    log.info("reported %s once Redis was back", what)
                return
            except QueueUnavailable as error:
                if failures == 1:
                    log.warning("cannot report %s yet: %s; retrying until Redis is back", what, error)
                with self._cond:
                    if self._stopping:
                        return
                time.sleep(backoff.compute(failures))
            except Exception:
                log.exception("reporting %s failed; dropped", what)
                return


class WorkerNode:
    def __init__(
        self,
        config: Config,
        supervisor: Supervisor,
        queue: RedisJobQueue,
        ledger: Ledger,
        directory: NodeDirectory,
        store: ClusterStore,
        node_id: str,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self._queue = queue
        self._ledger = ledger
        self._directory = directory
        self._store = store
        self.node_id = node_id
        self._lease_s = config.cluster.lease_s
        self._images_in_redis = config.results.backend == "redis"
        self._lock = threading.Lock()  # guards _held and _lost
        self._held: dict[str, Job] = {}  # claimed and not yet reported ended or given back
        self._lost: set[str] = set()  # leases taken away: whatever these jobs do here is no longer reported
        self._claiming = threading.Event()
        self._stop = threading.Event()
        self._cancel_subscription: CancelSubscription | None = None
        self.reporter = Reporter()
        self.listeners: list[JobListener] = []  # more listeners every job it takes gets (its metrics)
        self._threads = [
            threading.Thread(target=self._run_claimer, name="genserve-claimer", daemon=True),
            threading.Thread(target=self._run_leases, name="genserve-leases", daemon=True),
            threading.Thread(target=self._run_cancels, name="genserve-cancel-listener", daemon=True),
            threading.Thread(target=self._run_reports, name="genserve-node-report", daemon=True),
        ]

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.supervisor.start()
        self.reporter.start()
        self._claiming.set()
        for thread in self._threads:
            thread.start()

    def drain(self, grace_s: float) -> None:
        """Stop claiming; give running jobs ``grace_s``; what the supervisor then stops goes back to the queue."""
        self._claiming.clear()
        self.supervisor.drain(grace_s)

    def shutdown(self) -> None:
        self._claiming.clear()
        self.supervisor.shutdown()
        self._stop.set()
        if self._cancel_subscription is not None:
            self._cancel_subscription.close()
        self.reporter.stop(FLUSH_AT_STOP_S)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=CLAIM_BLOCK_S + 5)
        try:
            self._directory.withdraw(self.node_id)
        except QueueUnavailable:
            pass  # its entry goes stale on its own

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    # --- claiming --------------------------------------------------------------------------------------------

    def _run_claimer(self) -> None:
        backoff = retry_backoff()
        failures = 0
        while not self._stop.is_set():
            if not self._claiming.is_set() or not self.supervisor.spare_workers():
                self.supervisor.wait_for_spare_worker(CLAIM_BLOCK_S)
                continue
            try:
                claim = self._queue.claim(self.node_id, self._lease_s, CLAIM_BLOCK_S)
                failures = 0
            except QueueUnavailable as error:
                failures += 1
                if failures == 1:
                    log.warning("cannot claim jobs: %s; retrying with backoff", error)
                self._stop.wait(backoff.compute(failures))
                continue
            if claim is not None:
                try:
                    self._take(claim)
                except Exception:
                    log.exception("job %s: could not start it here; giving it back", claim.job_id)
                    self.reporter.put(f"release of {claim.job_id}", functools.partial(self._release, claim.job_id))

    def _take(self, claim: Claim) -> None:
        record = self._ledger.records.get(claim.job_id)
        if record is not None and JobState(record.status) in TERMINAL_STATES:
            # It ended, but its node died before it could drop the lease: nothing to run again.
            self._queue.finish(claim.job_id, self.node_id)
            return
        unpacked = unpack(
            claim.payload,
            input_dir=self._store.input_dir(claim.job_id),
            output_path=self._store.image_path(claim.job_id),
            attempts=claim.attempts,
        )
        job = unpacked.job
        job.node = self.node_id
        with self._lock:
            self._held[job.id] = job
        job.add_listener(self._on_event)
        for listener in self.listeners:
            job.add_listener(listener)
        if unpacked.deadline_at <= time.time():
            expire_in_queue(job)  # the listener reports it and drops the lease
            return
        try:
            self.supervisor.submit_all([job])
        except GenServeError as error:  # shutting down, or no worker after all: another node runs it
            log.info("job %s: not run here (%s); giving it back", job.id, error)
            with self._lock:
                self._held.pop(job.id, None)
            self.reporter.put(f"release of {job.id}", lambda: self._release(job.id))
            return
        log.info("claimed job %s (priority %d, attempt %d)", job.id, claim.priority, claim.attempts + 1)

    # --- what the node's jobs do ------------------------------------------------------------------------------

    def _on_event(self, job: Job, event: JobEvent) -> None:
        """Listener (supervisor's thread, job lock held): queue the matching Redis writes, nothing more."""
        with self._lock:
            if job.id in self._lost:  # another node owns it now
                if event.is_terminal:
                    self._lost.discard(job.id)
                return
        match event.kind:
            case "queued":
                because = event.data.get("requeued_because")
                if because:  # the local supervisor re-queued it (its worker died): say so cluster-wide
                    job.node = self.node_id  # mark_queued cleared it, but the job waits here: its next start is ours
                    self.reporter.put(f"re-queue of {job.id}", lambda: self._requeued_here(job.id, because))
            case "started":
                self.reporter.put(f"start of {job.id}", lambda: self._ledger.started(job, event))
            case "progress":
                self.reporter.put(f"progress of {job.id}", lambda: self._ledger.publish(event), progress_of=job.id)
            case _ if event.is_terminal:
                if job.cancel_reason is CancelReason.SHUTDOWN and not self._claiming.is_set():
                    self.reporter.put(f"release of {job.id}", lambda: self._release(job.id))
                else:
                    self.reporter.put(f"end of {job.id}", lambda: self._report_end(job))

    def _requeued_here(self, job_id: str, because: str) -> None:
        """Its worker died and this node runs it again: that is the job's one retry, cluster-wide too."""
        self._queue.count_attempt(job_id, self.node_id)
        self._ledger.requeued(job_id, f"{because} on node {self.node_id}")

    def _report_end(self, job: Job) -> None:
        if self._images_in_redis and job.state is JobState.COMPLETED:
            self._store.store_image(job.id)
        self._ledger.ended(job)
        self._queue.finish(job.id, self.node_id)
        self._forget(job.id)

    def _release(self, job_id: str) -> None:
        outcome = self._queue.release(job_id, self.node_id)
        if outcome == "canceled":
            message = "job was canceled (canceled by client) while its node was shutting down"
            self._ledger.ended_without_job(job_id, JobState.CANCELED, "canceled", message, CancelReason.CLIENT.value)
        elif outcome == "requeued":
            self._ledger.requeued(job_id, f"node {self.node_id} shut down before it finished")
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._lost.discard(job_id)
        self._store.remove_inputs(job_id)

    # --- leases and cancels ----------------------------------------------------------------------------------

    def _run_leases(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            with self._lock:
                held = list(self._held.values())
            for job in held:
                try:
                    self._renew(job)
                except QueueUnavailable as error:
                    log.warning("cannot renew leases: %s", error)
                    break

    def _renew(self, job: Job) -> None:
        if not self._queue.renew(job.id, self.node_id, self._lease_s):
            with self._lock:
                if job.state in TERMINAL_STATES or job.id not in self._held:
                    # It ended here since the renewals began: reporting its end dropped the lease (or is about to).
                    return
                self._held.pop(job.id)
                self._lost.add(job.id)
            log.error("job %s: this node lost its lease (re-queued elsewhere); stopping it here", job.id)
            self.supervisor.cancel(job, CancelReason.ABANDONED)
        elif job.cancel_reason is None and self._queue.is_canceled(job.id):  # a notice pub/sub dropped
            self.supervisor.cancel(job, CancelReason.CLIENT)

    def _run_cancels(self) -> None:
        backoff = retry_backoff()
        for failures in itertools.count(1):
            if self._stop.is_set():
                return
            try:
                self._cancel_subscription = self._queue.subscribe_cancels(self.node_id)
                for notice in self._cancel_subscription:
                    self._on_cancel_notice(notice)
                return  # closed: the node is stopping
            except QueueUnavailable as error:
                log.warning("cancel notices: %s; subscribing again", error)
                self._stop.wait(backoff.compute(failures))

    def _on_cancel_notice(self, notice: str) -> None:
        job_id, _, reason = notice.partition(" ")
        with self._lock:
            job = self._held.get(job_id)
        if job is None:
            return
        try:
            why = CancelReason(reason)
        except ValueError:
            why = CancelReason.CLIENT
        log.info("job %s: cancel asked (%s)", job_id, why.value)
        self.supervisor.cancel(job, why)

    def _run_reports(self) -> None:
        while not self._stop.is_set():
            try:
                self._directory.publish(self.node_id, self.supervisor.status(), self.supervisor.ever_ready)
            except QueueUnavailable as error:
                log.debug("node report: %s", error)
            self._stop.wait(self.config.cluster.node_report_s)
