"""Mirrors: an API node's live ``Job`` for a job that runs on some node of the cluster.

Every route of the API node works with live Jobs — a sync /generate waits on one, an SSE stream subscribes to one,
webhooks and metrics listen to one. In a cluster the job runs elsewhere, so the API node keeps a mirror: a Job
moved by the events the running node publishes on the job's Redis stream (``apply_event``), instead of by a
local supervisor. A job submitted here is mirrored from the start; one submitted through another API node is
mirrored when a client asks this node about it while it is unfinished (``mirror_of_record``).

``EventFollower`` is the one thread that moves them: a single blocking XREAD over the streams of every mirrored
job, plus this node's nudge stream, which ``follow`` writes to so that a newly mirrored job joins the read at once
instead of when the current block ends. No polling: the thread sleeps in Redis until an event or a nudge comes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from genserve.cluster.redis_queue import QueueUnavailable, redis_errors, redis_where
from genserve.cluster.redis_records import TERMINAL_KINDS, RedisJobEvents, stream_id
from genserve.errors import JobCanceled, job_error
from genserve.jobs import Job, JobEvent, JobState
from genserve.messages import CancelReason, JobRequest, JobResult
from genserve.store import JobRecord

log = logging.getLogger(__name__)

RECONNECT_S = 1.0  # wait after Redis failed a read before trying again


def apply_event(job: Job, event: JobEvent, image_path: str = "") -> None:
    """Move a mirror as the running node's event says (a repeat of a state it is in changes nothing).
    ``image_path``: where this node reads a completed job's image (the routes answering with the image read it)."""
    data = event.data
    match event.kind:
        case "queued":
            if data.get("requeued_because"):
                job.mark_queued(data.get("queue_position"), requeued_because=data["requeued_because"])
        case "started":
            job.mark_dispatched(data.get("worker") or 0, data.get("device") or "", data.get("node"))
            job.mark_started(data.get("started_at") or event.at)
        case "progress":
            step, total = int(data["step"]), int(data["total_steps"])
            eta = data.get("eta_s") or 0.0
            elapsed = eta * step / (total - step) if total > step else job.step_elapsed_s  # what eta was made from
            job.mark_progress(step, total, elapsed)
        case "completed":
            job.finish(JobState.COMPLETED, result=_result(job, data, image_path), finished_at=data.get("finished_at"))
        case "failed":
            error = data.get("error") or {}
            failure = job_error(error.get("type", "job_failed"), error.get("message", ""))
            job.finish(JobState.FAILED, error=failure, finished_at=data.get("finished_at"))
        case "canceled":
            reason = data.get("cancel_reason")
            if reason in {member.value for member in CancelReason}:
                job.schedule.cancel_reason = CancelReason(reason)
            message = (data.get("error") or {}).get("message") or f"job was canceled ({reason})"
            job.finish(JobState.CANCELED, error=JobCanceled(message), finished_at=data.get("finished_at"))


def _result(job: Job, data: dict[str, Any], image_path: str) -> JobResult:
    result = data.get("result") or {}
    image = (result.get("images") or [{}])[0]
    timings = data.get("timings") or {}
    seed = result.get("seed")
    return JobResult(
        job_id=job.id,
        image_path=image_path,
        image_bytes=int(image.get("bytes") or 0),
        width=int(result.get("width") or job.request.width),
        height=int(result.get("height") or job.request.height),
        seed=int(seed) if seed is not None else job.request.seed,
        started_at=float(timings.get("started_at") or job.started_at or 0.0),
        pipeline_s=float(timings.get("pipeline_s") or 0.0),
        encode_s=float(timings.get("encode_s") or 0.0),
        batch_size=int(timings.get("batch_size") or 1),
    )


def mirror_of_record(record: JobRecord) -> Job:
    """A mirror of an unfinished job known only by its record (submitted through another API node)."""
    params = record.params
    request = JobRequest(
        job_id=record.id,
        mode=record.mode,  # type: ignore[arg-type]
        prompt=str(params.get("prompt", "")),
        width=record.width or 0,
        height=record.height or 0,
        num_inference_steps=int(params.get("num_inference_steps") or 0),
        guidance_scale=float(params.get("guidance_scale") or 0.0),
        seed=record.seed or 0,
        strength=float(params.get("strength") or 0.0),
        input_image=None,
        mask_image=None,
        control_image=None,
        control_mode=None,
        controlnet_conditioning_scale=0.0,
        output_path="",
    )
    job = Job.create(request, record.priority, float(params.get("timeout_s") or float("inf")))
    job.model_id, job.params, job.submitted_at = record.model_id, params, record.submitted_at
    job.owner, job.request_id = record.owner, record.request_id
    if record.status == JobState.RUNNING.value:
        job.mark_dispatched(record.worker_slot or 0, record.device or "", record.node)
        job.started_at = record.started_at
    return job


