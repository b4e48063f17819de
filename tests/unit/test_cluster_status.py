"""An API node's view of the cluster (ClusterDispatcher's status) against a real redis-server: worker nodes'
reports become /status, /ready and admission; a node that goes silent drops out; restarts never count down;
Redis down is said plainly and refuses new jobs."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from genserve.cluster.dispatcher import ClusterDispatcher
from genserve.cluster.wiring import ClusterParts
from genserve.config import Config, load_config
from genserve.errors import NotReady
from genserve.jobs import Job
from genserve.messages import JobRequest
from genserve.supervisor import Supervisor
from tests.redis_server import RedisServer, redis_server
from tests.server import free_port

__all__ = ["redis_server"]  # the fixture, imported for pytest


def cluster_config(url: str, tmp: str) -> Config:
    environ = {
        "GENSERVE_REDIS_URL": url,
        "GENSERVE_ROLE": "api",
        "GENSERVE_NODE_ID": "api-test",
        "GENSERVE_CLUSTER__PREFIX": f"test:{uuid.uuid4().hex[:8]}:",
        "GENSERVE_CLUSTER__NODE_REPORT_S": "0.2",
        "GENSERVE_CLUSTER__LEASE_S": "1",
        "GENSERVE_CLUSTER__SOCKET_TIMEOUT_S": "1.5",
        "GENSERVE_RESULTS_DIR": tmp,
    }
    return load_config(None, environ)


def pool_report(config: Config, states: list[str], restarts: int = 0) -> dict[str, Any]:
    """What a worker node publishes: a real supervisor's /status (never started), its workers in ``states``."""
    status = Supervisor(config, ["cpu"] * len(states), ("text2img",)).status()
    report = copy.deepcopy(status)
    for worker, state in zip(report["workers"], states, strict=True):
        worker["state"] = state
    report["status"] = "running" if all(state in ("ready", "busy") for state in states) else "degraded"
    report["reason"] = None if report["status"] == "running" else "1 of 2 worker(s) restarting: worker 1: exited"
    report["concurrent_manager"]["total_restarts"] = restarts
    return report


@pytest.fixture
def api(redis_server: RedisServer, tmp_path: Any) -> Iterator[tuple[ClusterDispatcher, ClusterParts, Config]]:
    config = cluster_config(redis_server.url, str(tmp_path))
    parts = ClusterParts.connect(config)
    dispatcher = ClusterDispatcher(config, parts.queue, parts.ledger, parts.follower(), parts.directory, "api-test")
    try:
        yield dispatcher, parts, config
    finally:
        dispatcher.shutdown()
        parts.close()


def tiny_job() -> Job:
    request = JobRequest(
        job_id=uuid.uuid4().hex,
        mode="text2img",
        prompt="x",
        width=64,
        height=64,
        num_inference_steps=1,
        guidance_scale=1.0,
        seed=1,
        strength=1.0,
        input_image=None,
        mask_image=None,
        control_image=None,
        control_mode=None,
        controlnet_conditioning_scale=0.0,
        output_path="",
    )
    return Job.create(request, priority=0, timeout_s=60)


def test_worker_nodes_reports_make_the_cluster_status(api: tuple[ClusterDispatcher, ClusterParts, Config]) -> None:
    dispatcher, parts, config = api
    dispatcher._refresh_status()
    assert dispatcher.status()["status"] == "starting" and dispatcher.ready_count() == 0
    with pytest.raises(NotReady, match="no worker node has reported"):
        dispatcher.submit_all([tiny_job()])

    parts.directory.publish("gpu-b", pool_report(config, ["ready", "dead"], restarts=2), ever_ready=True)
    parts.directory.publish("gpu-a", pool_report(config, ["busy", "ready"]), ever_ready=True)
    dispatcher._refresh_status()
    status = dispatcher.status()
    assert status["status"] == "degraded" and "node gpu-b: 1 of 2 worker(s) restarting" in status["reason"]
    assert [node["node_id"] for node in status["nodes"]] == ["gpu-a", "gpu-b"]
    assert [(worker["node"], worker["slot"], worker["state"]) for worker in status["workers"]] == [
        ("gpu-a", 0, "busy"),
        ("gpu-a", 1, "ready"),
        ("gpu-b", 0, "ready"),
        ("gpu-b", 1, "dead"),
    ]
    assert dispatcher.ready_count() == 3 and dispatcher.total_workers() == 4
    assert status["concurrent_manager"]["total_restarts"] == 2
    assert status["cluster"] == {"backend": "redis", "node_id": "api-test", "redis": "ok"}


def test_total_restarts_never_counts_down_when_a_node_restarts(
    api: tuple[ClusterDispatcher, ClusterParts, Config],
) -> None:
    dispatcher, parts, config = api
    parts.directory.publish("gpu-a", pool_report(config, ["ready"], restarts=3), ever_ready=True)
    dispatcher._refresh_status()
    assert dispatcher.status()["concurrent_manager"]["total_restarts"] == 3
    # The node's process is replaced: the new one counts from 0, then restarts a worker once.
    parts.directory.publish("gpu-a", pool_report(config, ["ready"], restarts=0), ever_ready=True)
    dispatcher._refresh_status()
    parts.directory.publish("gpu-a", pool_report(config, ["ready"], restarts=1), ever_ready=True)
    dispatcher._refresh_status()
    assert dispatcher.status()["concurrent_manager"]["total_restarts"] == 4


def test_a_silent_node_drops_out(api: tuple[ClusterDispatcher, ClusterParts, Config]) -> None:
    dispatcher, parts, config = api
    parts.directory.publish("gpu-a", pool_report(config, ["ready"]), ever_ready=True)
    dispatcher._refresh_status()
    assert dispatcher.ready_count() == 1
    time.sleep(parts.directory.stale_s + 0.2)  # gpu-a stops reporting: dead, hung or cut off
    dispatcher._refresh_status()
    assert dispatcher.status()["nodes"] == [] and dispatcher.ready_count() == 0
    assert dispatcher.status()["status"] == "starting"


def test_redis_down_is_said_plainly_and_refuses_new_jobs(tmp_path: Any) -> None:
    config = cluster_config(f"redis://127.0.0.1:{free_port()}/0", str(tmp_path))
    parts = ClusterParts.connect(config)
    dispatcher = ClusterDispatcher(config, parts.queue, parts.ledger, parts.follower(), parts.directory, "api-test")
    try:
        dispatcher._refresh_status()
        status = dispatcher.status()
        assert status["status"] == "unavailable" and "Redis (127.0.0.1:" in status["reason"]
        assert status["cluster"]["redis"] == status["reason"]
        with pytest.raises(NotReady, match="is unavailable") as refused:
            dispatcher.submit_all([tiny_job()])
        assert refused.value.status_code == 503 and refused.value.headers["Retry-After"] == "5"
    finally:
        dispatcher.shutdown()
        parts.close()
