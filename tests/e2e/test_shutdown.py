"""Clean shutdown through a real server: SIGTERM drains (new work 503 + Retry-After, running jobs finish within the
grace, the rest fail with JSON answers recorded in the store), workers that exit for the shutdown are no crashes,
and the process exits in time. Jobs are held busy by gates (tests/fault_worker.py), so nothing depends on speed.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from typing import Any

import psutil
import requests

from tests.conftest import Gates, ServerFactory
from tests.server import GenServeProcess, b64, png_bytes, wait_until

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
SHUTDOWN_TIMEOUT_S = 5


def start(start_server: ServerFactory, grace_s: float) -> GenServeProcess:
    return start_server(
        {"server": {"shutdown_grace_s": grace_s}, "workers": {"shutdown_timeout_s": SHUTDOWN_TIMEOUT_S}},
        module="tests.fault_server",
    )


def call_in_background(server: GenServeProcess, prompt: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def call() -> None:
        out["response"] = server.generate(timeout=120, prompt=prompt, **SMALL)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, out


def wait_for_queue(server: GenServeProcess, busy: int, queued: int) -> None:
    def reached() -> bool:
        status = server.status()
        running = sum(worker["state"] == "busy" for worker in status["workers"])
        return running == busy and status["queue"]["size"] == queued

    wait_until(reached, 60, what=f"{busy} running and {queued} queued job(s)")


def stored(server: GenServeProcess, job_id: str) -> sqlite3.Row:
    with sqlite3.connect(server.workdir / "results" / "jobs.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert row is not None, f"job {job_id} is not in the store"
    return row


def assert_json_error(response: requests.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body: dict[str, Any] = response.json()
    assert body["success"] is False and body["error_type"] == error_type, body
    return body


def wait_exit(server: GenServeProcess, timeout: float) -> tuple[int, float]:
    assert server.process is not None
    began = time.monotonic()
    code = server.process.wait(timeout=timeout)
    return code, time.monotonic() - began


def test_sigterm_drains_running_jobs_finish_queued_and_new_ones_get_503(
    start_server: ServerFactory, gates: Gates
) -> None:
    server = start(start_server, grace_s=60)
    pids = server.worker_pids()
    gate = gates.new()
    running, running_out = call_in_background(server, gates.marker(gate))
    wait_for_queue(server, busy=1, queued=0)
    queued, queued_out = call_in_background(server, "waiting its turn")
    wait_for_queue(server, busy=1, queued=1)

    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    queued.join(timeout=30)
    body = assert_json_error(queued_out["response"], 503, "shutting_down")
    assert "service shutting down" in body["error"]
    # Still listening during the drain: new work is refused in the route's own error shape, with Retry-After.
    refused = server.generate(prompt="too late", **SMALL)
    assert_json_error(refused, 503, "shutting_down")
    assert int(refused.headers["Retry-After"]) >= 1
    v1 = requests.post(f"{server.url}/v1/images/generations", json={"prompt": "too late"}, timeout=30)
    assert v1.status_code == 503 and v1.json()["error"]["code"] == "shutting_down"
    assert requests.get(f"{server.url}/ready", timeout=5).json()["status"] == "stopping"

    gates.open(gate)  # the running job may finish within the grace
    running.join(timeout=60)
    assert running_out["response"].status_code == 200, running_out["response"].text
    code, took = wait_exit(server, timeout=60)
    assert code == 0
    assert took < SHUTDOWN_TIMEOUT_S + 10
    row = stored(server, queued_out["response"].json()["task_id"])
    assert (row["status"], row["error_type"], row["cancel_reason"]) == (
        "failed",
        "shutting_down",
        "service shutting down",
    )
    assert stored(server, running_out["response"].json()["task_id"])["status"] == "completed"
    log = server.log_tail(400)
    assert "died with exit code" not in log and "respawns in" not in log.split("stopping the service")[-1]
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 30, what="workers to exit")


def test_grace_expiry_fails_the_running_job_and_a_group_sigterm_is_no_crash(
    start_server: ServerFactory, gates: Gates
) -> None:
    grace = 1.0
    server = start(start_server, grace_s=grace)
    running, out = call_in_background(server, gates.marker(gates.new()))  # never opened
    wait_for_queue(server, busy=1, queued=0)
    began = time.monotonic()
    # The whole group, workers included, as Ctrl-C in a terminal or a container runtime may do.
    server.signal_group(signal.SIGTERM)
    running.join(timeout=60)
    body = assert_json_error(out["response"], 503, "shutting_down")
    assert "shutdown_grace_s" in body["error"]
    code, _ = wait_exit(server, timeout=60)
    took = time.monotonic() - began
    assert code == 0
    assert took < grace + SHUTDOWN_TIMEOUT_S + 5  # grace + workers.shutdown_timeout_s, with room for a busy machine
    row = stored(server, body["task_id"])
    assert (row["status"], row["error_type"]) == ("failed", "shutting_down")
    log = server.log_tail(400)
    # The workers ignored the group's SIGTERM and left when told to: no crash, no re-queue, no respawn.
    assert "died with exit code" not in log
    assert "re-queueing" not in log
    assert "all workers stopped" in log


def test_a_server_with_nothing_running_stops_at_once(start_server: ServerFactory) -> None:
    server = start(start_server, grace_s=30)
    assert server.generate(prompt="one", **SMALL).status_code == 200
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    code, took = wait_exit(server, timeout=60)
    assert code == 0 and took < SHUTDOWN_TIMEOUT_S + 5  # nothing to wait for: the grace is not slept through


def test_inputs_of_finished_jobs_are_removed(start_server: ServerFactory) -> None:
    server = start(start_server, grace_s=5)

    response = server.generate(mode="img2img", input_image=b64(png_bytes((64, 64))), **SMALL)
    assert response.status_code == 200, response.text
    inputs = server.workdir / "results" / "inputs"
    wait_until(lambda: not any(inputs.iterdir()), 10, what="the job's input files to be removed")
