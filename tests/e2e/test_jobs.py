"""The job API against a real server: submit, poll, fetch, cancel, SSE, restart survival, retention, seeds 000/003.

The servers run fault-injection workers (tests/fault_worker.py): jobs without markers run the real pipeline, a
gated job holds the only worker until the test opens its gate (or cancels it), and a ``[slow]`` job reports a step
every SLOW_STEP_S. Nothing here depends on how fast this machine runs the model.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.conftest import FAULT_SERVER, Gates, ServerFactory, held
from tests.server import EventReader, GenServeProcess, read_events, wait_until

SERVER_MODULE = FAULT_SERVER  # the shared `server` fixture runs fault-injection workers

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def submit(server: GenServeProcess, **fields: Any) -> dict[str, Any]:
    fields.setdefault("prompt", "a lighthouse at dusk")
    response = requests.post(f"{server.url}/jobs", json=fields, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def job(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    response = requests.get(f"{server.url}/jobs/{task_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_status(server: GenServeProcess, task_id: str, *statuses: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        view = job(server, task_id)
        return view if view["status"] in statuses else None

    return wait_until(reached, timeout, what=f"job {task_id} to be {'/'.join(statuses)}")


def wait_started(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    """Running on the worker (it sent its start time); a gated job waits there, before its first step."""

    def started() -> dict[str, Any] | None:
        view = job(server, task_id)
        return view if view["status"] == "running" and view["started_at"] is not None else None

    return wait_until(started, 60, what=f"job {task_id} to start")


def wait_stepping(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    """Running and past its first denoising step."""

    def stepping() -> dict[str, Any] | None:
        view = job(server, task_id)
        return view if view["status"] == "running" and (view["progress"] or {}).get("step", 0) >= 1 else None

    return wait_until(stepping, 60, what=f"job {task_id} to finish a step")


def test_submit_poll_and_fetch_the_image(server: GenServeProcess) -> None:
    accepted = submit(server, seed=5, **SMALL)
    task_id = accepted["task_id"]
    assert accepted["status"] in ("queued", "running")
    assert accepted["status_url"] == f"/jobs/{task_id}" and accepted["result_url"] == f"/image/{task_id}"
    assert accepted["events_url"] == f"/jobs/{task_id}/events" and accepted["cancel_url"] == f"/jobs/{task_id}/cancel"
    done = wait_status(server, task_id, "completed")
    assert done["params"]["prompt"] == "a lighthouse at dusk" and done["params"]["seed"] == 5
    assert done["worker"] == 0 and done["device"] == "cpu"
    assert done["submitted_at"] <= done["started_at"] <= done["finished_at"]
    assert done["result"]["seed"] == 5 and (done["result"]["width"], done["result"]["height"]) == (64, 64)
    image = requests.get(f"{server.url}{done['result_url']}", timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert len(image.content) == done["result"]["images"][0]["bytes"]


def test_image_can_be_reencoded_on_request(server: GenServeProcess) -> None:
    task_id = submit(server, **SMALL)["task_id"]
    wait_status(server, task_id, "completed")
    for fmt, pil_name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        response = requests.get(f"{server.url}/image/{task_id}", params={"format": fmt, "quality": 70}, timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == f"image/{fmt}"
        assert Image.open(io.BytesIO(response.content)).format == pil_name
    bad = requests.get(f"{server.url}/image/{task_id}", params={"format": "gif"}, timeout=10)
    assert bad.status_code == 400


def test_queue_positions_shrink_and_events_arrive_in_order(server: GenServeProcess, gates: Gates) -> None:
    # Each job ahead of the watched one is held by its own gate, so the watched job moves up one place at a time.
    ahead = [gates.new() for _ in range(3)]
    blocker = submit(server, **held(ahead[0]))["task_id"]
    wait_started(server, blocker)
    waiting = [submit(server, **held(ahead[1]))["task_id"], submit(server, **held(ahead[2]))["task_id"]]
    waiting.append(submit(server, **SMALL)["task_id"])
    assert [job(server, task_id)["queue_position"] for task_id in waiting] == [0, 1, 2]
    reader = EventReader(server, waiting[2])
    try:
        for place, name in zip((2, 1, 0), ahead, strict=True):
            reader.wait_for(
                f"queue position {place}",
                lambda events, place=place: any(k == "queued" and d["queue_position"] == place for k, d in events),
            )
            gates.open(name)
    finally:
        for name in ahead:
            gates.open(name)
    events = reader.join()
    kinds = [kind for kind, _ in events]
    positions = [data["queue_position"] for kind, data in events if kind == "queued"]
    assert positions == [2, 1, 0]  # one event per place, only when the place changed
    started_at = kinds.index("started")
    assert all(kind == "queued" for kind in kinds[:started_at])
    progress = [data["step"] for kind, data in events if kind == "progress"]
    assert progress == list(range(1, SMALL["num_inference_steps"] + 1))
    assert kinds[-1] == "completed" and sum(kind in ("completed", "failed", "canceled") for kind in kinds) == 1
    assert events[-1][1]["result_url"] == f"/image/{waiting[2]}"
    assert all(job(server, task_id)["status"] == "completed" for task_id in (blocker, *waiting[:2]))


def test_late_subscriber_gets_the_current_state_then_the_rest(server: GenServeProcess) -> None:
    task_id = submit(server, **SMALL)["task_id"]
    wait_status(server, task_id, "completed")
    events = read_events(server, task_id)
    assert [kind for kind, _ in events] == ["completed"]
    assert events[0][1]["status"] == "completed" and events[0][1]["task_id"] == task_id

    # A [slow] job takes SLOW_STEP_S per step: joined after its first step, it still has the others to go.
    total = 3
    running = submit(server, prompt="[slow] joined late", width=64, height=64, num_inference_steps=total)["task_id"]
    wait_stepping(server, running)
    events = read_events(server, running)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "started" and kinds[1] == "progress" and kinds[-1] == "completed"
    assert events[0][1]["started_at"] is not None
    steps = [data["step"] for kind, data in events if kind == "progress"]
    # The current step first (the snapshot), then every later one, each once.
    assert steps[0] >= 1 and steps == list(range(steps[0], total + 1)), steps
    assert kinds == ["started", *["progress"] * len(steps), "completed"]
    eta = [data["eta_s"] for kind, data in events if kind == "progress"]
    assert eta[-1] == 0 and all(value is not None and value >= 0 for value in eta)


def test_cancel_a_queued_job_and_a_running_one(server: GenServeProcess, gate: str) -> None:
    running = submit(server, **held(gate))["task_id"]  # never opened: only the cancel ends it
    wait_started(server, running)
    queued = submit(server, **SMALL)["task_id"]
    assert job(server, queued)["status"] == "queued"

    answer = requests.post(f"{server.url}/jobs/{queued}/cancel", timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "canceled"
    assert answer.json()["cancel_reason"] == "canceled by client"
    assert server.status()["concurrent_manager"]["global_queue_size"] == 0

    answer = requests.delete(f"{server.url}/jobs/{running}", timeout=30)
    assert answer.status_code == 200, answer.text
    view = answer.json()
    assert view["status"] == "canceled" and view["started_at"] is not None
    assert view["cancel_reason"] == "canceled by client"
    # Stopped by the worker, not killed: the worker is free and serves the next job.
    status = server.wait_full_strength(timeout=30)
    assert status["workers"][0]["restarts"] == 0
    follow_up = submit(server, **SMALL)["task_id"]
    assert wait_status(server, follow_up, "completed")["worker"] == 0
    events = read_events(server, running)
    assert [kind for kind, _ in events] == ["canceled"]


def test_cancelling_a_finished_job_is_409_and_unknown_ids_are_404(server: GenServeProcess) -> None:
    task_id = submit(server, **SMALL)["task_id"]
    wait_status(server, task_id, "completed")
    answer = requests.post(f"{server.url}/jobs/{task_id}/cancel", timeout=10)
    assert answer.status_code == 409
    assert "already ended (completed)" in answer.json()["error"]
    for method, path in (
        ("GET", "/jobs/nope"),
        ("GET", "/jobs/nope/events"),
        ("POST", "/jobs/nope/cancel"),
        ("DELETE", "/jobs/nope"),
        ("GET", "/image/nope"),
        ("GET", "/api/history/nope"),
        ("GET", "/api/image/nope"),
    ):
        response = requests.request(method, f"{server.url}{path}", timeout=10)
        assert response.status_code == 404, (method, path, response.text)
        assert "nope" in response.json()["error"]


def test_jobs_list_is_paginated_newest_first_and_filters_by_status(server: GenServeProcess) -> None:
    ids = [submit(server, prompt=f"listing {index}", **SMALL)["task_id"] for index in range(3)]
    for task_id in ids:
        wait_status(server, task_id, "completed")
    listing = requests.get(f"{server.url}/jobs", params={"limit": 2}, timeout=10).json()
    assert [item["task_id"] for item in listing["jobs"]] == ids[::-1][:2]
    assert listing["total"] >= 3 and listing["limit"] == 2 and listing["offset"] == 0
    next_page = requests.get(f"{server.url}/jobs", params={"limit": 2, "offset": 2}, timeout=10).json()
    assert next_page["jobs"][0]["task_id"] == ids[0]
    completed = requests.get(f"{server.url}/jobs", params={"status": "completed", "limit": 500}, timeout=10).json()
    assert all(item["status"] == "completed" for item in completed["jobs"])
    assert set(ids) <= {item["task_id"] for item in completed["jobs"]}
    assert requests.get(f"{server.url}/jobs", params={"status": "bogus"}, timeout=10).status_code == 400


def test_form_submission(server: GenServeProcess) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (0, 120, 240)).save(buffer, format="PNG")
    response = requests.post(
        f"{server.url}/jobs/form",
        data={"prompt": "blue", "mode": "img2img", "width": "64", "height": "64", "num_inference_steps": "2"},
        files={"input_image": ("in.png", buffer.getvalue(), "image/png")},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    done = wait_status(server, response.json()["task_id"], "completed")
    assert done["mode"] == "img2img" and done["params"]["images"] == ["input_image"]
    assert done["params"]["strength"] == 0.8


def test_bad_submission_is_400_and_nothing_is_recorded(server: GenServeProcess) -> None:
    before = requests.get(f"{server.url}/jobs", timeout=10).json()["total"]
    response = requests.post(f"{server.url}/jobs", json={"prompt": "x", "mode": "img2img", **SMALL}, timeout=10)
    assert response.status_code == 400 and "input_image" in response.json()["error"]
    assert requests.get(f"{server.url}/jobs", timeout=10).json()["total"] == before


def test_sync_generate_is_a_recorded_job(server: GenServeProcess) -> None:
    body = server.generate(**SMALL).json()
    view = job(server, body["task_id"])
    assert view["status"] == "completed"
    image = requests.get(f"{server.url}/image/{body['task_id']}", timeout=10)
    assert image.content == __import__("base64").b64decode(body["image_base64"])


def test_seed_000_and_003_routes(server: GenServeProcess) -> None:
    # A [slow] blocker reports a step every SLOW_STEP_S and would run for minutes: it shows progress while the
    # routes are read, and the test cancels it when it has seen enough.
    blocker = submit(server, prompt="[slow] blocker", width=64, height=64, num_inference_steps=100)["task_id"]
    wait_stepping(server, blocker)
    waiting = submit(server, **SMALL)["task_id"]

    queue = requests.get(f"{server.url}/queue", timeout=10).json()
    assert [item["task_id"] for item in queue["queue_running"]] == [blocker]
    assert queue["queue_running"][0]["progress"]["step"] >= 1
    assert [item["task_id"] for item in queue["queue_pending"]] == [waiting]
    assert queue["queue_pending"][0]["queue_position"] == 0

    pending = requests.get(f"{server.url}/api/task_status/{waiting}", timeout=10).json()
    assert pending == {"status": "pending", "message": "Task is waiting in queue", "queue_position": 0}
    running = requests.get(f"{server.url}/api/task_status/{blocker}", timeout=10).json()
    assert running["status"] == "running" and running["message"] == "Task is currently running"
    assert running["execution_info"]["device"] == "cpu" and running["execution_info"]["step"] >= 1

    assert requests.post(f"{server.url}/jobs/{blocker}/cancel", timeout=30).status_code == 200
    stopped = wait_status(server, blocker, "canceled")
    wait_status(server, waiting, "completed")
    assert job(server, waiting)["started_at"] > stopped["finished_at"]
    completed = requests.get(f"{server.url}/api/task_status/{waiting}", timeout=10).json()
    assert completed["status"] == "completed" and completed["node_errors"] == {}
    assert completed["execution_time"] > 0
    (image,) = completed["images"]
    assert image["filename"] == f"{waiting}.png" and image["url"].startswith(server.url)
    fetched = requests.get(image["url"], timeout=10)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"

    missing = requests.get(f"{server.url}/api/task_status/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["status"] == "not_found"

    history = requests.get(f"{server.url}/api/history", timeout=10).json()
    assert history[waiting]["status"] == "completed" and history[waiting]["images"] == completed["images"]
    assert list(history).index(waiting) < list(history).index(blocker)  # newest first
    one = requests.get(f"{server.url}/api/history/{waiting}", timeout=10).json()
    assert list(one) == [waiting] and one[waiting]["params"]["width"] == 64
    info = requests.get(f"{server.url}/api/image/{waiting}", timeout=10).json()
    assert info == {"status": "success", "images": completed["images"]}
    canceled = requests.get(f"{server.url}/api/task_status/{blocker}", timeout=10).json()
    assert canceled["status"] == "error" and "canceled" in canceled["message"]


def test_abandoned_sync_request_cancels_its_queued_job(server: GenServeProcess, gates: Gates, gate: str) -> None:
    blocker = submit(server, **held(gate))["task_id"]
    wait_started(server, blocker)
    prompt = f"nobody waits for this {time.time()}"
    body = json.dumps({"prompt": prompt, **SMALL}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(
            b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

        def queued_job() -> dict[str, Any] | None:
            listing = requests.get(f"{server.url}/jobs", params={"status": "queued"}, timeout=10).json()
            return next((item for item in listing["jobs"] if item["params"]["prompt"] == prompt), None)

        task_id = wait_until(queued_job, 30, what="the sync job to be queued")["task_id"]
    # The client hung up while its job waited: it is cancelled, and never runs.
    view = wait_status(server, task_id, "canceled", timeout=30)
    assert view["cancel_reason"] == "client disconnected" and view["started_at"] is None
    assert job(server, blocker)["status"] == "running"  # the gate still holds the worker: it was the queue's doing
    gates.open(gate)
    wait_status(server, blocker, "completed")
    assert job(server, task_id)["started_at"] is None


def test_jobs_and_images_survive_a_restart_and_unfinished_ones_are_marked(
    start_server: ServerFactory, tmp_path: Path, gate: str
) -> None:
    results = {"results": {"dir": str(tmp_path / "results")}}
    first = start_server(results, module=FAULT_SERVER)
    done = submit(first, **SMALL)["task_id"]
    wait_status(first, done, "completed")
    png = requests.get(f"{first.url}/image/{done}", timeout=10).content
    running = submit(first, **held(gate))["task_id"]  # still running when the server is killed
    wait_started(first, running)
    queued = submit(first, **SMALL)["task_id"]
    assert job(first, queued)["status"] == "queued"
    assert first.process is not None
    os.kill(first.process.pid, signal.SIGKILL)  # no goodbye: the records say queued / running
    first.process.wait(timeout=10)

    second = start_server(results, in_process=True)
    assert job(second, done)["status"] == "completed"
    assert requests.get(f"{second.url}/image/{done}", timeout=10).content == png
    for task_id in (running, queued):
        view = job(second, task_id)
        assert view["status"] == "failed"
        assert view["error"] == {"type": "service_restarted", "message": "service restarted"}


def test_retention_deletes_old_results(start_server: ServerFactory, tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    server = start_server(
        {"results": {"dir": str(results_dir), "max_age_hours": 3 / 3600, "cleanup_interval_s": 0.5}}, in_process=True
    )
    task_id = submit(server, **SMALL)["task_id"]
    wait_status(server, task_id, "completed")
    image_files = list(results_dir.glob(f"images/*/{task_id}.png"))
    assert len(image_files) == 1

    def gone() -> bool:
        return requests.get(f"{server.url}/jobs/{task_id}", timeout=10).status_code == 404

    wait_until(gone, 30, what="retention to delete the job")
    assert not image_files[0].exists()
    assert requests.get(f"{server.url}/image/{task_id}", timeout=10).status_code == 404


@pytest.fixture(autouse=True)
def _queue_drained(request: pytest.FixtureRequest) -> None:
    """Each test starts with the shared server idle, so queue positions are predictable."""
    if "server" in request.fixturenames:
        server: GenServeProcess = request.getfixturevalue("server")
        wait_until(
            lambda: (
                server.status()["concurrent_manager"]["global_queue_size"] == 0
                and all(worker["state"] == "ready" for worker in server.status()["workers"])
            ),
            120,
            what="an idle server",
        )
