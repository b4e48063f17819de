"""The service object every route reaches through ``request.app.state.service`` (API process)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from genserve.config import Config
from genserve.job_manager import JobManager
from genserve.messages import Mode
from genserve.store import ResultStore
from genserve.supervisor import Supervisor


@dataclass
class Service:
    """What every route needs: the configuration, the served modes, the supervisor, the jobs and their results."""

    config: Config
    modes: tuple[Mode, ...]
    supervisor: Supervisor
    jobs: JobManager
    store: ResultStore


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service
