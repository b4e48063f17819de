"""Fault tolerance of a cluster (cluster.backend redis), through real HTTP and real processes: a worker node killed
with kill -9, a worker that dies twice under one job, Redis restarted under load, a job that ends while Redis is
away, a worker node stopped gracefully while it holds a job.

One cluster serves the whole module (tests/cluster.py): an API node and worker node w1 on threads of this process,
worker nodes w2 and w3 as subprocesses (a test signals their process groups). Every node starts once: the tests run
in file order and the last two take nodes away (w3 is stopped gracefully, then w2 is killed), so each test says
which nodes it expects. Jobs that must be running somewhere are gated (tests/fault_worker.py): GET /jobs/{id} names
the node that holds each one, so every kill and stop lands on a known job.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import redis
import requests
from PIL import Image

from tests.cluster import LEASE_S, Cluster, cluster_redis, make_cluster, wait_for_workers
from tests.conftest import Gates
from tests.server import GenServeProcess, wait_until

__all__ = ["cluster_redis", "make_cluster"]  # the fixtures, imported for pytest

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
OUTAGE_S = 2 * LEASE_S  # Redis stays away longer than a lease: every lease taken before the outage has run out
WAIT_S = 120  # generous: the machine's two cores are shared with the workers of every node


@dataclass
class Nodes:
    cluster: Cluster
    api: GenServeProcess
    workers: dict[str, GenServeProcess]  # by node id
    gates: list[str] = field(default_factory=list)  # every gate made, opened when the module ends

    def gate(self) -> str:
        name = Gates().new()
        self.gates.append(name)
        return name

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.cluster.redis.url, socket_timeout=5)


@pytest.fixture(scope="module")
def nodes(make_cluster: Callable[..., Cluster]) -> Iterator[Nodes]:
    cluster: Cluster = make_cluster()
    # The subprocess nodes start first, on threads: their imports overlap with the two in-process starts.
    extra = {"w2": None, "w3": {"server": {"shutdown_grace_s": 1}}}
    started: dict[str, GenServeProcess] = {}
    starters = [
        threading.Thread(target=lambda n=name: started.update({n: cluster.start("worker", n, extra=extra[n])}))
        for name in extra
    ]
    for starter in starters:
        starter.start()
    api = cluster.start("api", "api", in_process=True, wait_ready=False)
    w1 = cluster.start("worker", "w1", in_process=True)
    for starter in starters:
        starter.join(timeout=300)
    assert set(started) == set(extra), "a subprocess worker node did not start"
    wait_for_workers(api, 3)
    made = Nodes(cluster, api, {"w1": w1, **started})
    yield made
    for name in made.gates:  # no gated worker is left holding a job, whatever failed
        Gates().open(name)


# --- helpers ---------------------------------------------------------------------------------------------------


def view(api: GenServeProcess, task_id: str) -> dict[str, Any]:
    response = requests.get(f"{api.url}/jobs/{task_id}", timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def submit(api: GenServeProcess, prompt: str, **fields: Any) -> str:
    response = requests.post(f"{api.url}/jobs", json={**SMALL, **fields, "prompt": prompt}, timeout=30)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def held_at(api: GenServeProcess, task_id: str, node: str | None = None) -> str:
    """Until the job runs on a worker (which reported its start: a gated job now waits at its gate); its node."""

    def running() -> str | None:
        job = view(api, task_id)
        assert job["status"] in ("queued", "running"), job
        if job["status"] == "running" and job["started_at"] and job.get("node") and node in (None, job["node"]):
            return str(job["node"])
        return None

    return wait_until(running, WAIT_S, 0.1, f"job {task_id} to run" + (f" on {node}" if node else ""))


def status_is(api: GenServeProcess, task_id: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = view(api, task_id)
        return job if job["status"] == status else None

    return wait_until(reached, WAIT_S, 0.1, f"job {task_id} to be {status}")


def completed(api: GenServeProcess, task_id: str) -> dict[str, Any]:
    job = api.completed_job(task_id, timeout=WAIT_S)
    assert job["error"] is None and job["result_url"] == f"/image/{task_id}", job
    return job


def node_ids(api: GenServeProcess) -> set[str]:
    return {node["node_id"] for node in api.status()["nodes"]}


def ready(server: GenServeProcess) -> requests.Response:
    return requests.get(f"{server.url}/ready", timeout=10)


def attempts(nodes: Nodes, task_id: str) -> int | None:
    """How many times a lost lease put the job back (the queue's ``attempts`` hash, genserve.cluster.redis_queue);
    None once the job has left the queue."""
    with nodes.redis() as client:
        value = client.hget(nodes.cluster.prefix + "attempts", task_id)
    return None if value is None else int(value)


def hold_every_worker(nodes: Nodes, live: list[str]) -> dict[str, tuple[str, str]]:
    """One gated job on each live worker node: {node: (job id, gate)}."""
    jobs = [(submit(nodes.api, Gates.marker(gate)), gate) for gate in (nodes.gate() for _ in live)]
    by_node = {held_at(nodes.api, task_id): (task_id, gate) for task_id, gate in jobs}
    assert set(by_node) == set(live), by_node  # a node with a spare worker claims: one job each
    return by_node


class EventReader:
    """GET /jobs/{id}/events on a thread: the SSE events as (kind, data), up to the terminal one."""

    def __init__(self, api: GenServeProcess, task_id: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._response = requests.get(f"{api.url}/jobs/{task_id}/events", stream=True, timeout=(10, WAIT_S))
        assert self._response.status_code == 200, self._response.text
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        kind = ""
        for line in self._response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                self.events.append((kind, json.loads(line.removeprefix("data: "))))
                if kind in ("completed", "failed", "canceled"):
                    return

    def join(self) -> list[tuple[str, dict[str, Any]]]:
        self._thread.join(timeout=WAIT_S)
        assert not self._thread.is_alive(), f"no terminal event: {self.events}"
        self._response.close()
        return self.events


def assert_names_redis(body: dict[str, Any], text: str, nodes: Nodes) -> None:
    where = f"127.0.0.1:{nodes.cluster.redis.port}"
    assert "Redis" in text and where in text, body


# --- Redis away -------------------------------------------------------------------------------------------------


def test_redis_restart_under_load_loses_no_accepted_job_and_refuses_new_ones_plainly(nodes: Nodes) -> None:
    """Nodes w1, w2, w3: three jobs running (gated), three queued; Redis stops and starts again."""
    api, cluster = nodes.api, nodes.cluster
    running = hold_every_worker(nodes, ["w1", "w2", "w3"])
    queued = [submit(api, f"queued before the outage {index}") for index in range(3)]
    assert all(view(api, task_id)["status"] == "queued" for task_id in queued)
    readers = {task_id: EventReader(api, task_id) for task_id, _ in running.values()}

    cluster.redis.stop()
    try:
        stopped_at = time.monotonic()
        # The API node says why it cannot take jobs: its Redis, by address.
        refused = wait_until(lambda: not (body := ready(api).json())["ready"] and body, 30, 0.1, "API /ready 503")
        assert ready(api).status_code == 503
        assert_names_redis(refused, refused["reason"], nodes)
        answer = requests.post(f"{api.url}/jobs", json={**SMALL, "prompt": "during the outage"}, timeout=30)
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["success"] is False and body["error_type"] in ("unavailable", "not_ready"), body
        assert_names_redis(body, body["error"], nodes)
        assert int(answer.headers["Retry-After"]) >= 1
        # A worker node's own readiness says the same.
        node_ready = ready(nodes.workers["w1"])
        assert node_ready.status_code == 503, node_ready.text
        assert node_ready.json()["ready"] is False and node_ready.json()["node_id"] == "w1"
        assert_names_redis(node_ready.json(), node_ready.json()["reason"], nodes)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
    finally:
        cluster.redis.start()

    wait_until(lambda: ready(api).status_code == 200, 30, 0.1, "API /ready 200 once Redis is back")
    wait_until(lambda: ready(nodes.workers["w1"]).status_code == 200, 30, 0.1, "w1 /ready 200 once Redis is back")
    after = submit(api, "after the outage")
    time.sleep(LEASE_S)  # the janitors run again meanwhile: a lease they took from a live node would show now
    for _, gate in running.values():
        Gates().open(gate)
    for node, (task_id, _) in running.items():
        assert completed(api, task_id)["node"] == node, (node, view(api, task_id))
        # Never back in the queue: the outage took no lease from a live node, so nothing was stopped or ran twice.
        kinds = [kind for kind, _ in readers[task_id].join()]
        assert kinds[0] == "started" and kinds[-1] == "completed" and "queued" not in kinds, readers[task_id].events
        assert kinds.count("started") == 1, readers[task_id].events
    for task_id in [*queued, after]:
        completed(api, task_id)


def test_job_that_ends_while_redis_is_down_is_reported_when_it_is_back(nodes: Nodes) -> None:
    """Nodes w1, w2, w3: a gated job ends on its worker while Redis is away; its node keeps the result."""
    api, cluster = nodes.api, nodes.cluster
    gate = nodes.gate()
    task_id = submit(api, Gates.marker(gate), seed=11)
    node = nodes.workers[held_at(api, task_id)]
    reader = EventReader(api, task_id)

    cluster.redis.stop()
    try:
        stopped_at = time.monotonic()
        Gates().open(gate)

        def finished_here() -> bool:
            status = node.status()  # the node's own /status: its pool, and the jobs it holds
            idle = all(worker["state"] == "ready" for worker in status["workers"])
            return idle and task_id in status["node"]["held_jobs"]

        # Its worker is done with it; the node holds the result until Redis takes the report.
        wait_until(finished_here, WAIT_S, 0.1, "the worker to finish the job while Redis is down")
        assert view(api, task_id)["status"] == "running"  # nobody else has heard of it yet
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
    finally:
        cluster.redis.start()

    job = completed(api, task_id)
    assert job["node"] == node.status()["node"]["node_id"] and job["result"] is not None
    kinds = [kind for kind, _ in reader.join()]
    assert kinds[0] == "started" and kinds[-1] == "completed" and "queued" not in kinds, reader.events
    time.sleep(LEASE_S)  # the janitors run again meanwhile: the job's lease must not be taken back now
    later = view(api, task_id)
    assert later["status"] == "completed" and later["started_at"] == job["started_at"], later  # not run again
    assert attempts(nodes, task_id) is None  # its lease was dropped when its end was reported
    image = requests.get(f"{api.url}/image/{task_id}", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    wait_until(lambda: task_id not in node.status()["node"]["held_jobs"], 30, 0.1, "the node to let go of the job")


# --- workers and nodes lost -------------------------------------------------------------------------------------


def test_job_whose_worker_dies_twice_is_requeued_once_then_fails_with_worker_died(nodes: Nodes) -> None:
    """Nodes w1, w2, w3: a job that kills its worker process ([crash]) is re-queued once by its node's
    supervisor (onto the respawned worker), and fails the second time with error type worker_died."""
    api = nodes.api
    gate = nodes.gate()
    task_id = submit(api, f"{Gates.marker(gate)} [crash]")
    node_id = held_at(api, task_id)
    node = nodes.workers[node_id]
    restarts = node.status()["concurrent_manager"]["total_restarts"]
    reader = EventReader(api, task_id)
    Gates().open(gate)
    events = reader.join()

    job = status_is(api, task_id, "failed")
    assert job["error"]["type"] == "worker_died", job
    assert "twice" in job["error"]["message"] and "not retried again" in job["error"]["message"], job
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "failed", events
    requeues = [data for kind, data in events if kind == "queued"]
    assert len(requeues) == 1, events
    assert "died" in requeues[0]["requeued_because"] and node_id in requeues[0]["requeued_because"], requeues
    # Once before the first death, once on the respawned worker of the same node.
    assert [data.get("node") for kind, data in events if kind == "started"] == [node_id, node_id], events
    assert job["node"] == node_id
    assert events[-1][1]["error"]["type"] == "worker_died"
    # Two deaths, two respawns; the node serves on (no poison-job loop), and so does the cluster.
    wait_until(
        lambda: node.status()["concurrent_manager"]["total_restarts"] >= restarts + 2, WAIT_S, 0.1, "two respawns"
    )
    wait_for_workers(api, 3)


def test_graceful_stop_of_a_worker_node_gives_its_job_back_without_spending_an_attempt(nodes: Nodes) -> None:
    """Nodes w1, w2, w3: w3 (server.shutdown_grace_s 1) is stopped with SIGTERM while its worker holds a job
    that outlives the grace; the job goes back to the queue, not failed, and completes on w1. w3 is gone after."""
    api = nodes.api
    held = hold_every_worker(nodes, ["w1", "w2", "w3"])
    task_id, gate = held["w3"]
    reader = EventReader(api, task_id)

    assert nodes.workers["w3"].stop() == 0
    job = status_is(api, task_id, "queued")  # given back at the end of the grace, not failed
    assert job["error"] is None and job.get("node") is None, job
    assert attempts(nodes, task_id) == 0  # no worker failed it: its one retry after a lost node is still there
    assert "w3" not in node_ids(api)  # a node that stops cleanly leaves the directory at once

    Gates().open(held["w1"][1])  # w1 ends its job and takes the given-back one, which waits at its gate
    assert held_at(api, task_id) == "w1"
    Gates().open(gate)
    assert completed(api, task_id)["node"] == "w1"
    events = reader.join()
    moves = [kind for kind, data in events if kind != "progress" and (kind != "queued" or "requeued_because" in data)]
    assert moves == ["started", "queued", "started", "completed"], events  # (its places in line left out)
    assert [data.get("node") for kind, data in events if kind == "started"] == ["w3", "w1"], events
    assert "w3 shut down" in next(data for kind, data in events if kind == "queued")["requeued_because"], events
    Gates().open(held["w2"][1])
    assert completed(api, held["w2"][0])["node"] == "w2"
    assert completed(api, held["w1"][0])["node"] == "w1"


def test_kill_9_of_a_worker_node_under_load_loses_no_job(nodes: Nodes) -> None:
    """Nodes w1, w2 (w3 was stopped): w2 and every process of it are killed with SIGKILL while its worker holds
    a job and more wait; its job comes back when its lease runs out and completes on w1, as does everything else."""
    api, w2 = nodes.api, nodes.workers["w2"]
    assert node_ids(api) == {"w1", "w2"}
    held = hold_every_worker(nodes, ["w1", "w2"])
    queued = [submit(api, f"queued behind the kill {index}") for index in range(3)]
    assert all(view(api, task_id)["status"] == "queued" for task_id in queued)
    lost, lost_gate = held["w2"]
    processes = [psutil.Process(pid) for pid in w2.worker_pids()]

    w2.signal_group(signal.SIGKILL)
    assert w2.process is not None and w2.process.wait(timeout=30) == -signal.SIGKILL
    wait_until(lambda: not any(process.is_running() for process in processes), 30, 0.1, "w2's workers to die")
    # The API node stops listing the dead node once its reports go stale (stale_s: lease_s here).
    wait_until(lambda: "w2" not in node_ids(api), LEASE_S + 4, 0.1, "the dead node to leave /status")
    assert {worker["node"] for worker in api.status()["workers"]} == {"w1"}
    # Its lease runs out: the job is back in the queue (at the head), its one retry spent.
    job = status_is(api, lost, "queued")
    assert job["error"] is None, job
    assert attempts(nodes, lost) == 1

    Gates().open(lost_gate)
    Gates().open(held["w1"][1])
    back = completed(api, lost)
    assert back["node"] == "w1"
    for task_id in [held["w1"][0], *queued]:
        job = completed(api, task_id)
        assert job["node"] == "w1"
        if task_id in queued:  # the lost job went back to the head of the queue: ahead of those that waited
            assert back["started_at"] < job["started_at"], (back, job)
    failed = requests.get(f"{api.url}/jobs", params={"status": "failed", "limit": "500"}, timeout=30).json()["jobs"]
    ours = {lost, held["w1"][0], *queued}
    assert not [job for job in failed if job["task_id"] in ours]
