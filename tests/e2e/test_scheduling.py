"""The global queue through a real server: priority order, a full queue, the task timeout.

The only worker is held busy by a gated job (tests/fault_worker.py) for exactly as long as a test needs, so nothing
here depends on how fast this machine runs the model.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import requests

from tests.conftest import FAULT_SERVER, Gates, ServerFactory
from tests.server import GenServeProcess, wait_until

SERVER_MODULE = FAULT_SERVER  # the shared `server` fixture runs fault-injection workers

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def run_in_background(
    server: GenServeProcess, results: dict[Any, requests.Response], key: Any, **fields: Any
) -> threading.Thread:
    def call() -> None:
        results[key] = server.generate(timeout=300, **fields)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def wait_for_busy_worker(server: GenServeProcess) -> str:
    def busy_job() -> str | None:
        worker = server.status()["workers"][0]
        return worker["current_job"] if worker["state"] == "busy" else None

    return wait_until(busy_job, 60, what="the worker to start the blocking job")


def wait_for_queue_size(server: GenServeProcess, size: int) -> None:
    wait_until(
        lambda: server.status()["concurrent_manager"]["global_queue_size"] == size,
        60,
        what=f"{size} queued jobs",
    )


def job_status(server: GenServeProcess, task_id: str) -> str:
    status: str = requests.get(f"{server.url}/jobs/{task_id}", timeout=10).json()["status"]
    return status


def test_queued_jobs_run_lowest_priority_value_first_fifo_within(
    server: GenServeProcess, gates: Gates, gate: str
) -> None:
    results: dict[Any, requests.Response] = {}
    threads = [run_in_background(server, results, "blocker", prompt=gates.marker(gate), **SMALL)]
    blocker = wait_for_busy_worker(server)
    # Submitted one at a time so their arrival order is known: (name, priority).
    arrivals = [("p5", 5), ("p1-first", 1), ("p3", 3), ("p1-second", 1), ("p-2", -2)]
    for count, (name, priority) in enumerate(arrivals, start=1):
        threads.append(run_in_background(server, results, name, prompt=name, priority=priority, **SMALL))
        wait_for_queue_size(server, count)
    expected = ["p-2", "p1-first", "p1-second", "p3", "p5"]
    # While the gate holds the worker, the queue already stands in dispatch order.
    queued = requests.get(f"{server.url}/jobs", params={"status": "queued"}, timeout=10).json()["jobs"]
    assert [item["params"]["prompt"] for item in sorted(queued, key=lambda item: item["queue_position"])] == expected
    assert job_status(server, blocker) == "running"
    gates.open(gate)
    for thread in threads:
        thread.join(timeout=300)
    bodies = {name: response.json() for name, response in results.items()}
    assert all(body["success"] for body in bodies.values()), bodies
    assert bodies["blocker"]["task_id"] == blocker
    started = sorted(bodies, key=lambda name: bodies[name]["timings"]["started_at"])
    assert started == ["blocker", *expected]


def test_full_queue_is_429_with_retry_after_and_accepted_work_still_completes(
    start_server: ServerFactory, gates: Gates, gate: str
) -> None:
    server = start_server({"queue": {"max_size": 2}}, module="tests.fault_server", in_process=True)
    results: dict[Any, requests.Response] = {}
    threads = [run_in_background(server, results, "blocker", prompt=gates.marker(gate), **SMALL)]
    wait_for_busy_worker(server)
    for index in range(2):
        threads.append(run_in_background(server, results, index, **SMALL))
        wait_for_queue_size(server, index + 1)
    refused = server.generate(**SMALL)
    assert refused.status_code == 429
    assert refused.json()["error_type"] == "queue_full"
    assert "queue is full" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    ready = requests.get(f"{server.url}/ready", timeout=5).json()
    assert ready["ready"] is True and ready["saturated"] is True
    gates.open(gate)
    for thread in threads:
        thread.join(timeout=300)
    assert [results[key].status_code for key in ("blocker", 0, 1)] == [200, 200, 200]


def test_task_timeout_is_408_and_the_worker_is_freed(start_server: ServerFactory) -> None:
    # A subprocess: the test reads the worker's own log line (an in-process server's workers log to the test's stderr)
    server = start_server({"queue": {"task_timeout_s": 1.5}}, module="tests.fault_server")
    # A [slow] job reports a step every SLOW_STEP_S (tests/fault_worker.py): 100 steps take minutes on any
    # machine, and it is still stepping when its deadline passes.
    steps = 100
    response = server.generate(prompt="[slow] past its deadline", width=64, height=64, num_inference_steps=steps)
    assert response.status_code == 408, response.text
    body = response.json()
    assert body["error_type"] == "timeout" and "task_timeout_s" in body["error"]
    # The job is interrupted at its next step, so the worker is idle again long before 100 steps could finish.
    status = server.wait_full_strength(timeout=20)
    assert status["workers"][0]["restarts"] == 0
    stopped = re.search(rf"job {body['task_id']} canceled after step (\d+) of {steps}", server.log_tail(400))
    assert stopped is not None, server.log_tail(400)
    assert 1 <= int(stopped.group(1)) < steps  # it had been stepping, and stopped at a step, not at the end
    assert server.generate(**SMALL).status_code == 200