class EventFollower:
    """The thread that moves this node's mirrors (see the module docstring)."""

    def __init__(
        self, events: RedisJobEvents, client: redis.Redis, nudge_key: str, local_image: Callable[[str], Path]
    ) -> None:
        """``client``: a connection pool of its own for the blocking read (it holds one connection while it
        waits). ``local_image``: where this node reads a job's image, fetched first when it lives in Redis.
        Each read blocks at most ``events.max_block_s``, kept under the clients' socket timeout (genserve.cluster.
        wiring), or an idle read would time out on the socket just as Redis answers it."""
        self._local_image = local_image
        self._events = events
        self._client = client
        self._block_s = events.max_block_s
        self._nudge_key = nudge_key
        self._where = redis_where(client)
        self._lock = threading.Lock()  # guards _followed
        self._followed: dict[str, tuple[Job, str]] = {}  # job id -> (mirror, last stream id applied)
        self._nudge_after: str | None = None  # read from Redis once it answers (it may be down at start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genserve-event-follower", daemon=True)

    def start(self) -> None:
        """Start following; returns at once, Redis up or not (the thread reads once Redis answers)."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._nudge()
        except QueueUnavailable:
            pass
        if self._thread.is_alive():  # never started when its node failed to start
            self._thread.join(timeout=self._block_s + 1)

    def follow(self, job: Job, after: str = "0") -> None:
        """Apply the job's events after stream id ``after`` from now on, until its terminal one."""
        with self._lock:
            self._followed[job.id] = (job, after)
        self._nudge()

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._followed.pop(job_id, None)

    def jobs(self) -> list[Job]:
        with self._lock:
            return [job for job, _ in self._followed.values()]

    def last_id(self, job_id: str) -> str:
        """The id of the job's newest event so far ("0" when it has none): mirror the record read after it, then
        follow from it, and no event is missed."""
        with redis_errors("event follower's", self._where):
            newest: Any = self._client.xrevrange(self._events.key(job_id), count=1)
        return str(newest[0][0].decode()) if newest else "0"

    def _image_for(self, job: Job, event: JobEvent) -> str:
        """A completed job's image, fetched here for whoever waits to answer with it (sync routes)."""
        if event.kind != "completed" or not job.watched:
            return ""
        try:
            return str(self._local_image(job.id))
        except Exception as error:  # the waiting route answers that the image cannot be read; the job completed
            log.error("job %s: cannot fetch its image: %s", job.id, error)
            return ""

    def _nudge(self) -> None:
        with redis_errors("event follower's", self._where):
            self._client.xadd(self._nudge_key, {"n": "1"}, maxlen=100, approximate=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._read_once()
            except QueueUnavailable as error:
                log.warning("job events: %s; retrying in %g s", error, RECONNECT_S)
                self._stop.wait(RECONNECT_S)
            except Exception:
                log.exception("job events: following failed; retrying")
                self._stop.wait(RECONNECT_S)

    def _read_once(self) -> None:
        if self._nudge_after is None:  # nudges from before this read began mean nothing now
            with redis_errors("event follower's", self._where):
                newest: Any = self._client.xrevrange(self._nudge_key, count=1)
            self._nudge_after = newest[0][0].decode() if newest else "0-0"
        with self._lock:
            streams: dict[Any, Any] = {self._events.key(job_id): after for job_id, (_, after) in self._followed.items()}
        streams[self._nudge_key] = self._nudge_after
        with redis_errors("event follower's", self._where):
            reply: Any = self._client.xread(streams, block=max(1, round(self._block_s * 1000)))
        for key, entries in reply or []:
            key = key.decode()
            if key == self._nudge_key:
                self._nudge_after = entries[-1][0].decode()
                continue
            job_id = key[len(self._events.key("")) :]
            for event in self._events.parse(job_id, [(key, entries)]):
                self._apply(job_id, event)

    def _apply(self, job_id: str, event: JobEvent) -> None:
        with self._lock:
            entry = self._followed.get(job_id)
            if entry is None:
                return
            job = entry[0]
            if event.kind in TERMINAL_KINDS:
                del self._followed[job_id]
            else:
                self._followed[job_id] = (job, stream_id(event))
        try:
            apply_event(job, event, self._image_for(job, event))
        except Exception:
            log.exception("job %s: could not apply its %s event %s", job_id, event.kind, event.data)
        if event.kind in TERMINAL_KINDS and not job.done:  # an event it could not read must not leave it hanging
            job.finish(JobState.FAILED, error=job_error("job_failed", f"job ended ({event.kind})"))
