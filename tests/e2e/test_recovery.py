"""Worker deaths, the crash budget, orphans and shutdown — real processes killed for real.

A job that must be running when a worker is killed (or the server stopped) is gated (tests/fault_worker.py): it
holds its worker until the test opens the gate, so the kill always lands mid-job, on any machine.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import psutil
import requests

from tests.conftest import FAULT_SERVER, Gates, ServerFactory
from tests.server import GenServeProcess, decode_png, wait_until

SERVER_MODULE = FAULT_SERVER  # the shared `server` fixture runs fault-injection workers

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def job(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = requests.get(f"{server.url}/jobs/{task_id}", timeout=10).json()
    return view


def busy_worker(server: GenServeProcess, job_id: str | None = None, old_pid: int | None = None) -> dict[str, Any]:
    """Wait until the (only) worker has begun a job — a given one, on a process other than old_pid, if asked.

    Begun: the worker process itself reported the start, so the job is certainly running there (a gated job waits
    at its gate) and a kill now lands mid-job."""

    def check() -> dict[str, Any] | None:
        worker = server.status()["workers"][0]
        if worker["state"] != "busy" or (job_id and worker["current_job"] != job_id):
            return None
        if old_pid is not None and worker["pid"] == old_pid:
            return None
        if job(server, worker["current_job"])["started_at"] is None:
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


def test_killed_worker_job_is_requeued_and_completes(server: GenServeProcess, gates: Gates, gate: str) -> None:
    thread, out = generate_in_background(server, {**SMALL, "prompt": gates.marker(gate), "seed": 7})
    worker = busy_worker(server)
    os.kill(worker["pid"], signal.SIGKILL)
    # Re-queued onto the respawned worker, where it waits on the same gate again: no answer yet.
    again = busy_worker(server, job_id=worker["current_job"], old_pid=worker["pid"])
    assert job(server, worker["current_job"])["attempts"] == 2
    assert "response" not in out
    gates.open(gate)
    thread.join(timeout=300)
    response = out["response"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["task_id"] == worker["current_job"] and body["seed"] == 7
    assert decode_png(body["image_base64"]).size == (64, 64)
    status = server.status()
    assert status["concurrent_manager"]["total_restarts"] == 1
    assert status["workers"][0]["restarts"] == 1
    assert status["workers"][0]["pid"] == again["pid"] != worker["pid"]
    next_job = server.generate(width=64, height=64)
    assert next_job.status_code == 200 and next_job.json()["success"] is True


def test_job_that_kills_two_workers_fails_with_worker_died(server: GenServeProcess, gates: Gates, gate: str) -> None:
    server.wait_full_strength()
    thread, out = generate_in_background(server, {**SMALL, "prompt": gates.marker(gate)})  # never opened
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


def test_worker_that_cannot_start_spends_its_budget_keeps_retrying_and_ready_says_why(
    start_server: ServerFactory, tmp_path: Any
) -> None:
    missing = tmp_path / "no-such-flux"
    server = start_server(
        {
            "model": {"path": str(missing)},
            "workers": {"max_restarts": 2, "restart_backoff_s": 0.05, "restart_backoff_max_s": 0.5},
        },
        wait_ready=False,
    )

    def spent() -> dict[str, Any] | None:
        worker = server.status()["workers"][0]
        return worker if worker["budget_spent"] else None

    worker = wait_until(spent, 120, what="the restart budget to be spent")
    assert worker["budget_left"] == 0 and "startup failed" in worker["last_error"]
    # Never dead for good: the slot keeps trying every restart_backoff_max_s.
    wait_until(lambda: server.status()["workers"][0]["restarts"] >= worker["restarts"] + 2, 60, what="more retries")
    ready = requests.get(f"{server.url}/ready", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["status"] == "degraded"
    assert "spent their restart budget" in ready.json()["reason"] and "retry every 0.5 s" in ready.json()["reason"]
    refused = server.generate(width=64, height=64)
    assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
    assert server.status()["status"] == "degraded"


def test_on_budget_spent_exit_ends_the_service_non_zero(start_server: ServerFactory, tmp_path: Any) -> None:
    server = start_server(
        {
            "model": {"path": str(tmp_path / "no-such-flux")},
            "workers": {"max_restarts": 1, "restart_backoff_s": 0.05, "on_budget_spent": "exit"},
        },
        wait_ready=False,
    )
    assert server.process is not None
    code = server.process.wait(timeout=120)
    assert code == 70  # EXIT_WORKERS_FAILED: an orchestrator restarts the container
    log = server.log_tail(200)
    assert "spent its restart budget" in log and "on_budget_spent is exit" in log


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


def test_sigterm_finishes_the_running_job_then_stops_every_worker(
    start_server: ServerFactory, gates: Gates, gate: str
) -> None:
    server = start_server({"workers": {"cpu_workers": 2, "cpu_threads": 1}}, module=FAULT_SERVER)
    # /ready answers once one worker is ready; the second may still be loading (workers.parallel_loads).
    pids = [worker["pid"] for worker in server.wait_full_strength()["workers"]]
    assert len(pids) == 2 and all(pids)
    thread, out = generate_in_background(server, {**SMALL, "prompt": gates.marker(gate)})

    def started() -> bool:
        busy = [w["current_job"] for w in server.status()["workers"] if w["state"] == "busy"]
        return bool(busy) and job(server, busy[0])["started_at"] is not None

    wait_until(started, 60, what="a worker to begin the job")
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    # The server is draining while the gate still holds the job: it runs on through the SIGTERM.
    wait_until(
        lambda: requests.get(f"{server.url}/ready", timeout=5).json()["status"] == "stopping", 30, what="the drain"
    )
    assert "response" not in out
    gates.open(gate)
    thread.join(timeout=120)
    assert out["response"].status_code == 200, out["response"].text  # the in-flight request was allowed to finish
    assert server.process.wait(timeout=60) == 0  # a drained, clean exit
    wait_until(
        lambda: not any(psutil.pid_exists(pid) and _not_zombie(pid) for pid in pids),
        30,
        what="workers to exit",
    )
    assert "all workers stopped" in server.log_tail(200)
