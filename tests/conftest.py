"""Shared fixtures: the embedded model cache (built once per test session), real GenServe servers, and gates.

Gates: a fault-injection job whose prompt carries ``[gate:NAME]`` waits until the test opens that gate (a file in
one folder for the whole session, named by FAULT_GATE_DIR). The variable is set here, at import, so that every
process started later inherits it: the forkserver workers fork from, and each server subprocess.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault_worker import GATE_ENV, encode_gate_marker, gate_marker, open_gate
from tests.server import GenServeProcess

os.environ.setdefault(GATE_ENV, tempfile.mkdtemp(prefix="genserve-gates-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e starts real servers: mark it, so ``-m "not e2e"`` runs the fast set alone."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if Path(str(item.fspath)).is_relative_to(e2e):
            item.add_marker(pytest.mark.e2e)


class Gates:
    """Named gates that gated jobs wait on; each test makes fresh names, so tests never share a gate."""

    def __init__(self) -> None:
        self.folder = Path(os.environ[GATE_ENV])

    def new(self) -> str:
        return f"gate-{uuid.uuid4().hex}"

    @staticmethod
    def marker(name: str) -> str:
        return f"{gate_marker(name)} held by the test"

    @staticmethod
    def encode_marker(name: str) -> str:
        """Denoised, then held in the worker's encoder until the gate opens."""
        return f"{encode_gate_marker(name)} held in the encoder by the test"

    def open(self, name: str) -> None:
        open_gate(self.folder, name)


@pytest.fixture
def gates() -> Gates:
    return Gates()


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded-model cache for the whole session: the first worker builds it, the rest reuse it."""
    return tmp_path_factory.mktemp("embedded-model")


ServerFactory = Callable[..., GenServeProcess]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory, embedded_cache: Path) -> Iterator[ServerFactory]:
    """Start servers with config overrides; every one is stopped at the end of the module."""
    started: list[GenServeProcess] = []

    def start(
        overrides: dict[str, Any] | None = None,
        wait_ready: bool = True,
        module: str = "genserve",
        env: dict[str, str] | None = None,
        in_process: bool = False,
    ) -> GenServeProcess:
        folder = tmp_path_factory.mktemp("server")
        server = GenServeProcess(folder, embedded_cache, overrides, module, env, in_process=in_process)
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in started:
        server.stop()


FAULT_SERVER = "tests.fault_server"
SMALL_JOB = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, start_server: ServerFactory) -> GenServeProcess:
    """A one-worker server with the embedded model, shared by the tests of a module. A module that sets
    ``SERVER_MODULE = FAULT_SERVER`` gets fault-injection workers (gated prompts hold the worker; prompts without
    a marker run the real pipeline). It runs in this process (tests/server.py) unless the module sets
    ``SERVER_IN_PROCESS = False`` (its tests need the server's own process)."""
    return start_server(
        module=getattr(request.module, "SERVER_MODULE", "genserve"),
        in_process=getattr(request.module, "SERVER_IN_PROCESS", True),
    )


@pytest.fixture
def gate(gates: Gates) -> Iterator[str]:
    """A fresh gate, opened when the test ends whatever happened, so no failure leaves a worker held."""
    name = gates.new()
    yield name
    gates.open(name)


def held(gate: str, **fields: Any) -> dict[str, Any]:
    """A small job that holds its worker until ``gate`` opens (or the job is stopped)."""
    return {**SMALL_JOB, **fields, "prompt": Gates.marker(gate)}
