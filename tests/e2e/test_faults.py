"""Out of memory, hung and silent workers — faults injected into real workers (tests/fault_worker.py)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerFactory
from tests.fault_worker import SLOW_STEP_S
from tests.server import GenServeProcess, b64, png_bytes, wait_until

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def faulty(start_server: ServerFactory) -> GenServeProcess:
    return start_server(
        {
            "workers": {
                "stall_timeout_s": 1.0,
                "stall_pace_factor": 5,
                "first_step_timeout_s": 20,
                "heartbeat_interval_s": 0.2,
                "heartbeat_timeout_s": 3,
                "max_consecutive_oom": 3,
                "restart_backoff_s": 0.1,
            }
        },
        module="tests.fault_server",
        in_process=True,
    )


def worker(server: GenServeProcess) -> dict[str, Any]:
    worker: dict[str, Any] = server.status()["workers"][0]
    return worker


def test_out_of_memory_fails_only_that_job_and_the_worker_serves_on(faulty: GenServeProcess) -> None:
    before = faulty.wait_full_strength()["workers"][0]
    response = faulty.generate(prompt="[oom] a huge poster", **SMALL)
    assert response.status_code == 500
    body = response.json()
    assert body["error_type"] == "out_of_memory" and "out of memory" in body["error"]
    assert faulty.generate(prompt="a small stamp", **SMALL).status_code == 200
    after = worker(faulty)
    assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])


def test_out_of_memory_several_times_in_a_row_restarts_the_worker(faulty: GenServeProcess) -> None:
    before = faulty.wait_full_strength()["workers"][0]
    for _ in range(3):
        assert faulty.generate(prompt="[oom] again", **SMALL).json()["error_type"] == "out_of_memory"

    def restarted() -> dict[str, Any] | None:
        now = worker(faulty)
        return now if now["restarts"] == before["restarts"] + 1 and now["state"] == "ready" else None

    now = wait_until(restarted, 60, what="the worker to restart after repeated out-of-memory failures")
    assert now["pid"] != before["pid"] and "out-of-memory" in now["last_error"]
    assert faulty.generate(prompt="fresh memory", **SMALL).status_code == 200


def test_slow_steps_are_not_a_hang(faulty: GenServeProcess) -> None:
    before = faulty.wait_full_strength()["workers"][0]
    # Each step takes longer than workers.stall_timeout_s (1 s): only the pace awareness keeps it alive.
    assert SLOW_STEP_S > 1.0
    response = faulty.generate(prompt="[slow] a careful drawing", width=64, height=64, num_inference_steps=3)
    assert response.status_code == 200, response.text
    assert worker(faulty)["restarts"] == before["restarts"]


def worker_counter(server: GenServeProcess, family: str) -> float:
    """Worker 0's value of a genserve_worker_*_total counter in a /metrics scrape."""
    scrape = requests.get(f"{server.url}/metrics", timeout=10).text
    for metric in text_string_to_metric_families(scrape):
        for sample in metric.samples:
            if sample.name == family and sample.labels.get("slot") == "0":
                return float(sample.value)
    raise AssertionError(f"{family} is not in the scrape")


def test_hung_worker_is_killed_and_its_job_fails_after_hanging_twice(faulty: GenServeProcess) -> None:
    before = faulty.wait_full_strength()["workers"][0]
    hangs_before = worker_counter(faulty, "genserve_worker_hangs_total")
    restarts_before = worker_counter(faulty, "genserve_worker_restarts_total")
    response = faulty.generate(prompt="[hang] a frozen lake", timeout=180, **SMALL)
    assert response.status_code == 500, response.text
    assert response.json()["error_type"] == "worker_died"
    now = faulty.wait_full_strength()["workers"][0]
    assert now["restarts"] == before["restarts"] + 2  # hung once, re-queued, hung again on the respawn
    assert now["last_error"].startswith("hung (no step after step 1 within")
    assert now["hangs"] == before["hangs"] + 2
    assert worker_counter(faulty, "genserve_worker_hangs_total") == hangs_before + 2  # operators see it too
    assert worker_counter(faulty, "genserve_worker_restarts_total") == restarts_before + 2
    assert faulty.generate(prompt="life goes on", **SMALL).status_code == 200


