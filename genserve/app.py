"""The FastAPI application of the API process: wiring only — the service object, lifespan, routes, error handlers.

The lifespan starts the supervisor (which spawns the workers and returns at once, so /health answers while
pipelines load) and, on shutdown, stops it off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from genserve import __version__
from genserve.config import Config
from genserve.devices import resolve_devices
from genserve.http_errors import install_error_handlers
from genserve.routes import native
from genserve.service import Service
from genserve.supervisor import Supervisor, WorkerTarget

log = logging.getLogger(__name__)


def create_app(
    config: Config, *, devices: list[str] | None = None, worker_target: WorkerTarget | None = None
) -> FastAPI:
    modes, notes = config.served_modes()
    for note in notes:
        log.warning(note)
    devices = devices if devices is not None else resolve_devices(config)
    supervisor = Supervisor(config, devices, modes, worker_target=worker_target)
    service = Service(config=config, modes=modes, supervisor=supervisor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.uses_embedded_model:
            log.warning(
                "model.path is empty: serving the EMBEDDED RANDOM-WEIGHT TEST MODEL (images are noise); "
                "point model.path at a FLUX.1-dev folder for real images"
            )
        log.info("starting %d worker(s) on %s; modes: %s", len(devices), ", ".join(devices), ", ".join(modes))
        supervisor.start()
        try:
            yield
        finally:
            log.info("shutting down workers")
            await asyncio.to_thread(supervisor.shutdown)

    app = FastAPI(
        title="GenServe",
        version=__version__,
        description="FLUX.1-dev image generation from a pool of GPU worker processes.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(native.router)
    return app
