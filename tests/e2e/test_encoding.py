"""Overlapped encoding (performance.overlap_encoding) through a real server: the worker encodes and writes one job's
PNG on its encoder thread while its main loop denoises the next job with the real pipeline.

A job whose prompt carries ``[encode-gate:NAME]`` (tests/fault_worker.py) is denoised for real and then held in the
worker's encoder until the test opens the gate, so "this job is encoding" lasts exactly as long as a test needs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import requests

from tests.conftest import FAULT_SERVER, SMALL_JOB, Gates, ServerFactory
from tests.server import GenServeProcess, wait_until

SERVER_MODULE = FAULT_SERVER  # the shared `server` fixture runs fault-injection workers
WAIT_S = 120


def submit(server: GenServeProcess, prompt: str, **fields: Any) -> str:
    answer = requests.post(f"{server.url}/jobs", json={**SMALL_JOB, **fields, "prompt": prompt}, timeout=30)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


def view(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = requests.get(f"{server.url}/jobs/{task_id}", timeout=10).json()
    return answer


def finished(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        current = view(server, task_id)
        return current if current["status"] in ("completed", "failed", "canceled") else None

    return wait_until(done, WAIT_S, 0.05, f"job {task_id} to end")


def worker(server: GenServeProcess) -> dict[str, Any]:
    state: dict[str, Any] = server.status()["workers"][0]
    return state


def wait_encoding(server: GenServeProcess, task_ids: list[str], old_pid: int | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        now = worker(server)
        return now if now["encoding_jobs"] == task_ids and now["pid"] != old_pid else None

    return wait_until(check, WAIT_S, 0.05, f"{task_ids} to be encoding")


def png_size(server: GenServeProcess, task_id: str) -> tuple[int, int]:
    from io import BytesIO

    from PIL import Image

    answer = requests.get(f"{server.url}/image/{task_id}", timeout=30)
    assert answer.status_code == 200 and answer.content[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(BytesIO(answer.content)) as image:
        size: tuple[int, int] = image.size
    return size


def test_a_job_encodes_while_the_next_one_denoises_on_the_same_worker(
    server: GenServeProcess, gates: Gates, gate: str
) -> None:
    server.wait_full_strength()
    held = submit(server, gates.encode_marker(gate), seed=1)
    wait_encoding(server, [held])
    assert worker(server)["state"] == "ready"  # the slot took new work while its encoder holds the image
    nxt = submit(server, "the next job, denoised meanwhile", seed=2, width=96, height=64)
    # The second job ran the whole real pipeline on the one worker while the first was still encoding; its image
    # waits behind the first one's (results leave in order).
    now = wait_encoding(server, [held, nxt])
    assert now["current_job"] is None
    assert view(server, held)["status"] == view(server, nxt)["status"] == "running"
    gates.open(gate)
    first, second = finished(server, held), finished(server, nxt)
    assert first["status"] == second["status"] == "completed", (first, second)
    assert first["finished_at"] <= second["finished_at"]
    assert second["started_at"] < first["finished_at"]  # the overlap
    assert png_size(server, held) == (64, 64) and png_size(server, nxt) == (96, 64)


def test_a_cancel_reaches_the_running_job_but_is_too_late_for_the_one_encoding(
    server: GenServeProcess, gates: Gates, gate: str
) -> None:
    server.wait_full_strength()
    held = submit(server, gates.encode_marker(gate))
    wait_encoding(server, [held])
    run_gate = gates.new()
    running = submit(server, gates.marker(run_gate))
    wait_until(lambda: view(server, running)["started_at"], WAIT_S, 0.05, "the second job to start")
    try:
        canceled = requests.post(f"{server.url}/jobs/{running}/cancel", timeout=30)
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
        # The encoding job's cancel answers once the job has ended: completed, since it can no longer be stopped.
        answers: dict[str, requests.Response] = {}
        late = threading.Thread(
            target=lambda: answers.update(late=requests.post(f"{server.url}/jobs/{held}/cancel", timeout=60))
        )
        late.start()
        time.sleep(1.0)  # let the cancel reach the supervisor while the job is still held
        gates.open(gate)
        late.join(60)
        answer = answers["late"]
        # 200 "completed" (the cancel was accepted, too late); 409 only if this machine was too slow to send it in time.
        assert answer.status_code in (200, 409), answer.text
        if answer.status_code == 200:
            assert answer.json()["status"] == "completed" and answer.json()["cancel_reason"] == "canceled by client"
        assert view(server, held)["status"] == "completed"
        assert png_size(server, held) == (64, 64)
        assert worker(server)["restarts"] == 0
    finally:
        gates.open(run_gate)


def test_a_worker_killed_while_encoding_reruns_the_job(server: GenServeProcess, gates: Gates, gate: str) -> None:
    before = server.wait_full_strength()["workers"][0]
    held = submit(server, gates.encode_marker(gate), seed=5)
    wait_encoding(server, [held])
    os.kill(before["pid"], signal.SIGKILL)
    # Re-queued at the head of the line, denoised again on the respawned worker, held again at the same gate.
    again = wait_encoding(server, [held], old_pid=before["pid"])
    assert again["restarts"] == before["restarts"] + 1
    gates.open(gate)
    done = finished(server, held)
    assert done["status"] == "completed", done
    assert png_size(server, held) == (64, 64)


def test_without_overlap_the_worker_encodes_before_it_takes_the_next_job(
    start_server: ServerFactory, gates: Gates, gate: str
) -> None:
    server = start_server({"performance": {"overlap_encoding": False}}, module=FAULT_SERVER, in_process=True)
    held = submit(server, gates.encode_marker(gate))
    wait_until(lambda: (view(server, held)["progress"] or {}).get("step") == 2, WAIT_S, 0.05, "its last step")
    after = submit(server, "after it")
    now = worker(server)
    assert (now["state"], now["current_job"], now["encoding_jobs"]) == ("busy", held, [])
    assert view(server, after)["status"] == "queued"
    gates.open(gate)
    first, second = finished(server, held), finished(server, after)
    assert first["status"] == second["status"] == "completed", (first, second)
    assert second["started_at"] >= first["finished_at"] - 1  # no overlap (1 s: worker and API clocks may differ)
    assert png_size(server, held) == png_size(server, after) == (64, 64)
