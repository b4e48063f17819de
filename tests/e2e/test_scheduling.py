"""The global queue through a real server: priority order, a full queue, the task timeout."""

from __future__ import annotations

import threading
from typing import Any

import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, wait_until

# Long enough on the embedded model (~5 s on 2 CPU cores) to hold the only worker while the test queues work.
BLOCKER = {"width": 1024, "height": 1024, "num_inference_steps": 80}


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


def test_queued_jobs_run_lowest_priority_value_first_fifo_within(server: GenServeProcess) -> None:
    results: dict[Any, requests.Response] = {}
    threads = [run_in_background(server, results, "blocker", **BLOCKER)]
    wait_for_busy_worker(server)
    # Submitted one at a time so their arrival order is known: (name, priority).
    arrivals = [("p5", 5), ("p1-first", 1), ("p3", 3), ("p1-second", 1), ("p-2", -2)]
    for count, (name, priority) in enumerate(arrivals, start=1):
        threads.append(run_in_background(server, results, name, priority=priority, width=64, height=64))
        wait_for_queue_size(server, count)
    for thread in threads:
        thread.join(timeout=300)
    bodies = {name: response.json() for name, response in results.items()}
    assert all(body["success"] for body in bodies.values()), bodies
    started = sorted(bodies, key=lambda name: bodies[name]["timings"]["started_at"])
    assert started == ["blocker", "p-2", "p1-first", "p1-second", "p3", "p5"]


def test_full_queue_is_429_with_retry_after_and_accepted_work_still_completes(start_server: ServerFactory) -> None:
    server = start_server({"queue": {"max_size": 2}})
    results: dict[Any, requests.Response] = {}
    threads = [run_in_background(server, results, "blocker", **BLOCKER)]
    wait_for_busy_worker(server)
    for index in range(2):
        threads.append(run_in_background(server, results, index, width=64, height=64))
        wait_for_queue_size(server, index + 1)
    refused = server.generate(width=64, height=64)
    assert refused.status_code == 429
    assert refused.json()["error_type"] == "queue_full"
    assert "queue is full" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    ready = requests.get(f"{server.url}/ready", timeout=5).json()
    assert ready["ready"] is True and ready["saturated"] is True
    for thread in threads:
        thread.join(timeout=300)
    assert [results[key].status_code for key in ("blocker", 0, 1)] == [200, 200, 200]


def test_task_timeout_is_408_and_the_worker_is_freed(start_server: ServerFactory) -> None:
    server = start_server({"queue": {"task_timeout_s": 1.5}})
    # 2048² × 100 steps runs for well over a minute on the embedded model if nobody stops it.
    response = server.generate(width=2048, height=2048, num_inference_steps=100)
    assert response.status_code == 408, response.text
    body = response.json()
    assert body["error_type"] == "timeout" and "task_timeout_s" in body["error"]
    # The job is interrupted at its next step, so the worker is idle again long before 100 steps could finish.
    status = server.wait_full_strength(timeout=20)
    assert status["workers"][0]["restarts"] == 0
    assert server.generate(width=64, height=64).status_code == 200
