"""The FastAPI application of the API process: wiring only — the service object, lifespan, routes, error handlers.

The lifespan starts the persistence writer, the supervisor (which spawns the workers and returns at once, so
/health answers while pipelines load) and retention (a thread of its own); on shutdown it stops them off the event
loop. The graceful part of a shutdown (drain) is started by the server runner before the HTTP server stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from genserve import __version__
from genserve.auth import OPEN_PATHS, KeyRing, authorize
from genserve.cluster.dispatcher import ClusterDispatcher
from genserve.cluster.node import WorkerNode
from genserve.cluster.wiring import ClusterParts
from genserve.config import Config, ConfigError, expand_path
from genserve.devices import resolve_devices
from genserve.docs import install_docs
from genserve.http_errors import install_error_handlers
from genserve.job_manager import JobManager
from genserve.loras import LoraCatalogue
from genserve.messages import Mode
from genserve.metrics import Metrics
from genserve.middleware import BodyCap, BodySizeLimit
from genserve.request_log import RequestLog
from genserve.retention import Retention
from genserve.routes import compat, loras, native, openai, process
from genserve.routes import jobs as jobs_routes
from genserve.routes import metrics as metrics_routes
from genserve.routes import node as node_routes
from genserve.routes.ui import install_ui
from genserve.service import EXIT_WORKERS_FAILED, NodeService, Service, StopControl
from genserve.startup_checks import hardware_problems
from genserve.store import ResultStore
from genserve.supervisor import Supervisor, WorkerTarget

log = logging.getLogger(__name__)


def create_app(
    config: Config, *, devices: list[str] | None = None, worker_target: WorkerTarget | None = None
) -> FastAPI:
    """The service's app: on one machine, or a node of a cluster (cluster.backend redis) in its role."""
    if config.clustered and not config.serves_api:
        return create_worker_node_app(config, devices=devices, worker_target=worker_target)
    keyring = KeyRing.from_config(config)
    _warn_if_exposed(config, keyring)
    pool = _Pool.of(config, devices, worker_target)
    modes = pool.modes
    service = _cluster_service(pool) if config.clustered else _local_service(pool)
    metrics = Metrics(service.supervisor, modes, config.defaults.priority)
    service.jobs.listeners.append(metrics.on_job_event)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.uses_embedded_model and config.runs_workers:
            log.warning(
                "model.path is empty: serving the EMBEDDED RANDOM-WEIGHT TEST MODEL (images are noise); "
                "point model.path at a FLUX.1-dev folder for real images"
            )
        if config.server.metrics_port:  # first: a port that cannot be bound stops the start before any worker
            metrics.serve_on_port(config.server.host, config.server.metrics_port)
        service.start()
        retention = Retention(config, service.store)
        retention.start()
        try:
            yield
        finally:
            retention.stop()
            log.info("shutting down workers")
            await asyncio.to_thread(service.close)
            await asyncio.to_thread(metrics.close)  # last: the metrics port answers while the workers stop

    app = FastAPI(
        title="GenServe",
        version=__version__,
        description="FLUX.1-dev image generation from a pool of GPU worker processes.",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
        # FastAPI's own docs routes would bypass authorize: genserve.docs serves them (install_docs, below).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.metrics = metrics  # the request middleware reports to it; GET /metrics renders it
    app.state.keyring = keyring
    if config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.server.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After", "Location", "X-Request-ID"],
        )
    # A LoRA upload may be larger than any generation request: /loras has its own cap.
    lora_upload = BodyCap(config.loras.max_upload_bytes + loras.FORM_SLACK_BYTES, "loras.max_upload_mb")
    app.add_middleware(BodySizeLimit, max_bytes=config.server.max_request_bytes, routes={"/loras": lora_upload})
    # Added last, so outermost: every answer (a 413, a CORS preflight) gets an id and an access-log line.
    app.add_middleware(RequestLog, log_requests=config.server.access_log)
    install_error_handlers(app)
    install_ui(app)  # first: GET / from a browser is the playground, before native's JSON at the same path
    app.include_router(native.router)
    app.include_router(jobs_routes.router)
    app.include_router(compat.router)
    app.include_router(openai.router)
    app.include_router(process.router)
    app.include_router(loras.router)
    install_docs(app, model_id=config.model.id, keys_enabled=keyring.enabled, open_paths=OPEN_PATHS)
    app.include_router(metrics_routes.router)
    return app


