"""Prometheus metrics of one GenServe app (API process): requests, jobs, the queue, the workers and the GPUs.

Every figure lives in the API process and in this app's own ``CollectorRegistry`` (never prometheus_client's global
one: the tests run several servers in one process, and each must count only its own). Where each comes from:

- HTTP requests: the request middleware (``genserve.request_log``) calls ``observe_request`` once per answer, with
  the route's path template (``/jobs/{job_id}``) or ``"unmatched"``, so a scan of random paths adds no series.
- Jobs: ``on_job_event`` is a job listener (``Job.add_listener``), called for every event of every job in the thread
  that emits it (the monitor, a request's thread) while the job's lock is held — so it only increments in memory.
  The worker's own figures (pipeline and encode seconds, its start time) arrive in the messages the supervisor
  already receives (``JobStarted``, ``JobResult``) and reach us on the job: no multiprocess metric files.
- The pool: ``PoolCollector`` reads the supervisor when Prometheus scrapes — the queue's depth per priority (the
  supervisor lock, briefly) and the workers from the snapshot ``/status`` shows (no lock).
- GPUs: ``GpuCollector`` asks NVML (nvidia-ml-py) at scrape time; without the library, a driver or a device its
  families are simply absent.

``server.metrics_port`` serves the same registry on a second port with prometheus_client's own HTTP server
(``serve_on_port``): it has no key check, so it belongs behind a firewall.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from genserve.jobs import Job, JobEvent, JobState
from genserve.pool import JobPool
from genserve.supervisor import WorkerState

log = logging.getLogger(__name__)

# No ``*_created`` series (the time each labelled series first appeared): Prometheus ignores them in the text format,
# and they double a scrape's size. A process-wide setting of prometheus_client, whose only user here is this module.
disable_created_metrics()

# Seconds-to-minutes jobs: a tiny test image takes a tenth of a second, a 1024² FLUX.1-dev image at 50 steps tens of
# seconds on one GPU, and a busy queue makes clients wait minutes.
JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
# Encoding a PNG: milliseconds for a small image, about a second for a noisy 2048² one.
ENCODE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Most routes answer in milliseconds; POST /generate waits for its job, so the long tail is as long as a job's.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

OUTCOMES = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELED)


class Metrics:
    """The metrics of one app (``app.state.metrics``): its registry, what feeds it, and its optional own port."""

    def __init__(self, supervisor: JobPool, modes: Iterable[str], default_priority: int = 0) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "genserve_http_requests",
            "HTTP requests answered, by method, route (path template) and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "genserve_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route (a synchronous /generate includes its job).",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.submitted = Counter(
            "genserve_jobs_submitted", "Jobs accepted into the queue, by mode.", ["mode"], registry=registry
        )
        self.finished = Counter(
            "genserve_jobs_finished",
            "Jobs that ended, by mode and outcome (completed | failed | canceled).",
            ["mode", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "genserve_job_failures",
            "Failed jobs by mode and error type (timeout, out_of_memory, worker_died, shutting_down, ...).",
            ["mode", "error_type"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "genserve_job_queue_wait_seconds",
            "From submission until a worker started the job (again after a re-queue), by mode.",
            ["mode"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.pipeline = Histogram(
            "genserve_job_pipeline_seconds",
            "Seconds inside the diffusers pipeline call of a completed job, as its worker measured (a batch's whole "
            "call for each of its images), by mode.",
            ["mode"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.encode = Histogram(
            "genserve_job_encode_seconds",
            "Seconds the worker took to encode and write a completed job's image, by mode.",
            ["mode"],
            buckets=ENCODE_BUCKETS,
            registry=registry,
        )
        self.end_to_end = Histogram(
            "genserve_job_end_to_end_seconds",
            "From submission until the job ended, by mode and outcome.",
            ["mode", "outcome"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        # Served modes' job counters exist from the start at 0, so rate() and alerts work before the first job.
        for mode in modes:
            self.submitted.labels(mode)
            for outcome in OUTCOMES:
                self.finished.labels(mode, outcome.value)
        self.gpus = GpuCollector()
        registry.register(PoolCollector(supervisor, default_priority))
        registry.register(self.gpus)
        self._port: tuple[WSGIServer, threading.Thread] | None = None

    # --- what feeds it ------------------------------------------------------------------------------------------

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered HTTP request (the request middleware, on the event loop)."""
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)

    def on_job_event(self, job: Job, event: JobEvent) -> None:
        """Job listener: any thread, the job's lock held — in-memory increments only."""
        mode = job.request.mode
        if event.kind == "queued":
            if event.seq == 1:  # its first event is the one submission publishes; later ones are moves and re-queues
                self.submitted.labels(mode).inc()
        elif event.kind == "started":
            if job.started_at is not None:
                self.queue_wait.labels(mode).observe(max(0.0, job.started_at - job.submitted_at))
        elif event.is_terminal:
            self._job_ended(job, mode, event.kind)

    def _job_ended(self, job: Job, mode: str, outcome: str) -> None:
        self.finished.labels(mode, outcome).inc()
        if job.finished_at is not None:
            self.end_to_end.labels(mode, outcome).observe(max(0.0, job.finished_at - job.submitted_at))
        if job.result is not None:
            self.pipeline.labels(mode).observe(job.result.pipeline_s)
            self.encode.labels(mode).observe(job.result.encode_s)
        if outcome == JobState.FAILED.value and job.error is not None:
            self.failures.labels(mode, job.error.error_type).inc()

    # --- what reads it ------------------------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a scrape that sent ``Accept: accept`` (Prometheus text, or OpenMetrics when asked),
        and its content type. Blocking (the supervisor lock, NVML): call it off the event loop."""
        try:
            encoder, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):  # a version it cannot parse ("version=abc"): the classic text format
            encoder, content_type = choose_encoder("")
        return encoder(self.registry), content_type

    def serve_on_port(self, host: str, port: int) -> None:
        """Serve this registry on ``host:port`` too (server.metrics_port), on prometheus_client's own thread."""
        try:
            self._port = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"server.metrics_port {port} cannot be served on {host}: {exc.strerror or exc}") from exc
        log.info("Prometheus metrics also on http://%s:%d/metrics (no API key there: firewall it)", host, port)

    def close(self) -> None:
        """Stop the metrics port, if one runs, and let go of NVML (app shutdown)."""
        if self._port is not None:
            server, thread = self._port
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._port = None
        self.gpus.close()


