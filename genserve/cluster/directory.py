"""Which worker nodes a cluster has and what their pools look like: each worker node publishes its supervisor's
/status every ``cluster.node_report_s`` into one Redis hash; API nodes read it for /status, /ready, /models and the
metrics. A node that stops reporting for ``stale_s`` is left out (it is dead or cut off; its jobs come back
through their leases), and its entry is deleted after ``FORGET_S``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from genserve.cluster.redis_queue import redis_errors, redis_where

FORGET_S = 3600.0  # a node silent this long is no longer listed at all


@dataclass(frozen=True)
class NodeReport:
    node_id: str
    at: float  # wall clock of the report
    status: dict[str, Any]  # the node's Supervisor.status()
    ever_ready: bool  # some worker of the node has been ready since it started

    @property
    def ready_workers(self) -> int:
        return sum(worker["state"] in ("ready", "busy") for worker in self.status["workers"])


class NodeDirectory:
    def __init__(self, client: redis.Redis, *, prefix: str, stale_s: float) -> None:
        self._client = client
        self._key = prefix + "nodes"
        self.stale_s = stale_s
        self._where = redis_where(client)

    def publish(self, node_id: str, status: dict[str, Any], ever_ready: bool) -> None:
        report = {"node_id": node_id, "at": time.time(), "status": status, "ever_ready": ever_ready}
        with redis_errors("node directory's", self._where):
            self._client.hset(self._key, node_id, json.dumps(report))

    def withdraw(self, node_id: str) -> None:
        """A node that stops cleanly leaves the directory at once."""
        with redis_errors("node directory's", self._where):
            self._client.hdel(self._key, node_id)

    def live_nodes(self) -> list[NodeReport]:
        """Nodes that reported within stale_s, by id; very old entries are deleted on the way."""
        with redis_errors("node directory's", self._where):
            entries = self._client.hgetall(self._key)
        now = time.time()
        live, forgotten = [], []
        for raw_id, raw in entries.items():
            report = json.loads(raw)
            age = now - float(report["at"])
            if age > FORGET_S:
                forgotten.append(raw_id)
            elif age <= self.stale_s:
                live.append(NodeReport(report["node_id"], report["at"], report["status"], report["ever_ready"]))
        if forgotten:
            with redis_errors("node directory's", self._where):
                self._client.hdel(self._key, *forgotten)
        return sorted(live, key=lambda report: report.node_id)

    def close(self) -> None:
        self._client.close()