def test_silent_worker_is_killed_and_respawned(faulty: GenServeProcess) -> None:
    before = faulty.wait_full_strength()["workers"][0]
    os.kill(before["pid"], signal.SIGSTOP)  # frozen whole: not even the heartbeat thread runs

    def replaced() -> dict[str, Any] | None:
        now = worker(faulty)
        return now if now["pid"] != before["pid"] and now["state"] == "ready" else None

    now = wait_until(replaced, 60, what="the silent worker to be replaced")
    assert now["restarts"] == before["restarts"] + 1
    assert now["last_error"].startswith("hung (no heartbeat for")
    assert faulty.generate(prompt="after the freeze", **SMALL).status_code == 200


def test_fatal_device_error_fails_the_job_and_restarts_the_worker_clean(faulty: GenServeProcess) -> None:
    before = faulty.wait_full_strength()["workers"][0]
    response = faulty.generate(prompt="[device-error] a broken kernel", **SMALL)
    assert response.status_code == 500, response.text
    body = response.json()
    assert body["error_type"] == "device_error" and "illegal memory access" in body["error"]

    def restarted() -> dict[str, Any] | None:
        now = worker(faulty)
        return now if now["restarts"] == before["restarts"] + 1 and now["state"] == "ready" else None

    now = wait_until(restarted, 60, what="the worker to restart with a fresh device context")
    assert now["pid"] != before["pid"] and "fatal device error" in now["last_error"]
    assert faulty.generate(prompt="a fresh context", **SMALL).status_code == 200


def test_a_worker_stopped_mid_dispatch_holds_up_nothing_and_is_found_hung(start_server: ServerFactory) -> None:
    server = start_server(
        {"workers": {"cpu_workers": 2, "cpu_threads": 1, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 8}},
        module="tests.fault_server",
        in_process=True,
    )
    stopped = server.wait_full_strength()["workers"][0]
    os.kill(stopped["pid"], signal.SIGSTOP)  # frozen whole: it reads nothing from its pipe any more
    big = b64(png_bytes((2048, 2048), (90, 120, 30)))
    submitted = requests.post(
        f"{server.url}/jobs",
        json={
            "prompt": "three large images for a frozen worker",
            "mode": "controlnet",
            "width": 2048,
            "height": 2048,
            "num_inference_steps": 1,
            "control_image": big,
            "input_image": big,
            "mask_image": big,
        },
        timeout=60,
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["task_id"]
    wait_until(lambda: worker(server)["current_job"] == job_id, 30, what="the job to go to the frozen worker")

    # The other slot gets work at once: nothing waits on the frozen worker.
    response = server.generate(prompt="meanwhile on slot 1", **SMALL)
    assert response.status_code == 200, response.text
    assert response.json()["worker_id"] == 1
    frozen = worker(server)
    assert (frozen["pid"], frozen["current_job"]) == (stopped["pid"], job_id)  # not yet declared hung

    def replaced() -> dict[str, Any] | None:
        now = worker(server)
        return now if now["pid"] != stopped["pid"] and now["last_error"] else None

    now = wait_until(replaced, 60, what="the frozen worker to be found hung and replaced")
    assert now["last_error"].startswith("hung (no heartbeat for 8 s)")
    requests.delete(f"{server.url}/jobs/{job_id}", timeout=30)  # its re-run is not what this test is about
    wait_until(lambda: requests.get(f"{server.url}/jobs/{job_id}", timeout=5).json()["status"] != "queued", 60)
    assert server.generate(prompt="after the freeze", **SMALL).status_code == 200
