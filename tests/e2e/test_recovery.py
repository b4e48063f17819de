"""Worker deaths, the crash budget, orphans and shutdown — real processes killed for real."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import psutil
import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, decode_png, wait_until

LONG_JOB = {"width": 1024, "height": 1024, "num_inference_steps": 100}


def busy_worker(server: GenServeProcess, job_id: str | None = None, old_pid: int | None = None) -> dict[str, Any]:
    """Wait until the (only) worker runs a job — a given one, on a process other than old_pid, if asked."""

    def check() -> dict[str, Any] | None:
        worker = server.status()["workers"][0]
        if worker["state"] != "busy" or (job_id and worker["current_job"] != job_id):
            return None
        if old_pid is not None and worker["pid"] == old_pid:
            return None
        return worker

    return wait_until(check, 120, what="a busy worker")


def generate_in_background(server: GenServeProcess, fields: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def call() -> None:
        out["response"] = server.generate(timeout=300, **fields)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, out


def test_killed_worker_job_is_requeued_and_completes(server: GenServeProcess) -> None:
    thread, out = generate_in_background(server, {**LONG_JOB, "seed": 7})
    worker = busy_worker(server)
    os.kill(worker["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    response = out["response"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["task_id"] == worker["current_job"]
    assert decode_png(body["image_base64"]).size == (1024, 1024)
    status = server.status()
    assert status["concurrent_manager"]["total_restarts"] == 1
    assert status["workers"][0]["restarts"] == 1
    assert status["workers"][0]["pid"] != worker["pid"]
    next_job = server.generate(width=64, height=64)
    assert next_job.status_code == 200 and next_job.json()["success"] is True


def test_job_that_kills_two_workers_fails_with_worker_died(server: GenServeProcess) -> None:
    server.wait_full_strength()
    thread, out = generate_in_background(server, LONG_JOB)
    first = busy_worker(server)
    os.kill(first["pid"], signal.SIGKILL)
    second = busy_worker(server, job_id=first["current_job"], old_pid=first["pid"])  # re-queued onto the respawn
    os.kill(second["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    response = out["response"]
    assert response.status_code == 500, response.text
    body = response.json()
    assert body["success"] is False and body["error_type"] == "worker_died"
    assert "worker died" in body["error"] and body["task_id"] == first["current_job"]
    server.wait_full_strength()
    assert server.generate(width=64, height=64).status_code == 200  # no poison-job loop: the pool serves on


def test_request_arriving_while_the_only_worker_respawns_waits_for_it(server: GenServeProcess) -> None:
    old_pid = server.wait_full_strength()["workers"][0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: server.status()["workers"][0]["state"] in ("dead", "starting"), 30, what="the death")
    response = server.generate(width=64, height=64)
    assert response.status_code == 200, response.text  # queued, not refused: the pool has served before
    assert server.status()["workers"][0]["pid"] != old_pid


def test_worker_that_cannot_start_spends_its_budget_and_ready_says_why(
    start_server: ServerFactory, tmp_path: Any
) -> None:
    missing = tmp_path / "no-such-flux"
    server = start_server(
        {"model": {"path": str(missing)}, "workers": {"max_restarts": 2, "restart_backoff_s": 0.05}},
        wait_ready=False,
    )

    def gave_up() -> dict[str, Any] | None:
        worker = server.status()["workers"][0]
        return worker if worker["gave_up"] else None

    worker = wait_until(gave_up, 120, what="the restart budget to be spent")
    assert worker["state"] == "dead" and worker["restarts"] == 2
    assert "startup failed" in worker["last_error"] and "restart budget spent" in worker["last_error"]
    ready = requests.get(f"{server.url}/ready", timeout=5)
    assert ready.status_code == 503
    assert "restart budget spent" in ready.json()["reason"]
    refused = server.generate(width=64, height=64)
    assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
    assert server.status()["status"] == "down"


def test_workers_exit_when_the_api_process_is_killed(start_server: ServerFactory) -> None:
    server = start_server()
    pids = server.worker_pids()
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    wait_until(
        lambda: not any(psutil.pid_exists(pid) and _not_zombie(pid) for pid in pids),
        30,
        what="orphaned workers to exit",
    )


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_finishes_the_running_job_then_stops_every_worker(start_server: ServerFactory) -> None:
    server = start_server({"workers": {"cpu_workers": 2, "cpu_threads": 1}})
    pids = server.worker_pids()
    assert len(pids) == 2
    thread, out = generate_in_background(server, {"width": 512, "height": 512, "num_inference_steps": 30})
    busy = wait_until(lambda: any(w["state"] == "busy" for w in server.status()["workers"]), 60, what="a busy worker")
    assert busy
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert out["response"].status_code == 200, out["response"].text  # the in-flight request was allowed to finish
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so "killed by SIGTERM" is a clean exit.
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    wait_until(
        lambda: not any(psutil.pid_exists(pid) and _not_zombie(pid) for pid in pids),
        30,
        what="workers to exit",
    )
    assert "all workers stopped" in server.log_tail(200)
