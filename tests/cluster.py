"""A real GenServe cluster for the end-to-end tests: one real redis-server (with its AOF, so it can be restarted)
and nodes started with ``cluster.backend: redis`` in a role, all on loopback, sharing one results folder.

Nodes are ``tests.server.GenServeProcess`` servers: subprocesses (a test can kill -9 a whole node, supervisor and
workers, through its process group) or, for a node no test kills, on a thread of the test process (its workers
fork from the test process's forkserver, which saves a torch import per node). Worker nodes run the
fault-injection workers (tests/fault_worker.py), so gated prompts hold a worker for exactly as long as a test
needs and prompts without a marker run the real embedded model.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.redis_server import RedisServer
from tests.server import GenServeProcess, wait_until

FAULT_SERVER = "tests.fault_server"
LEASE_S = 1.5  # short, so a killed node's jobs come back within seconds


class Cluster:
    def __init__(self, root: Path, embedded_cache: Path, redis: RedisServer, **settings: Any) -> None:
        self.root = root
        self.embedded_cache = embedded_cache
        self.redis = redis
        self.prefix = f"test-{uuid.uuid4().hex[:8]}:"  # clusters sharing the Redis keep apart
        self.results = root / "shared-results"  # the folder every node mounts (results.backend local)
        self.settings = settings  # more config sections for every node
        self.nodes: list[GenServeProcess] = []

    def overrides(self, role: str, node_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        sections: dict[str, Any] = {
            "cluster": {
                "backend": "redis",
                "redis_url": self.redis.url,
                "prefix": self.prefix,
                "role": role,
                "node_id": node_id,
                "lease_s": LEASE_S,
                "node_report_s": 0.25,
                "socket_timeout_s": 2.0,
            },
            "results": {"dir": str(self.results)},
            "server": {"shutdown_grace_s": 10},
        }
        for section, fields in {**self.settings, **(extra or {})}.items():
            sections.setdefault(section, {}).update(fields)
        return sections

    def start(
        self,
        role: str,
        node_id: str,
        *,
        in_process: bool = False,
        wait_ready: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> GenServeProcess:
        folder = self.root / node_id
        folder.mkdir(parents=True, exist_ok=True)
        module = FAULT_SERVER if role != "api" else "genserve"
        node = GenServeProcess(
            folder, self.embedded_cache, self.overrides(role, node_id, extra), module, in_process=in_process
        )
        self.nodes.append(node)
        return node.start(wait_ready=wait_ready)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def ready_workers(api: GenServeProcess) -> int:
    return int(requests.get(f"{api.url}/ready", timeout=5).json().get("ready_workers", 0))


def wait_for_workers(api: GenServeProcess, count: int, timeout: float = 120) -> None:
    """Until the API node sees ``count`` loaded workers across the cluster's nodes."""
    wait_until(lambda: ready_workers(api) >= count, timeout, 0.1, f"{count} ready workers in the cluster")


@pytest.fixture(scope="module")
def cluster_redis() -> Iterator[RedisServer]:
    """A Redis with its AOF (fsync per write), so tests may restart it and keep what was accepted."""
    server = RedisServer(appendonly=True).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def make_cluster(
    tmp_path_factory: pytest.TempPathFactory, embedded_cache: Path, cluster_redis: RedisServer
) -> Iterator[Any]:
    """Clusters on the module's Redis; every node of every cluster is stopped at the end of the module."""
    made: list[Cluster] = []

    def make(**settings: Any) -> Cluster:
        cluster = Cluster(tmp_path_factory.mktemp("cluster"), embedded_cache, cluster_redis, **settings)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
