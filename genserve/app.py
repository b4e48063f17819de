"""The FastAPI application of the API process: wiring only — the service object, lifespan, routes, error handlers.

The lifespan starts the supervisor (which spawns the workers and returns at once, so /health answers while
pipelines load) and, on shutdown, stops it off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from genserve import __version__
from genserve.auth import KeyRing, authorize
from genserve.config import Config, expand_path
from genserve.devices import resolve_devices
from genserve.http_errors import install_error_handlers
from genserve.job_manager import JobManager
from genserve.middleware import BodySizeLimit
from genserve.routes import compat, native, openai, process
from genserve.routes import jobs as jobs_routes
from genserve.service import Service
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
    store = ResultStore(expand_path(config.results.dir))
    interrupted = store.fail_interrupted()
    if interrupted:
        log.warning("%d job(s) were queued or running when the service last stopped: marked failed", interrupted)
    jobs = JobManager(config, store)
    supervisor = Supervisor(
        config, devices, modes, worker_target=worker_target, on_queue_change=jobs.publish_queue_positions
    )
    jobs.attach(supervisor)
    service = Service(config=config, modes=modes, supervisor=supervisor, jobs=jobs, store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.uses_embedded_model:
            log.warning(
                "model.path is empty: serving the EMBEDDED RANDOM-WEIGHT TEST MODEL (images are noise); "
                "point model.path at a FLUX.1-dev folder for real images"
            )
        log.info("starting %d worker(s) on %s; modes: %s", len(devices), ", ".join(devices), ", ".join(modes))
        supervisor.start()
        retention = asyncio.create_task(_run_retention(config, store), name="genserve-retention")
        try:
            yield
        finally:
            retention.cancel()
            log.info("shutting down workers")
            await asyncio.to_thread(supervisor.shutdown)
            store.close()

    app = FastAPI(
        title="GenServe",
        version=__version__,
        description="FLUX.1-dev image generation from a pool of GPU worker processes.",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
    )
    app.state.service = service
    app.state.keyring = keyring
    app.add_middleware(BodySizeLimit, max_bytes=config.server.max_request_bytes)
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(jobs_routes.router)
    app.include_router(compat.router)
    app.include_router(openai.router)
    app.include_router(process.router)
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


async def _run_retention(config: Config, store: ResultStore) -> None:
    """Delete old results now and every results.cleanup_interval_s, off the event loop."""
    max_age_s = config.results.max_age_hours * 3600
    max_bytes = int(config.results.max_total_gb * 1024**3)
    while True:
        try:
            await asyncio.to_thread(store.cleanup, max_age_s, max_bytes)
        except Exception:  # a full disk or a locked database must not end retention for good
            log.exception("retention failed; trying again next round")
        await asyncio.sleep(config.results.cleanup_interval_s)
