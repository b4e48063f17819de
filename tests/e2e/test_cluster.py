"""A GenServe cluster end to end (cluster.backend redis, issue 15): API nodes and worker nodes on one real Redis,
all on loopback, driven through real HTTP as a client would.

One cluster serves most tests: API nodes ``api-a`` and ``api-b`` and worker nodes ``w1`` (on a thread of the test
process) and ``w2`` (a subprocess), one worker each. Tests that need an API node configured otherwise (a queue cap,
API keys) add cheap in-process API nodes to it; only ``results.backend: redis`` gets a cluster of its own. Workers
are held by gated jobs (tests/fault_worker.py) for exactly as long as a test needs, so "running" and "queued" mean
the same on any machine and nothing waits on the model's speed.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.cluster import Cluster, cluster_redis, make_cluster, wait_for_workers
from tests.conftest import SMALL_JOB, Gates, held
from tests.server import Event, EventReader, GenServeProcess, decode_png, png_bytes, wait_until

__all__ = ["cluster_redis", "make_cluster"]  # the fixtures, imported for pytest

WORKER_NODES = ("w1", "w2")
TERMINAL = ("completed", "failed", "canceled")
ALICE = "alice-cluster-key-0001"
BOB = "bob-cluster-key-000001"
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"


@dataclass
class Main:
    cluster: Cluster
    a: GenServeProcess  # API node api-a
    b: GenServeProcess  # API node api-b


@pytest.fixture(scope="module")
def main_cluster(make_cluster: Callable[..., Cluster]) -> Main:
    cluster = make_cluster()
    api_a = cluster.start("api", "api-a", in_process=True, wait_ready=False)
    api_b = cluster.start("api", "api-b", in_process=True, wait_ready=False)
    cluster.start("worker", "w2", wait_ready=False)  # first: its interpreter starts while w1 loads
    cluster.start("worker", "w1", in_process=True, wait_ready=False)
    wait_for_workers(api_a, 2)
    wait_for_workers(api_b, 2)
    return Main(cluster, api_a, api_b)


@pytest.fixture
def main(main_cluster: Main) -> Main:
    """The shared cluster, idle: every worker ready and nothing queued (what an earlier test left has ended)."""

    def idle() -> bool:
        status = main_cluster.a.status()
        workers = status["workers"]
        return status["queue"]["size"] == 0 and len(workers) == 2 and all(w["state"] == "ready" for w in workers)

    wait_until(idle, 60, 0.1, "the cluster to be idle")
    return main_cluster


@pytest.fixture
def new_gate(gates: Gates) -> Iterator[Callable[[], str]]:
    """Fresh gates; every one is opened when the test ends, whatever happened, so no worker stays held."""
    made: list[str] = []

    def new() -> str:
        made.append(gates.new())
        return made[-1]

    yield new
    for name in made:
        gates.open(name)


# --- helpers -----------------------------------------------------------------------------------------------------


def submit(api: GenServeProcess, headers: dict[str, str] | None = None, **fields: Any) -> str:
    body = {**SMALL_JOB, "prompt": "a cluster lighthouse", **fields}
    answer = requests.post(f"{api.url}/jobs", json=body, headers=headers, timeout=30)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


def view(api: GenServeProcess, task_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer = requests.get(f"{api.url}/jobs/{task_id}", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def wait_status(api: GenServeProcess, task_id: str, status: str, headers: dict[str, str] | None = None) -> Any:
    def reached() -> dict[str, Any] | None:
        current = view(api, task_id, headers)
        assert current["status"] not in TERMINAL or current["status"] == status, current
        return current if current["status"] == status and (status != "running" or current.get("node")) else None

    return wait_until(reached, 60, 0.05, f"job {task_id} to be {status}")


def hold(api: GenServeProcess, gate: str, **fields: Any) -> tuple[str, str]:
    """Submit a gated job and wait until a worker runs it: (task id, its node)."""
    task_id = submit(api, **held(gate, **fields))
    return task_id, wait_status(api, task_id, "running")["node"]


def hold_both(main: Main, new_gate: Callable[[], str]) -> dict[str, tuple[str, str]]:
    """Hold the worker of each worker node with a gated job: node -> (task id, gate)."""
    first_gate, second_gate = new_gate(), new_gate()
    first, first_node = hold(main.a, first_gate)
    second, second_node = hold(main.a, second_gate)
    assert {first_node, second_node} == set(WORKER_NODES)
    # /status of either API node shows both nodes busy, each with its own job.
    for api in (main.a, main.b):

        def both_busy(api: GenServeProcess = api) -> bool:
            workers = api.status()["workers"]
            return {(w["node"], w["state"], w["current_job"]) for w in workers} == {
                (first_node, "busy", first),
                (second_node, "busy", second),
            }

        wait_until(both_busy, 30, 0.05, "both worker nodes busy in /status")
    return {first_node: (first, first_gate), second_node: (second, second_gate)}


def queue_size(api: GenServeProcess) -> int:
    size: int = api.status()["queue"]["size"]
    return size


def wait_queue_size(api: GenServeProcess, size: int) -> None:
    wait_until(lambda: queue_size(api) == size, 30, 0.05, f"{size} job(s) in the cluster queue")


def ends_with_one(events: list[Event], kind: str) -> bool:
    kinds = [k for k, _ in events]
    return bool(kinds) and kinds[-1] == kind and sum(k in TERMINAL for k in kinds) == 1


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = Image.open(io.BytesIO(data))
    return image.size


def saturated(api: GenServeProcess) -> dict[str, Any] | None:
    ready: dict[str, Any] = requests.get(f"{api.url}/ready", timeout=10).json()
    return ready if ready["saturated"] else None


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- tests -------------------------------------------------------------------------------------------------------


def test_every_route_family_works_through_an_api_node(main: Main, gates: Gates, gate: str) -> None:
    api = main.a
    # Sync JSON: the image comes back inline; the job ran on a worker node.
    answer = api.generate(**SMALL_JOB, seed=3)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True and decode_png(body["image_base64"]).size == (64, 64)
    assert view(api, body["task_id"])["node"] in WORKER_NODES

    # Multipart img2img: the input image travels to the worker node in the job's payload.
    form = {
        "mode": "img2img",
        "prompt": "repaint it",
        "width": "64",
        "height": "64",
        "num_inference_steps": "2",
        "strength": "0.6",
    }
    files = {"input_image": ("in.png", png_bytes((64, 64), (10, 200, 10)), "image/png")}
    answer = requests.post(f"{api.url}/generate/img2img", data=form, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True and body["mode"] == "img2img"
    assert decode_png(body["image_base64"]).size == (64, 64)
    assert view(api, body["task_id"])["node"] in WORKER_NODES

    # Async: 202, then the job view until completed; it says which node ran it.
    polled = submit(api, seed=4)
    completed = api.completed_job(polled)
    assert completed["node"] in WORKER_NODES and completed["result_url"] == f"/image/{polled}"

    # SSE: the worker node's events reach the stream live (the job is held until the stream has seen it start),
    # and it ends with exactly one completed.
    streamed = submit(api, **held(gate, seed=5))
    reader = EventReader(api, streamed)
    reader.wait_for_kind("started")
    gates.open(gate)
    events = reader.join()
    assert ends_with_one(events, "completed"), events
    kinds = [kind for kind, _ in events]
    assert kinds[0] in ("queued", "started") and "progress" in kinds
    assert events[-1][1]["task_id"] == streamed

    # The image of a finished job, from the folder the worker node wrote.
    image = requests.get(f"{api.url}/image/{polled}", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert png_size(image.content) == (64, 64)

    # OpenAI images.generate, b64_json.
    answer = requests.post(
        f"{api.url}/v1/images/generations",
        json={"prompt": "a boat", "size": "64x64", "response_format": "b64_json", "steps": 2},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert len(data) == 1 and png_size(base64.b64decode(data[0]["b64_json"])) == (64, 64)

    # /status lists the workers of every node, and the nodes; /queue answers with the cluster's jobs.
    status = api.status()
    assert sorted(worker["node"] for worker in status["workers"]) == sorted(WORKER_NODES)
    assert [node["node_id"] for node in status["nodes"]] == sorted(WORKER_NODES)
    assert all(node["ready_workers"] == 1 for node in status["nodes"])
    assert status["cluster"]["node_id"] == "api-a"
    queue = requests.get(f"{api.url}/queue", timeout=10)
    assert queue.status_code == 200, queue.text
    assert queue.json() == {"queue_running": [], "queue_pending": []}


def test_a_worker_node_serves_the_metrics_of_its_own_pool_and_jobs(main: Main) -> None:
    """An API node sees no worker's host: each worker node's own port serves its pool, its GPUs and its jobs."""
    task_id = submit(main.a)
    node_id = wait_status(main.a, task_id, "completed")["node"]
    node = next(node for node in main.cluster.nodes if node.status().get("node", {}).get("node_id") == node_id)

    def completed_here() -> float:
        text = requests.get(f"{node.url}/metrics", timeout=10).text
        assert 'genserve_workers{state="ready"} 1.0' in text, text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('genserve_jobs_finished_total{mode="text2img",outcome="completed"}')
        )

    assert wait_until(completed_here, 30, 0.1, f"node {node_id} to count the job it ran") >= 1


def test_jobs_start_in_global_priority_order_whichever_api_node_took_them(
    main: Main, new_gate: Callable[[], str], gates: Gates
) -> None:
    holders = hold_both(main, new_gate)
    # Submitted one at a time, alternating API nodes, so the arrival order is known: (name, priority). The two of
    # priority 1 come through different API nodes: first in, first out holds across them.
    arrivals = [("p5", 5), ("p1-first", 1), ("p3", 3), ("p-2", -2), ("p1-second", 1)]
    ids = {}
    for index, (name, priority) in enumerate(arrivals):
        api = (main.a, main.b)[index % 2]
        ids[name] = submit(api, prompt=name, priority=priority)
    expected = ["p-2", "p1-first", "p1-second", "p3", "p5"]
    # Both held: every job waits in Redis, and either API node lists the global queue in dispatch order.
    for api in (main.a, main.b):
        pending = requests.get(f"{api.url}/queue", timeout=10).json()["queue_pending"]
        assert [item["task_id"] for item in pending] == [ids[name] for name in expected]
        assert [item["queue_position"] for item in pending] == list(range(len(expected)))
    # Free one node's worker only: it takes the queued jobs one at a time, so their start order is the queue's.
    free_node = "w1"
    gates.open(holders[free_node][1])
    finished = {name: main.a.completed_job(task_id) for name, task_id in ids.items()}
    assert {job["node"] for job in finished.values()} == {free_node}
    assert sorted(finished, key=lambda name: finished[name]["started_at"]) == expected
    # Each started only after the one before it had been taken: strictly increasing.
    starts = [finished[name]["started_at"] for name in expected]
    assert starts == sorted(set(starts))
    assert view(main.b, holders["w2"][0])["status"] == "running"  # the other node was held throughout


def test_cancel_and_events_through_an_api_node_that_did_not_take_the_job(
    main: Main, new_gate: Callable[[], str]
) -> None:
    holders = hold_both(main, new_gate)
    running, _ = holders["w1"]
    queued = submit(main.a, prompt="queued, then canceled")
    following = submit(main.a, prompt="runs once w1 is free")
    wait_queue_size(main.a, 2)
    # api-b has never seen `following`: its SSE stream starts from the job's record, then follows its events.
    reader = EventReader(main.b, following)
    reader.wait_for_kind("queued")

    # The queued job, canceled through api-b: out of the queue, never run; api-a (which took it) sees the same.
    answer = requests.post(f"{main.b.url}/jobs/{queued}/cancel", timeout=30)
    assert answer.status_code in (200, 202), answer.text
    for api in (main.b, main.a):
        ended = wait_status(api, queued, "canceled")
        assert ended["started_at"] is None and "node" not in ended and ended["cancel_reason"] == "canceled by client"
    wait_queue_size(main.a, 1)

    # The running job, canceled through api-b: its node stops it; w1 is then free and takes the next job.
    answer = requests.delete(f"{main.b.url}/jobs/{running}", timeout=30)
    assert answer.status_code in (200, 202), answer.text
    for api in (main.b, main.a):
        ended = wait_status(api, running, "canceled")
        assert ended["node"] == "w1" and ended["cancel_reason"] == "canceled by client" and ended["result"] is None
    events = reader.join()
    assert ends_with_one(events, "completed"), events
    assert [data.get("node") for kind, data in events if kind == "started"] == ["w1"]
    assert view(main.a, following)["node"] == "w1"
    assert view(main.a, queued)["status"] == "canceled"  # still: it never ran anywhere
    assert view(main.a, holders["w2"][0])["status"] == "running"


def test_a_deadline_passes_while_the_job_waits_in_the_cluster_queue(main: Main, new_gate: Callable[[], str]) -> None:
    hold_both(main, new_gate)
    answer = requests.post(
        f"{main.b.url}/generate",
        json={**SMALL_JOB, "prompt": "waits past its deadline"},
        headers={"X-Request-Timeout": "1"},
        timeout=60,
    )
    assert answer.status_code == 408, answer.text
    body = answer.json()
    assert body["error_type"] == "timeout" and body["success"] is False
    expired = view(main.a, body["task_id"])
    assert expired["status"] == "failed" and expired["error"]["type"] == "timeout" and expired["started_at"] is None

    task_id = submit(main.a, prompt="a job with one second to live", timeout=1)
    failed = wait_status(main.b, task_id, "failed")
    assert failed["error"]["type"] == "timeout" and "in the queue" in failed["error"]["message"]
    assert failed["started_at"] is None
    wait_queue_size(main.a, 0)  # both left the queue (/status reads it every node_report_s)


def test_the_cluster_queue_cap_holds_whichever_api_node_is_asked(main: Main, new_gate: Callable[[], str]) -> None:
    capped = [
        main.cluster.start("api", name, in_process=True, extra={"queue": {"max_size": 2}})
        for name in ("cap-a", "cap-b")
    ]
    hold_both(main, new_gate)
    waiting = [submit(capped[0], prompt="first in line"), submit(capped[1], prompt="second in line")]
    wait_queue_size(main.a, 2)
    for api in capped:
        refused = requests.post(f"{api.url}/jobs", json={**SMALL_JOB, "prompt": "one too many"}, timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error_type"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
        sync = api.generate(**SMALL_JOB)
        assert sync.status_code == 429, sync.text
        # /ready reads the cluster's status every node_report_s: saturated soon after the queue filled up.
        ready = wait_until(functools.partial(saturated, api), 10, 0.05, f"{api.url} to say the queue is saturated")
        assert ready["ready"] is True and ready["queue"]["max_size"] == 2
    assert queue_size(main.a) == 2  # nothing refused was left behind
    for task_id in waiting:
        assert requests.post(f"{capped[1].url}/jobs/{task_id}/cancel", timeout=30).status_code in (200, 202)
        wait_status(capped[0], task_id, "canceled")
    wait_queue_size(main.a, 0)
    assert requests.post(f"{capped[0].url}/jobs", json=SMALL_JOB | {"prompt": "room again"}, timeout=30).ok


def test_api_keys_own_their_jobs_across_api_nodes(main: Main, new_gate: Callable[[], str], gates: Gates) -> None:
    keys = [
        {"name": "alice", "key": ALICE, "scopes": ["generate", "read"]},
        {"name": "bob", "key": BOB, "scopes": ["generate", "read"]},
    ]
    front, other = (
        main.cluster.start("api", name, in_process=True, extra={"auth": {"keys": keys}})
        for name in ("keys-a", "keys-b")
    )
    gate = new_gate()
    task_id = submit(front, as_key(ALICE), **held(gate))
    wait_status(front, task_id, "running", as_key(ALICE))

    def bob_sees_nothing() -> None:
        for method, path in (
            ("GET", f"/jobs/{task_id}"),
            ("GET", f"/image/{task_id}"),
            ("POST", f"/jobs/{task_id}/cancel"),
        ):
            answer = requests.request(method, f"{other.url}{path}", headers=as_key(BOB), timeout=30)
            unknown = requests.request(
                method, f"{other.url}{path.replace(task_id, UNKNOWN_ID)}", headers=as_key(BOB), timeout=30
            )
            assert answer.status_code == 404, (path, answer.text)
            assert answer.text.replace(task_id, "ID") == unknown.text.replace(UNKNOWN_ID, "ID")
        listing = requests.get(f"{other.url}/jobs", headers=as_key(BOB), timeout=30).json()
        assert task_id not in [job["task_id"] for job in listing["jobs"]]

    # Running: api-b never saw the job, yet answers Bob as for an unknown id and Alice with her job.
    bob_sees_nothing()
    mine = view(other, task_id, as_key(ALICE))
    assert mine["status"] == "running" and mine["owner"] == "alice" and mine["node"] in WORKER_NODES
    # Bob's cancel did not touch it.
    gates.open(gate)
    done = wait_status(other, task_id, "completed", as_key(ALICE))
    assert done["cancel_reason"] is None
    bob_sees_nothing()
    image = requests.get(f"{other.url}/image/{task_id}", headers=as_key(ALICE), timeout=30)
    assert image.status_code == 200 and png_size(image.content) == (64, 64)


def test_images_in_redis_when_nodes_share_no_folder(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = make_cluster()

    def own_folder(node_id: str) -> dict[str, Any]:
        return {"results": {"dir": str(tmp_path / node_id), "backend": "redis"}}

    api = cluster.start("api", "r-api", in_process=True, wait_ready=False, extra=own_folder("r-api"))
    cluster.start("worker", "r-w1", in_process=True, extra=own_folder("r-w1"))
    wait_for_workers(api, 1)

    # Sync: the API node fetches the image from Redis to answer with it inline.
    answer = api.generate(**SMALL_JOB, seed=8)
    assert answer.status_code == 200, answer.text
    inline = base64.b64decode(answer.json()["image_base64"])
    assert inline == next((tmp_path / "r-w1").rglob(f"{answer.json()['task_id']}.png")).read_bytes()

    task_id = api.completed_job(submit(api, seed=9))["task_id"]
    worker_copy = next((tmp_path / "r-w1").rglob(f"{task_id}.png"))
    assert not list((tmp_path / "r-api").rglob(f"{task_id}.png"))  # nothing shared: not on the API node yet
    image = requests.get(f"{api.url}/image/{task_id}", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == worker_copy.read_bytes()
    assert not list(cluster.results.rglob("*.png"))  # the shared folder of the default setup was never used


def test_a_node_in_role_all_serves_the_api_and_runs_the_jobs(make_cluster: Callable[..., Cluster]) -> None:
    """--role all: an API node and a worker node in one process, in a cluster like any other node."""
    cluster = make_cluster()
    both = cluster.start("all", "both", in_process=True, wait_ready=False)
    wait_for_workers(both, 1)
    answer = both.generate(**SMALL_JOB, seed=5)
    assert answer.status_code == 200, answer.text
    assert view(both, answer.json()["task_id"])["node"] == "both"
    status = both.status()
    assert status["cluster"]["node_id"] == "both" and [node["node_id"] for node in status["nodes"]] == ["both"]
    # A plain API node joining the cluster sends its jobs to the same worker.
    api = cluster.start("api", "both-api", in_process=True)
    assert view(api, api.completed_job(submit(api, seed=6))["task_id"])["node"] == "both"
