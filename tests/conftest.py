"""Shared fixtures: the embedded model cache (built once per test session) and real GenServe servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server import GenServeProcess


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
    ) -> GenServeProcess:
        server = GenServeProcess(tmp_path_factory.mktemp("server"), embedded_cache, overrides, module, env)
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(start_server: ServerFactory) -> GenServeProcess:
    """A one-worker server with the embedded model, shared by the tests of a module."""
    return start_server()
