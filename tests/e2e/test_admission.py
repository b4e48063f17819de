"""API keys, per-key quotas and per-request deadlines against a real server.

Jobs that must stay in flight are gated (tests/fault_worker.py): they hold the worker until the test opens the gate
or cancels them, on any machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.conftest import FAULT_SERVER, Gates, ServerFactory, held
from tests.server import GenServeProcess, wait_until

SERVER_MODULE = FAULT_SERVER  # the shared `server` fixture runs fault-injection workers

ALICE = "alice-secret-key-0001"  # generate + read, from GENSERVE_API_KEYS
READER = "reader-secret-key-0001"  # read only, from GENSERVE_API_KEYS
ADMIN = "admin-secret-key-00001"  # admin, from the hashed keys file
SMALL = {"prompt": "a key", "width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def guarded(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> GenServeProcess:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    keys_file.write_text(f"keys:\n  - {{name: ops, sha256: {digest}, scopes: [admin]}}\n")
    return start_server(
        {"auth": {"keys_file": str(keys_file), "max_jobs_per_key": 1}},
        env={"GENSERVE_API_KEYS": f"alice:{ALICE}:generate,read;reader:{READER}:read"},
        module="tests.fault_server",
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def job(server: GenServeProcess, task_id: str, key: str | None = None) -> dict[str, Any]:
    headers = bearer(key) if key else {}
    view: dict[str, Any] = requests.get(f"{server.url}/jobs/{task_id}", headers=headers, timeout=10).json()
    return view


def wait_status(server: GenServeProcess, task_id: str, status: str, key: str | None = None) -> dict[str, Any]:
    """Until the job is in ``status``; "running" also waits for the worker to have it (a start time)."""

    def reached() -> dict[str, Any] | None:
        view = job(server, task_id, key)
        return view if view["status"] == status and (status != "running" or view["started_at"]) else None

    return wait_until(reached, 60, what=f"job {task_id} to be {status}")


def test_health_and_ready_need_no_key(guarded: GenServeProcess) -> None:
    assert requests.get(f"{guarded.url}/health", timeout=5).status_code == 200
    assert requests.get(f"{guarded.url}/ready", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "method,path", [("GET", "/status"), ("GET", "/models"), ("GET", "/jobs"), ("POST", "/generate"), ("GET", "/queue")]
)
def test_every_other_route_needs_a_key(guarded: GenServeProcess, method: str, path: str) -> None:
    missing = requests.request(method, f"{guarded.url}{path}", json=SMALL, timeout=10)
    assert missing.status_code == 401 and missing.json()["error_type"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = requests.request(method, f"{guarded.url}{path}", json=SMALL, headers=bearer("not-a-key-at-all-0000"))
    assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]


def test_bearer_and_x_api_key_are_both_accepted(guarded: GenServeProcess) -> None:
    by_bearer = requests.post(f"{guarded.url}/generate", json=SMALL, headers=bearer(ALICE), timeout=60)
    assert by_bearer.status_code == 200, by_bearer.text
    by_header = requests.get(f"{guarded.url}/status", headers={"X-API-Key": READER}, timeout=10)
    assert by_header.status_code == 200
    admin = requests.post(f"{guarded.url}/generate", json=SMALL, headers=bearer(ADMIN), timeout=60)
    assert admin.status_code == 200  # hashed in the file, admin covers every scope


def test_a_key_without_the_scope_is_403(guarded: GenServeProcess) -> None:
    response = requests.post(f"{guarded.url}/generate", json=SMALL, headers=bearer(READER), timeout=10)
    assert response.status_code == 403
    assert "reader" in response.json()["error"] and "generate" in response.json()["error"]
    assert READER not in response.text  # the key itself is never echoed


def test_v1_errors_are_openai_shaped_and_the_sdk_raises(guarded: GenServeProcess) -> None:
    anonymous = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong-key-0000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        anonymous.images.generate(prompt="x", size="64x64")
    assert denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    reader = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=READER, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        reader.images.generate(prompt="x", size="64x64")
    alice = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=ALICE, max_retries=0)
    assert alice.images.generate(prompt="x", size="64x64", extra_body={"steps": 2}).data[0].url


def test_keys_never_reach_the_log(guarded: GenServeProcess) -> None:
    log = guarded.log_path.read_text()
    assert ALICE not in log and READER not in log and ADMIN not in log


def test_per_key_quota_is_429_with_retry_after(guarded: GenServeProcess, gate: str) -> None:
    first = requests.post(f"{guarded.url}/jobs", json=held(gate), headers=bearer(ALICE), timeout=30)
    assert first.status_code == 202
    second = requests.post(f"{guarded.url}/jobs", json=SMALL, headers=bearer(ALICE), timeout=30)
    assert second.status_code == 429 and second.json()["error_type"] == "too_many_requests"
    assert "auth.max_jobs_per_key" in second.json()["error"] and int(second.headers["Retry-After"]) >= 1
    other = requests.post(f"{guarded.url}/jobs", json=SMALL, headers=bearer(ADMIN), timeout=30)
    assert other.status_code == 202  # the cap is per key
    task = first.json()["task_id"]
    cancel = requests.post(f"{guarded.url}/jobs/{task}/cancel", headers=bearer(ALICE), timeout=30)
    assert cancel.status_code == 200
    again = requests.post(f"{guarded.url}/jobs", json=SMALL, headers=bearer(ALICE), timeout=30)
    assert again.status_code == 202
    for key, accepted in ((ADMIN, other), (ALICE, again)):  # the held job's cancel freed the worker for the rest
        wait_status(guarded, accepted.json()["task_id"], "completed", key)


def test_bad_keys_file_stops_the_start(tmp_path: Path, start_server: ServerFactory) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - {name: x, sha256: nothex, scopes: [generate]}\n")
    with pytest.raises(AssertionError, match="exited with 2"):
        start_server({"auth": {"keys_file": str(bad)}})


# --- deadlines (no keys) -------------------------------------------------------------------------------------------


def test_request_timeout_field_stops_a_running_job_with_408(server: GenServeProcess, gate: str) -> None:
    # Held at its gate, the job is certainly running when its deadline passes, and could never finish by itself.
    response = requests.post(f"{server.url}/generate", json={**held(gate), "timeout": 1.5}, timeout=60)
    assert response.status_code == 408
    assert "deadline of 1.5 s" in response.json()["error"]
    view = job(server, response.json()["task_id"])
    assert view["status"] == "failed" and view["error"]["type"] == "timeout"
    assert view["started_at"] is not None and view["params"]["timeout_s"] == 1.5
    status = server.wait_full_strength(timeout=30)
    assert status["workers"][0]["restarts"] == 0  # stopped, not killed


def test_x_request_timeout_header(server: GenServeProcess, gate: str) -> None:
    response = requests.post(f"{server.url}/generate", json=held(gate), headers={"X-Request-Timeout": "1"}, timeout=60)
    assert response.status_code == 408
    assert job(server, response.json()["task_id"])["params"]["timeout_s"] == 1
    bad = requests.post(f"{server.url}/generate", json=SMALL, headers={"X-Request-Timeout": "soon"}, timeout=10)
    assert bad.status_code == 400 and "X-Request-Timeout" in bad.json()["error"]
    server.wait_full_strength(timeout=30)


def test_a_queued_job_leaves_the_queue_at_its_deadline(server: GenServeProcess, gates: Gates, gate: str) -> None:
    blocker = requests.post(f"{server.url}/jobs", json=held(gate), timeout=30).json()["task_id"]
    wait_status(server, blocker, "running")
    waiting = requests.post(f"{server.url}/jobs", json={**SMALL, "timeout": 1}, timeout=30).json()["task_id"]
    view = wait_until(
        lambda: (v := job(server, waiting))["status"] == "failed" and v, 30, what="the queued job to time out"
    )
    assert view["error"]["type"] == "timeout" and "in the queue" in view["error"]["message"]
    assert view["started_at"] is None
    assert job(server, blocker)["status"] == "running"  # the worker never let go of the blocker meanwhile
    gates.open(gate)
    wait_status(server, blocker, "completed")
    server.wait_full_strength(timeout=30)


def test_request_timeout_is_capped_by_config(start_server: ServerFactory) -> None:
    capped = start_server({"queue": {"task_timeout_s": 2}}, in_process=True)
    response = requests.post(f"{capped.url}/generate", json={**SMALL, "timeout": 3600}, timeout=60)
    assert response.status_code == 200
    assert job(capped, response.json()["task_id"])["params"]["timeout_s"] == 2