class PoolCollector(Collector):
    """The queue and the workers, read from the supervisor at scrape time."""

    def __init__(self, supervisor: JobPool, default_priority: int) -> None:
        self.supervisor = supervisor
        self.default_priority = default_priority  # always shown, so the family is there while the queue is empty

    def collect(self) -> Iterator[Metric]:
        depths = self.supervisor.queue_depth_by_priority()
        depths.setdefault(self.default_priority, 0)
        depth = GaugeMetricFamily(
            "genserve_queue_depth", "Jobs waiting in the queue, by priority.", labels=["priority"]
        )
        for priority, count in sorted(depths.items()):
            depth.add_metric([str(priority)], count)
        yield depth
        status = self.supervisor.status()  # the snapshot /status shows: no lock
        yield GaugeMetricFamily(
            "genserve_queue_capacity",
            "Jobs the queue holds before new ones get 429.",
            value=status["queue"]["max_size"],
        )
        yield from self._workers(status["workers"])

    def _workers(self, workers: list[dict[str, Any]]) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "genserve_workers",
            "Worker slots by state (starting | ready | busy | dead | failed).",
            labels=["state"],
        )
        for state in WorkerState:
            by_state.add_metric([state.value], sum(worker["state"] == state.value for worker in workers))
        yield by_state
        per_slot = {
            "restarts": ("genserve_worker_restarts", "Times the slot's worker process was respawned."),
            "hangs": ("genserve_worker_hangs", "Worker processes killed as hung (no heartbeat or no step in time)."),
            "oom_failures": ("genserve_worker_oom_failures", "Jobs failed by the slot's worker with out-of-memory."),
        }
        # In a cluster slots repeat from node to node: the node is part of what names one.
        clustered = any("node" in worker for worker in workers)
        labels = ["slot", "device", "node"] if clustered else ["slot", "device"]
        for field, (name, documentation) in per_slot.items():
            family = CounterMetricFamily(name, documentation, labels=labels)
            for worker in workers:
                values = [str(worker["slot"]), worker["device"]] + ([worker.get("node", "")] if clustered else [])
                family.add_metric(values, worker[field])
            yield family


class GpuCollector(Collector):
    """Per-GPU memory and utilisation from NVML, read at scrape time in the API process.

    NVML is started at the first scrape, not at import: a host without nvidia-ml-py, a driver or a device yields
    nothing (once noted in the log), never an error. NVML numbers devices in PCI order, which may differ from CUDA's
    (set CUDA_DEVICE_ORDER=PCI_BUS_ID to make them agree); the ``gpu`` label is NVML's index and ``uuid`` is exact.
    """

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._tried = False
        self._lock = threading.Lock()  # two scrapes at once (main port and metrics port) start NVML once

    def collect(self) -> Iterator[Metric]:
        nvml = self._started()
        if nvml is None:
            return
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:  # the driver went away: say so, and serve the other metrics
            log.warning("NVML: cannot count GPUs: %s", exc)
            return
        if count == 0:
            return
        labels = ["gpu", "name", "uuid"]
        used = GaugeMetricFamily("genserve_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels)
        total = GaugeMetricFamily("genserve_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=labels)
        busy = GaugeMetricFamily(
            "genserve_gpu_utilization_ratio",
            "Share of the last sample period a kernel ran on the GPU, 0 to 1 (NVML; absent where unsupported).",
            labels=labels,
        )
        for index in range(count):
            self._device(nvml, index, used, total, busy)
        yield from (used, total, busy)

    @staticmethod
    def _device(
        nvml: ModuleType, index: int, used: GaugeMetricFamily, total: GaugeMetricFamily, busy: GaugeMetricFamily
    ) -> None:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:  # one GPU fallen off the bus must not hide the others
            log.warning("NVML: cannot read GPU %d: %s", index, exc)
            return
        labels = [str(index), _text(name), _text(uuid)]
        used.add_metric(labels, int(memory.used))
        total.add_metric(labels, int(memory.total))
        try:
            busy.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        except Exception:  # not supported (MIG instances, some boards): the series is absent, not 0
            pass

    def _started(self) -> ModuleType | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._nvml = _start_nvml()
            return self._nvml

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
            self._nvml = None


def _start_nvml() -> ModuleType | None:
    """NVML, initialised; None (noted once in the log) where there is no library, driver or device."""
    try:
        import pynvml
    except ImportError:
        log.info("no GPU metrics: nvidia-ml-py is not installed")
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, OSError ...
        log.info("no GPU metrics: NVML cannot start (%s)", exc)
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    """NVML strings: bytes in older nvidia-ml-py releases, str in newer ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
