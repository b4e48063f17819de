"""The service object every route reaches through ``request.app.state.service`` (API process), and its life:
start, drain on a stop request, close."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from genserve.cluster.node import WorkerNode
from genserve.cluster.wiring import ClusterParts
from genserve.config import Config
from genserve.job_manager import JobManager
from genserve.loras import LoraCatalogue
from genserve.messages import Mode
from genserve.pool import JobPool
from genserve.retention import Retention
from genserve.store import JobStore

log = logging.getLogger(__name__)

EXIT_WORKERS_FAILED = 70  # process exit status when a slot spent its budget under workers.on_budget_spent: exit


@dataclass
class StopControl:
    """How any part of the service asks the HTTP server to stop gracefully, and with which exit status.

    The server runner (``genserve.__main__``) installs the handler; without one (an app run by a test client)
    a request is only recorded."""

    reason: str | None = None
    exit_code: int = 0
    _handler: Callable[[], None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def install(self, handler: Callable[[], None]) -> None:
        self._handler = handler

    def request(self, reason: str, exit_code: int = 0) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self.exit_code = reason, exit_code
        log.warning("stopping the service: %s", reason)
        if self._handler is not None:
            self._handler()


@dataclass
class Service:
    """What every route needs: the configuration, the served modes, the supervisor, the jobs and their results."""

    config: Config
    modes: tuple[Mode, ...]
    supervisor: JobPool
    jobs: JobManager
    store: JobStore
    stop: StopControl
    loras: LoraCatalogue  # the LoRAs requests may name (GET/POST /loras)
    node: WorkerNode | None = None  # cluster role all: this process's own worker node
    cluster: ClusterParts | None = None  # cluster.backend redis: the node's Redis connections

    def variation_mode(self) -> Mode:
        """What makes an image variation (OpenAI variations, /process with only an image): FLUX.1-Redux when it is
        served and openai.variation_mode asks for it, else img2img with openai.variation_prompt."""
        wanted = self.config.openai.variation_mode
        return "redux" if wanted == "redux" and "redux" in self.modes else "img2img"

    def start(self) -> None:
        """Start the job manager's threads and the pool (workers report ready later; returns at once)."""
        self.jobs.start()
        self.supervisor.start()
        if self.node is not None:
            self.node.start()
        if self.cluster is not None:
            self.cluster.janitor.start()

    def drain(self) -> None:
        """Stop taking jobs and let running ones finish within server.shutdown_grace_s (blocking; any thread)."""
        grace_s = self.config.server.shutdown_grace_s
        if self.node is not None:  # its jobs first: the clients waiting here may be waiting for them
            self.node.drain(grace_s)
        self.supervisor.drain(grace_s)

    def close(self) -> None:
        """Stop the workers, then write what is pending and close the store (blocking; after the HTTP server)."""
        if self.node is not None:
            self.node.shutdown()
        self.supervisor.shutdown()
        self.jobs.stop()
        if self.cluster is not None:
            self.cluster.janitor.stop()
            self.cluster.close()
        else:
            self.store.close()


@dataclass
class NodeService:
    """A worker node's whole service (cluster.role worker): no API, its pool fed from the cluster queue."""

    config: Config
    node: WorkerNode
    cluster: ClusterParts
    stop: StopControl
    retention: Retention | None = None  # its own results: images it made, its cache of Redis images

    def start(self) -> None:
        self.node.start()
        self.cluster.janitor.start()
        self.retention = Retention(self.config, self.cluster.store)
        self.retention.start()

    def drain(self) -> None:
        self.node.drain(self.config.server.shutdown_grace_s)

    def close(self) -> None:
        if self.retention is not None:
            self.retention.stop()
        self.node.shutdown()
        self.cluster.janitor.stop()
        self.cluster.close()


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service
