"""A GenServe cluster of a tool's own (tools/bench_cluster.py, tools/chaos.py --cluster): a redis-server on a free
loopback port in a temporary folder, one API node (``cluster.role: api``) and worker nodes (``cluster.role:
worker``), each ``python -m genserve`` with a config the tool writes, all sharing one results folder
(``results.backend: local``). Every node runs in a process group of its own, so a whole node — its API process,
forkserver and workers — can be SIGKILLed at once (``Node.kill``) and started again with the same config, port and
node id (``Node.launch``), as an orchestrator restarts a crashed container.

``own_cluster`` stops everything it started whatever happens: nodes with SIGTERM (then SIGKILL to the group),
then Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from _server import REPO_ROOT, LocalServer, ServerError, free_port

INSTALL_HINT = "redis-server is not installed: apt-get install -y redis-server (Debian's package)"
DEFERRED = (signal.SIGINT, signal.SIGTERM)
NODE_STOP_S = 30.0  # SIGTERM, then this long for the drain, then SIGKILL to the node's group


class RedisProcess:
    """``redis-server`` on a free loopback port, without persistence, in a folder of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise ServerError(INSTALL_HINT)
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        # Its own session: a Ctrl-C of the tool does not reach it before the nodes are stopped.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if self.process.poll() is not None:
                    raise ServerError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise ServerError(f"redis-server did not answer PING within {timeout_s:g} s: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def version(self) -> str:
        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()

    def log_tail(self, lines: int = 10) -> str:
        log = self.folder / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


class Node(LocalServer):
    """One ``python -m genserve`` of the cluster, in a process group of its own (its pid is the group's id)."""

    def __init__(self, folder: Path, config: dict[str, Any], role: str, node_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder, config)
        self.role = role
        self.node_id = node_id
        self.launches = 0
        self._stopping: list[psutil.Process] | None = None  # between begin_stop and finish_stop

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def launch(self) -> None:
        """Start the process (again, after a kill: same config, port and node id); does not wait."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}  # the config file decides
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== launch {self.launches + 1} of node {self.node_id} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [self.python, "-m", "genserve", "--config", str(self.config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches its forkserver and workers
            )
        self.launches += 1

    def wait_ready(self, timeout_s: float) -> None:
        """Until its /ready says 200 (a worker node: a worker loaded and Redis answers); ServerError with the log's
        last lines when it exits or cannot load."""
        assert self.process is not None
        try:
            self._wait_ready(self.process, timeout_s)
        except ServerError as exc:
            raise ServerError(f"node {self.node_id}: {exc}\n--- its log, last lines ---\n{self.log_tail()}") from None

    def wait_answering(self, timeout_s: float) -> None:
        """Until /health answers (an API node is not ready before a worker node is)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"node {self.node_id} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise ServerError(f"node {self.node_id} did not answer /health within {timeout_s:g} s")
            time.sleep(0.1)

    def kill(self) -> int:
        """SIGKILL the node's whole process group (API process, forkserver, workers) and reap it; returns its pid.
        The process is never reaped before the signal, so its pid (the group id) cannot name anyone else's."""
        process = self.process
        if process is None or process.poll() is not None:
            raise ServerError(f"node {self.node_id} is not running")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return process.pid

    def stop(self, timeout_s: float = NODE_STOP_S) -> None:
        """SIGTERM (the node drains and stops its workers); past ``timeout_s`` SIGKILL to its process group (sent
        while the process is not reaped yet, so the group id is still its own); then SIGKILL to any forkserver or
        worker it left behind (psutil checks each is still the same process)."""
        self.begin_stop()
        self.finish_stop(timeout_s)

    def begin_stop(self) -> None:
        """Note the node's forkserver and workers, and send SIGTERM (once)."""
        process = self.process
        if process is None or process.poll() is not None or self._stopping is not None:
            return
        try:
            self._stopping = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            self._stopping = []
        process.send_signal(signal.SIGTERM)

    def finish_stop(self, timeout_s: float = NODE_STOP_S) -> None:
        process, members = self.process, self._stopping or []
        self._stopping = None
        if process is None:
            return
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.kill()


class Cluster:
    """A Redis, one API node and worker nodes named ``node-1``, ``node-2``, ..., sharing ``root/results``."""

    def __init__(
        self,
        root: Path,
        node_config: dict[str, Any],
        api_config: dict[str, Any] | None = None,
        *,
        lease_s: float = 2.0,
        node_report_s: float = 0.25,
    ) -> None:
        self.root = root
        self.redis = RedisProcess(root / "redis")
        self.prefix = f"genserve-{uuid.uuid4().hex[:8]}:"
        self.node_config = node_config  # config sections of every worker node
        self.api_config = api_config or {}  # ...and of the API node
        self.lease_s = lease_s
        self.node_report_s = node_report_s
        self.api: Node | None = None
        self.nodes: list[Node] = []
        self.lock = threading.Lock()  # whoever kills and restarts nodes holds it, and checks ``stopping`` first
        self.stopping = False

    def config(self, role: str, node_id: str, sections: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "cluster": {
                "backend": "redis",
                "redis_url": self.redis.url,
                "prefix": self.prefix,
                "role": role,
                "node_id": node_id,
                "lease_s": self.lease_s,
                "node_report_s": self.node_report_s,
                "socket_timeout_s": 2.0,
            },
            "results": {"dir": str(self.root / "results")},
            "server": {"shutdown_grace_s": 5},
        }
        for section, fields in sections.items():
            config.setdefault(section, {}).update(fields)
        return config

    def start(self, nodes: int, timeout_s: float) -> None:
        """Redis, ``nodes`` worker nodes (started together), then the API node; returns once the API node sees
        every worker of every node ready."""
        self.redis.start()
        started = [self.new_node() for _ in range(nodes)]
        for node in started:
            node.launch()
        self.api = Node(self.root / "api", self.config("api", "api", self.api_config), "api", "api")
        self.api.launch()
        deadline = time.monotonic() + timeout_s
        for node in started:
            node.wait_ready(max(1.0, deadline - time.monotonic()))
        self.api.wait_answering(max(1.0, deadline - time.monotonic()))
        self.wait_full(max(1.0, deadline - time.monotonic()))

    def new_node(self) -> Node:
        node_id = f"node-{len(self.nodes) + 1}"
        node = Node(self.root / node_id, self.config("worker", node_id, self.node_config), "worker", node_id)
        self.nodes.append(node)
        return node

    def add_node(self, timeout_s: float) -> Node:
        """One more worker node; returns once the API node sees all of them ready."""
        node = self.new_node()
        node.launch()
        node.wait_ready(timeout_s)
        self.wait_full(timeout_s)
        return node

    def api_status(self) -> dict[str, Any]:
        assert self.api is not None
        answer: dict[str, Any] = requests.get(f"{self.api.url}/status", timeout=10).json()
        return answer

    def problem(self, status: dict[str, Any]) -> str | None:
        """None when the API node's /status lists every worker node with all its workers ready; else what is
        missing."""
        return cluster_problem(status, [node.node_id for node in self.nodes], self.workers_per_node)

    @property
    def workers_per_node(self) -> int:
        return int(self.node_config.get("workers", {}).get("cpu_workers", 1))

    def wait_full(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        why = "no answer yet"
        while True:
            with contextlib.suppress(requests.RequestException, ValueError):
                status = self.api_status()
                why = self.problem(status) or ""
                if not why:
                    return status
            if time.monotonic() > deadline:
                raise ServerError(f"the cluster is not at full strength within {timeout_s:g} s: {why}")
            time.sleep(0.05)

    def stop(self) -> None:
        """API node first (no new jobs), worker nodes together (each drains), then Redis."""
        with self.lock:
            self.stopping = True
        with signals_deferred():  # a second Ctrl-C must not leave nodes behind
            if self.api is not None:
                self.api.stop()
            for node in self.nodes:  # SIGTERM to all first: they drain in parallel
                node.begin_stop()
            for node in self.nodes:
                node.finish_stop()
            self.redis.stop()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then raise KeyboardInterrupt); on the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number)) for sig in DEFERRED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def cluster_problem(status: dict[str, Any], node_ids: list[str], workers_per_node: int) -> str | None:
    """What keeps a cluster from full strength, as its API node's /status shows it; None at full strength."""
    if status.get("status") == "unavailable":
        return f"the API node cannot reach Redis: {status.get('reason')}"
    listed = {str(node.get("node_id")) for node in status.get("nodes") or []}
    missing = [node_id for node_id in node_ids if node_id not in listed]
    problems = [f"node {node_id} not listed" for node_id in missing]
    workers = [w for w in status.get("workers") or [] if isinstance(w, dict)]
    for node_id in node_ids:
        if node_id in missing:
            continue
        own = [w for w in workers if w.get("node") == node_id]
        not_ready = [f"slot {w.get('slot')} {w.get('state')}" for w in own if w.get("state") != "ready"]
        if len(own) != workers_per_node:
            problems.append(f"node {node_id} has {len(own)} of {workers_per_node} workers")
        elif not_ready:
            problems.append(f"node {node_id}: {', '.join(not_ready)}")
    return "; ".join(problems) or None


@contextmanager
def own_cluster(
    node_config: dict[str, Any],
    nodes: int,
    timeout_s: float,
    api_config: dict[str, Any] | None = None,
    *,
    lease_s: float = 2.0,
    keep: Path | None = None,
) -> Iterator[Cluster]:
    """A started cluster, stopped (and its temporary folder removed, unless ``keep`` names a folder to use and
    keep) whatever happens."""
    with contextlib.ExitStack() as stack:
        if keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genserve-cluster-")))
        else:
            root = keep
            root.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(root, node_config, api_config, lease_s=lease_s)
        try:
            cluster.start(nodes, timeout_s)
            yield cluster
        finally:
            cluster.stop()
