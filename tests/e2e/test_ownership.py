"""Two tenants on one server: a job belongs to the key that submitted it (issue 13, item 1).

Alice and Bob hold generate+read keys, Ops an admin key. On every route that takes a job id or lists jobs, Bob gets
exactly what an unknown id gets (404, same shape) for Alice's jobs, lists never show them, and his cancels do not
touch them; Ops sees and cancels everything. Live jobs are held by gates (tests/fault_worker.py), so "running" and
"queued" mean the same on any machine.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests

from tests.conftest import FAULT_SERVER, ServerFactory, held
from tests.server import GenServeProcess, wait_until

pytestmark = pytest.mark.e2e

ALICE = "alice-tenant-key-00001"
BOB = "bob-tenant-key-0000001"
OPS = "ops-admin-key-00000001"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def shared(start_server: ServerFactory) -> GenServeProcess:
    keys = [
        {"name": "alice", "key": ALICE, "scopes": ["generate", "read"]},
        {"name": "bob", "key": BOB, "scopes": ["generate", "read"]},
        {"name": "ops", "key": OPS, "scopes": ["admin"]},
    ]
    return start_server({"auth": {"keys": keys}}, module=FAULT_SERVER, in_process=True)


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(server: GenServeProcess, method: str, path: str, key: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{server.url}{path}", headers=as_key(key), timeout=30, **kwargs)


def view(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    answer = call(server, "GET", f"/jobs/{task_id}", OPS)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def submit(server: GenServeProcess, key: str, body: dict[str, Any]) -> str:
    answer = call(server, "POST", "/jobs", key, json=body)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


def wait_status(server: GenServeProcess, task_id: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        current = view(server, task_id)
        ready = current["status"] == status and (status != "running" or current["started_at"])
        return current if ready else None

    return wait_until(reached, 60, what=f"job {task_id} to be {status}")


def same_as_unknown(server: GenServeProcess, method: str, path: str, task_id: str, answer: requests.Response) -> bool:
    """Bob's answer for Alice's id is the answer for an id that does not exist (the ids swapped)."""
    unknown = call(server, method, path.replace(task_id, UNKNOWN_ID), BOB)
    if answer.status_code != unknown.status_code:
        return False
    if method == "HEAD":
        return True
    return answer.text.replace(task_id, "ID") == unknown.text.replace(UNKNOWN_ID, "ID")


FINISHED_JOB_ROUTES = [
    ("GET", "/jobs/{id}"),
    ("GET", "/jobs/{id}/events"),
    ("GET", "/image/{id}"),
    ("HEAD", "/image/{id}"),
    ("GET", "/image/{id}?format=jpeg"),
    ("GET", "/api/task_status/{id}"),
    ("GET", "/api/history/{id}"),
    ("GET", "/api/image/{id}"),
]


def test_a_finished_job_answers_its_owner_and_admin_and_is_unknown_to_others(shared: GenServeProcess) -> None:
    task_id = submit(shared, ALICE, {"prompt": "alice's lighthouse", **SMALL})
    wait_status(shared, task_id, "completed")
    matrix: dict[tuple[str, str], dict[str, int]] = {}
    for method, template in FINISHED_JOB_ROUTES:
        path = template.format(id=task_id)
        keys = (("alice", ALICE), ("bob", BOB), ("ops", OPS))
        answers = {name: call(shared, method, path, key) for name, key in keys}
        matrix[(method, template)] = {name: answer.status_code for name, answer in answers.items()}
        assert same_as_unknown(shared, method, path, task_id, answers["bob"]), (method, path, answers["bob"].text)
    expected = {route: {"alice": 200, "bob": 404, "ops": 200} for route in FINISHED_JOB_ROUTES}
    assert matrix == expected, _table(matrix)
    image = call(shared, "GET", f"/image/{task_id}", ALICE)
    assert image.headers["content-type"] == "image/png" and image.content.startswith(b"\x89PNG")


def test_lists_show_a_tenant_only_its_own_jobs_and_admin_all(shared: GenServeProcess) -> None:
    mine = submit(shared, ALICE, {"prompt": "alice's list", **SMALL})
    theirs = submit(shared, BOB, {"prompt": "bob's list", **SMALL})
    for task_id in (mine, theirs):
        wait_status(shared, task_id, "completed")

    def ids(key: str, path: str) -> set[str]:
        answer = call(shared, "GET", path, key)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        return {job["task_id"] for job in body["jobs"]} if path.startswith("/jobs") else set(body)

    for path in ("/jobs?limit=500", "/api/history?limit=1000"):
        assert mine in ids(ALICE, path) and theirs not in ids(ALICE, path)
        assert theirs in ids(BOB, path) and mine not in ids(BOB, path)
        assert {mine, theirs} <= ids(OPS, path)
    alice_total = call(shared, "GET", "/jobs", ALICE).json()["total"]
    assert alice_total == len(ids(ALICE, "/jobs?limit=500"))  # the count is of her jobs too
    record = view(shared, mine)
    assert record["owner"] == "alice"


def test_a_live_job_cannot_be_seen_streamed_or_cancelled_by_another_tenant(shared: GenServeProcess, gate: str) -> None:
    running = submit(shared, ALICE, held(gate))
    wait_status(shared, running, "running")
    queued = submit(shared, ALICE, {"prompt": "alice waits", **SMALL})
    wait_status(shared, queued, "queued")

    for task_id in (running, queued):
        for method, path in (
            ("GET", f"/jobs/{task_id}"),
            ("GET", f"/jobs/{task_id}/events"),
            ("GET", f"/api/task_status/{task_id}"),
            ("POST", f"/jobs/{task_id}/cancel"),
            ("DELETE", f"/jobs/{task_id}"),
        ):
            answer = call(shared, method, path, BOB)
            assert answer.status_code == 404, (method, path, answer.text)
            assert same_as_unknown(shared, method, path, task_id, answer)
    assert view(shared, running)["status"] == "running" and view(shared, queued)["status"] == "queued"

    with requests.get(f"{shared.url}/jobs/{running}/events", headers=as_key(ALICE), stream=True, timeout=30) as sse:
        assert sse.status_code == 200
        first = next(line for line in sse.iter_lines() if line.startswith(b"data:"))
        assert json.loads(first[5:])["task_id"] == running

    def seen_in_queue(key: str) -> set[str]:
        body = call(shared, "GET", "/queue", key).json()
        return {job["task_id"] for job in body["queue_running"] + body["queue_pending"]}

    assert {running, queued} <= seen_in_queue(ALICE) and {running, queued} <= seen_in_queue(OPS)
    assert not {running, queued} & seen_in_queue(BOB)
    alice_pending = call(shared, "GET", "/queue", ALICE).json()["queue_pending"]
    assert [job["queue_position"] for job in alice_pending if job["task_id"] == queued] == [0]

    def on_workers(key: str) -> set[str]:
        workers = call(shared, "GET", "/status", key).json()["workers"]
        return {job for worker in workers for job in worker["current_jobs"] + [worker["current_job"]] if job}

    assert running in on_workers(ALICE) and running in on_workers(OPS) and running not in on_workers(BOB)

    assert call(shared, "POST", f"/jobs/{queued}/cancel", OPS).json()["status"] == "canceled"  # admin cancels any
    stopped = call(shared, "DELETE", f"/jobs/{running}", ALICE)
    assert stopped.status_code == 200 and stopped.json()["status"] == "canceled"


def test_openai_image_urls_are_the_owners_only(shared: GenServeProcess) -> None:
    body = {"prompt": "alice's url", "size": "256x256", "response_format": "url"}
    answer = call(shared, "POST", "/v1/images/generations", ALICE, json=body)
    assert answer.status_code == 200, answer.text
    url = answer.json()["data"][0]["url"]
    path = re.sub(r"^https?://[^/]+", "", url)
    assert requests.get(url, headers=as_key(ALICE), timeout=30).content.startswith(b"\x89PNG")
    assert requests.get(f"{shared.url}{path}", headers=as_key(BOB), timeout=30).status_code == 404
    assert requests.get(f"{shared.url}{path}", headers=as_key(OPS), timeout=30).status_code == 200


def _table(matrix: dict[tuple[str, str], dict[str, int]]) -> str:
    lines = ["route | alice (owner) | bob (other tenant) | ops (admin)"]
    for (method, route), codes in matrix.items():
        lines.append(f"{method} {route} | {codes['alice']} | {codes['bob']} | {codes['ops']}")
    return "\n".join(lines)
