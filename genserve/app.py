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

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from genserve import __version__
from genserve.auth import OPEN_PATHS, KeyRing, authorize
from genserve.config import Config, ConfigError, expand_path
from genserve.devices import resolve_devices
from genserve.docs import install_docs
from genserve.http_errors import install_error_handlers
from genserve.job_manager import JobManager
from genserve.loras import LoraCatalogue
from genserve.metrics import Metrics
from genserve.middleware import BodyCap, BodySizeLimit
from genserve.request_log import RequestLog
from genserve.retention import Retention
from genserve.routes import compat, loras, native, openai, process
from genserve.routes import jobs as jobs_routes
from genserve.routes import metrics as metrics_routes
from genserve.routes.ui import install_ui
from genserve.service import EXIT_WORKERS_FAILED, Service, StopControl
from genserve.startup_checks import hardware_problems
from genserve.store import ResultStore
from genserve.supervisor import Supervisor, WorkerTarget

log = logging.getLogger(__name__)


def create_app(
    config: Config, *, devices: list[str] | None = None, worker_target: WorkerTarget | None = None
) -> FastAPI:
    keyring = KeyRing.from_config(config)
    _warn_if_exposed(config, keyring)
    modes, notes = config.served_modes()
    for note in notes:
        log.warning(note)
    devices = devices if devices is not None else resolve_devices(config)
    problems = hardware_problems(config, devices)
    if problems:
        raise ConfigError("settings this hardware cannot run: " + "; ".join(problems))
    store = ResultStore(expand_path(config.results.dir))
    interrupted = store.fail_interrupted()
    if interrupted:
        log.warning("%d job(s) were queued or running when the service last stopped: marked failed", interrupted)
    store.remove_all_inputs()
    stop = StopControl()
    supervisor = Supervisor(
        config,
        devices,
        modes,
        worker_target=worker_target,
        on_fatal=lambda reason: stop.request(reason, EXIT_WORKERS_FAILED),
    )
    jobs = JobManager(config, store, supervisor)
    metrics = Metrics(supervisor, modes, config.defaults.priority)
    jobs.listeners.append(metrics.on_job_event)
    catalogue = LoraCatalogue.from_config(config)  # reads nothing until a request needs it
    service = Service(
        config=config, modes=modes, supervisor=supervisor, jobs=jobs, store=store, stop=stop, loras=catalogue
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.uses_embedded_model:
            log.warning(
                "model.path is empty: serving the EMBEDDED RANDOM-WEIGHT TEST MODEL (images are noise); "
                "point model.path at a FLUX.1-dev folder for real images"
            )
        if config.server.metrics_port:  # first: a port that cannot be bound stops the start before any worker
            metrics.serve_on_port(config.server.host, config.server.metrics_port)
        log.info("starting %d worker(s) on %s; modes: %s", len(devices), ", ".join(devices), ", ".join(modes))
        jobs.start()
        supervisor.start()
        retention = Retention(config, store)
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