@dataclass(frozen=True)
class _Pool:
    """What it takes to build a node's worker pool: its settings, served modes, devices and how it stops."""

    config: Config
    modes: tuple[Mode, ...]
    stop: StopControl
    devices: list[str] | None  # None: from workers.devices
    worker_target: WorkerTarget | None  # None: the real worker

    @classmethod
    def of(cls, config: Config, devices: list[str] | None, worker_target: WorkerTarget | None) -> _Pool:
        modes, notes = config.served_modes()
        for note in notes:
            log.warning(note)
        return cls(config, modes, StopControl(), devices, worker_target)

    def supervisor(self) -> Supervisor:
        config = self.config
        devices = self.devices if self.devices is not None else resolve_devices(config)
        problems = hardware_problems(config, devices)
        if problems:
            raise ConfigError("settings this hardware cannot run: " + "; ".join(problems))
        log.info("%d worker(s) on %s; modes: %s", len(devices), ", ".join(devices), ", ".join(self.modes))
        stop = self.stop
        return Supervisor(
            config,
            devices,
            self.modes,
            worker_target=self.worker_target,
            on_fatal=lambda reason: stop.request(reason, EXIT_WORKERS_FAILED),
        )

    def worker_node(self, cluster: ClusterParts) -> WorkerNode:
        return WorkerNode(
            self.config,
            self.supervisor(),
            cluster.queue,
            cluster.ledger,
            cluster.directory,
            cluster.store,
            cluster.node_id,
        )


def _local_service(pool: _Pool) -> Service:
    """One machine: the supervisor's in-process queue, SQLite records."""
    config = pool.config
    supervisor = pool.supervisor()
    store = ResultStore(expand_path(config.results.dir))
    interrupted = store.fail_interrupted()
    if interrupted:
        log.warning("%d job(s) were queued or running when the service last stopped: marked failed", interrupted)
    store.remove_all_inputs()
    jobs = JobManager(config, store, supervisor)
    catalogue = LoraCatalogue.from_config(config)  # reads nothing until a request needs it
    return Service(
        config=config, modes=pool.modes, supervisor=supervisor, jobs=jobs, store=store, stop=pool.stop, loras=catalogue
    )


def _cluster_service(pool: _Pool) -> Service:
    """An API node of a cluster (role api), with a worker node in the same process (role all)."""
    config = pool.config
    cluster = ClusterParts.connect(config)
    dispatcher = ClusterDispatcher(
        config, cluster.queue, cluster.ledger, cluster.follower(), cluster.directory, cluster.node_id
    )
    node = pool.worker_node(cluster) if config.runs_workers else None
    cluster.store.remove_all_inputs()  # this node's own inputs folder: another node's are elsewhere
    jobs = JobManager(config, cluster.store, dispatcher, cluster=dispatcher)
    log.info("cluster node %s (role %s) on Redis %s", cluster.node_id, config.cluster.role, cluster.queue.where)
    return Service(
        config=config,
        modes=pool.modes,
        supervisor=dispatcher,
        jobs=jobs,
        store=cluster.store,
        stop=pool.stop,
        loras=LoraCatalogue.from_config(config),
        node=node,
        cluster=cluster,
    )


def create_worker_node_app(
    config: Config, *, devices: list[str] | None = None, worker_target: WorkerTarget | None = None
) -> FastAPI:
    """A worker node (cluster.role worker): its supervisor and workers, fed from the cluster queue. Its HTTP port
    serves only what operators ask of it: /health, /ready (a worker loaded and Redis reachable), /status (its pool)
    and /metrics (its pool, its GPUs, the jobs it ran) — with no API keys: keep it on a private network."""
    pool = _Pool.of(config, devices, worker_target)
    cluster = ClusterParts.connect(config)
    node = pool.worker_node(cluster)
    service = NodeService(config=config, node=node, cluster=cluster, stop=pool.stop)
    # Its own pool, its GPUs (NVML on this host) and the jobs it ran: an API node sees none of its host's GPUs.
    metrics = Metrics(node.supervisor, pool.modes, config.defaults.priority)
    node.listeners.append(metrics.on_job_event)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.uses_embedded_model:
            log.warning(
                "model.path is empty: this node serves the EMBEDDED RANDOM-WEIGHT TEST MODEL (images are noise)"
            )
        if config.server.metrics_port:
            metrics.serve_on_port(config.server.host, config.server.metrics_port)
        cluster.store.remove_all_inputs()  # this node's own inputs folder: another node's are elsewhere
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)
            await asyncio.to_thread(metrics.close)

    app = FastAPI(title="GenServe worker node", version=__version__, lifespan=lifespan, openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(node_routes.router)
    app.include_router(metrics_routes.router)
    return app


def _warn_if_exposed(config: Config, keyring: KeyRing) -> None:
    if keyring.enabled:
        log.info("API keys required on every route but /health and /ready (%d key(s))", len(keyring.names()))
        return
    if config.server.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "!!! GenServe listens on %s WITHOUT API KEYS: anyone who can reach this port can spend your GPUs. "
            "Configure auth.keys, auth.keys_file or GENSERVE_API_KEYS. !!!",
            config.server.host,
        )
