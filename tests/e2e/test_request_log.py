"""Request ids and the access log against real servers (issue 13, item 4).

The servers run as processes of their own here: the point is what lands in their log, the API process's lines and
the worker processes' lines together, so one grep for a request id tells the request's whole story.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, wait_until

pytestmark = pytest.mark.e2e

ALICE = "alice-request-log-key-1"
SMALL = {"prompt": "a traced lighthouse", "width": 64, "height": 64, "num_inference_steps": 2}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def text_server(start_server: ServerFactory) -> GenServeProcess:
    return start_server({"auth": {"keys": [{"name": "alice", "key": ALICE}]}, "server": {"max_request_mb": 1}})


@pytest.fixture(scope="module")
def json_server(start_server: ServerFactory) -> GenServeProcess:
    return start_server({"server": {"log_format": "json"}})


def as_alice(**headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ALICE}", **headers}


def lines_with(server: GenServeProcess, needle: str, count: int = 1) -> list[str]:
    """The server log's lines that contain ``needle``, once there are at least ``count`` (logs are written
    a moment after the answer)."""

    def found() -> list[str] | None:
        lines = [line for line in server.log_path.read_text().splitlines() if needle in line]
        return lines if len(lines) >= count else None

    return wait_until(found, 30, 0.05, f"{count} log line(s) with {needle!r}")


def test_a_request_id_follows_the_job_from_the_access_log_to_the_worker(text_server: GenServeProcess) -> None:
    answer = requests.post(
        f"{text_server.url}/generate", json=SMALL, headers=as_alice(**{"X-Request-ID": "trace-4711"}), timeout=120
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Request-ID"] == "trace-4711"
    task_id = answer.json()["task_id"]
    record = requests.get(f"{text_server.url}/jobs/{task_id}", headers=as_alice(), timeout=10).json()
    assert record["request_id"] == "trace-4711"

    story = lines_with(text_server, "trace-4711", count=4)
    access = [line for line in story if "genserve.access" in line]
    assert len(access) == 1
    assert '"POST /generate HTTP' not in access[0]  # our own line, not uvicorn's
    assert re.search(r'"POST /generate" 200 \d+\.\d{3}s request_id=trace-4711 key=alice', access[0]), access[0]
    assert any("genserve.job_manager" in line and task_id in line for line in story)  # queued, in the API
    worker_lines = [line for line in story if "genserve-worker-" in line]
    assert any("running text2img 64x64, 2 steps" in line for line in worker_lines), story
    assert any("image written" in line for line in worker_lines), story
    assert all(f"job={task_id}" in line for line in worker_lines)
    assert ALICE not in text_server.log_path.read_text()


def test_every_answer_gets_an_id_and_a_line_errors_included(text_server: GenServeProcess) -> None:
    no_key = requests.get(f"{text_server.url}/jobs", timeout=10)
    assert no_key.status_code == 401 and GENERATED_ID.fullmatch(no_key.headers["X-Request-ID"])
    missing = requests.get(f"{text_server.url}/jobs/nope", headers=as_alice(), timeout=10)
    assert missing.status_code == 404 and GENERATED_ID.fullmatch(missing.headers["X-Request-ID"])
    too_big = requests.post(
        f"{text_server.url}/generate", data=b"x" * (2 * 1024 * 1024), headers=as_alice(), timeout=60
    )
    assert too_big.status_code == 413
    for answer, status in ((no_key, 401), (missing, 404), (too_big, 413)):
        (line,) = lines_with(text_server, f"request_id={answer.headers['X-Request-ID']}")
        assert f'" {status} ' in line
    assert "key=-" in lines_with(text_server, f"request_id={no_key.headers['X-Request-ID']}")[0]


@pytest.mark.parametrize("sent", ["has spaces in it", "x" * 129, 'quote"and;semicolon', ""])
def test_an_unusable_request_id_is_replaced_by_a_fresh_one(text_server: GenServeProcess, sent: str) -> None:
    answer = requests.get(f"{text_server.url}/health", headers={"X-Request-ID": sent}, timeout=10)
    assert GENERATED_ID.fullmatch(answer.headers["X-Request-ID"])


def test_json_logs_are_one_object_per_line_with_the_request_and_job(json_server: GenServeProcess) -> None:
    answer = requests.post(f"{json_server.url}/jobs", json=SMALL, headers={"X-Request-ID": "json-trace-1"}, timeout=30)
    assert answer.status_code == 202
    task_id = answer.json()["task_id"]
    json_server.completed_job(task_id)
    lines_with(json_server, "image written")
    entries: list[dict[str, Any]] = []
    for line in json_server.log_path.read_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    ours = [entry for entry in entries if entry.get("request_id") == "json-trace-1"]
    (access,) = [entry for entry in ours if entry["logger"] == "genserve.access"]
    assert access["method"] == "POST" and access["path"] == "/jobs" and access["status"] == 202
    assert access["duration_s"] >= 0 and access["key"] is None
    worker = [entry for entry in ours if entry["process"].startswith("genserve-worker-")]
    assert {entry["job_id"] for entry in worker} == {task_id}
    assert any(entry["message"].startswith("running text2img") for entry in worker)
    assert {entry["process"] for entry in entries} >= {"genserve-api", "genserve-worker-0"}


def test_the_access_log_can_be_turned_off(start_server: ServerFactory) -> None:
    quiet = start_server({"server": {"access_log": False}}, in_process=True)
    answer = requests.get(f"{quiet.url}/models", headers={"X-Request-ID": "quiet-1"}, timeout=10)
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "quiet-1"
    requests.get(f"{quiet.url}/health", timeout=10)  # any later line is written after ours would have been
    assert "quiet-1" not in quiet.log_path.read_text()
