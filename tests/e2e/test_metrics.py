"""GET /metrics against a real server: the numbers move with real jobs, the pool's state is there, the scope is
enforced, and server.metrics_port serves the same registry without a key.

One server with API keys and fault-injection workers (tests/fault_worker.py): plain prompts run the real tiny
pipeline, ``[oom]`` fails a job with out-of-memory, a gated job holds the worker until the test opens its gate or
cancels it. Scrapes are parsed with prometheus-client's own text parser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FAULT_SERVER, SMALL_JOB, Gates, ServerFactory, held
from tests.server import GenServeProcess, free_port, wait_until

WRITER = "writer-secret-key-0001"  # generate + read
WATCHER = "metrics-secret-key-0001"  # metrics only
ADMIN = "admin-secret-key-000001"  # admin: every scope
KEYS = f"writer:{WRITER}:generate,read;watcher:{WATCHER}:metrics;ops:{ADMIN}:admin"

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One /metrics answer, parsed: sample name and labels → value."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, Labels], float] = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in self.families.values()
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when it is absent (a labelled series appears at its first increment)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(start_server: ServerFactory, metrics_port: int) -> GenServeProcess:
    return start_server(
        {"server": {"metrics_port": metrics_port}},
        env={"GENSERVE_API_KEYS": KEYS},
        module=FAULT_SERVER,
        in_process=True,
    )


def slot_zero(server: GenServeProcess) -> dict[str, str]:
    """The labels of the only worker slot's series: its slot and its device (cpu here, cuda:0 on a GPU host)."""
    workers = requests.get(f"{server.url}/status", headers=bearer(WRITER), timeout=10).json()["workers"]
    return {"slot": "0", "device": workers[0]["device"]}


def scrape(server: GenServeProcess) -> Scrape:
    response = requests.get(f"{server.url}/metrics", headers=bearer(WATCHER), timeout=10)
    assert response.status_code == 200, response.text
    return Scrape(response.text)


def scrape_until(server: GenServeProcess, reached: Callable[[Scrape], bool], what: str) -> Scrape:
    """Scrape until ``reached`` holds: a job's listener counts it a moment after its state shows in GET /jobs."""

    def scraped() -> Scrape | None:
        now = scrape(server)
        return now if reached(now) else None

    found: Scrape = wait_until(scraped, 30, what=what)
    return found


def submit(server: GenServeProcess, **fields: Any) -> str:
    response = requests.post(f"{server.url}/jobs", json=fields, headers=bearer(WRITER), timeout=30)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def status_of(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = requests.get(f"{server.url}/jobs/{task_id}", headers=bearer(WRITER), timeout=10).json()
    return view


def wait_status(server: GenServeProcess, task_id: str, wanted: str) -> None:
    def reached() -> bool:
        view = status_of(server, task_id)
        return bool(view["status"] == wanted and (wanted != "running" or view["started_at"] is not None))

    wait_until(reached, 60, what=f"job {task_id} to be {wanted}")


# --- the scope -----------------------------------------------------------------------------------------------------


def test_metrics_needs_the_metrics_scope(server: GenServeProcess) -> None:
    url = f"{server.url}/metrics"
    assert requests.get(url, timeout=10).status_code == 401
    refused = requests.get(url, headers=bearer(WRITER), timeout=10)
    assert refused.status_code == 403 and "'metrics' scope" in refused.json()["error"]
    for key in (WATCHER, ADMIN):
        allowed = requests.get(url, headers=bearer(key), timeout=10)
        assert allowed.status_code == 200
        assert allowed.headers["content-type"].startswith("text/plain")
        assert "genserve_workers" in Scrape(allowed.text).families
    # The metrics key opens /metrics only.
    assert requests.get(f"{server.url}/status", headers=bearer(WATCHER), timeout=10).status_code == 403


def test_openmetrics_on_request_and_plain_text_for_an_odd_accept(server: GenServeProcess) -> None:
    def get(accept: str) -> requests.Response:
        headers = {**bearer(WATCHER), "Accept": accept}
        return requests.get(f"{server.url}/metrics", headers=headers, timeout=10)

    openmetrics = get("application/openmetrics-text; version=1.0.0")
    assert openmetrics.status_code == 200
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    odd = get("application/openmetrics-text; version=abc")  # prometheus_client's negotiation raises on this
    assert odd.status_code == 200 and odd.headers["content-type"].startswith("text/plain")
    assert "genserve_queue_depth" in Scrape(odd.text).families


# --- the numbers move with real jobs -------------------------------------------------------------------------------


def test_job_and_request_figures_move_with_real_jobs(server: GenServeProcess, gates: Gates) -> None:
    before = scrape(server)

    # Completed: a real tiny-model image through the synchronous route.
    done = requests.post(
        f"{server.url}/generate", json={**SMALL_JOB, "prompt": "a kite"}, headers=bearer(WRITER), timeout=120
    )
    assert done.status_code == 200, done.text
    # Failed: out of memory on the worker.
    oom = requests.post(
        f"{server.url}/generate", json={**SMALL_JOB, "prompt": "[oom] a mural"}, headers=bearer(WRITER), timeout=120
    )
    assert oom.status_code == 500 and oom.json()["error_type"] == "out_of_memory"
    # Canceled: held on its worker, then cancelled.
    gate = gates.new()
    try:
        held_id = submit(server, **held(gate))
        wait_status(server, held_id, "running")
        cancel = requests.post(f"{server.url}/jobs/{held_id}/cancel", headers=bearer(WRITER), timeout=30)
        assert cancel.status_code == 200, cancel.text
        wait_status(server, held_id, "canceled")
    finally:
        gates.open(gate)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    after = scrape_until(
        server,
        lambda s: (
            s.value("genserve_jobs_finished_total", mode="text2img", outcome="canceled")
            > before.value("genserve_jobs_finished_total", mode="text2img", outcome="canceled")
        ),
        "the canceled job to be counted",
    )
    assert moved("genserve_jobs_submitted_total", mode="text2img") == 3
    for outcome in ("completed", "failed", "canceled"):
        assert moved("genserve_jobs_finished_total", mode="text2img", outcome=outcome) == 1, outcome
        assert moved("genserve_job_end_to_end_seconds_count", mode="text2img", outcome=outcome) == 1, outcome
    assert moved("genserve_job_failures_total", mode="text2img", error_type="out_of_memory") == 1
    assert moved("genserve_job_queue_wait_seconds_count", mode="text2img") == 3  # all three reached a worker
    # Worker-side timings, carried by the completed job's JobResult.
    assert moved("genserve_job_pipeline_seconds_count", mode="text2img") == 1
    assert moved("genserve_job_pipeline_seconds_sum", mode="text2img") > 0
    assert moved("genserve_job_encode_seconds_count", mode="text2img") == 1
    assert moved("genserve_job_encode_seconds_sum", mode="text2img") > 0
    assert moved("genserve_worker_oom_failures_total", **slot_zero(server)) == 1

    # Requests, by route template and status (the request middleware reports them).
    assert moved("genserve_http_requests_total", method="POST", route="/generate", status="200") == 1
    assert moved("genserve_http_requests_total", method="POST", route="/generate", status="500") == 1
    assert moved("genserve_http_requests_total", method="POST", route="/jobs/{job_id}/cancel", status="200") == 1
    assert moved("genserve_http_requests_total", method="GET", route="/jobs/{job_id}", status="200") >= 2
    assert moved("genserve_http_request_duration_seconds_count", method="POST", route="/generate") == 2
    assert not any(name == "genserve_http_requests_total" and held_id in str(labels) for name, labels in after.samples)


def test_unknown_paths_share_one_route_label(server: GenServeProcess) -> None:
    before = scrape(server)
    for path in ("/no/such/page", "/another-one"):
        assert requests.get(f"{server.url}{path}", headers=bearer(WRITER), timeout=10).status_code == 404
    after = scrape(server)
    label = {"method": "GET", "route": "unmatched", "status": "404"}
    assert (
        after.value("genserve_http_requests_total", **label) - before.value("genserve_http_requests_total", **label)
        == 2
    )
    assert not any("/no/such/page" in str(labels) for _, labels in after.samples)


# --- the pool ------------------------------------------------------------------------------------------------------


def test_queue_depth_by_priority_and_workers_by_state(server: GenServeProcess, gates: Gates) -> None:
    idle = scrape_until(server, lambda s: s.value("genserve_workers", state="ready") == 1, "the worker to be idle")
    assert all(idle.has("genserve_workers", state=state) for state in ("starting", "busy", "dead", "failed"))
    assert idle.has("genserve_queue_depth", priority="0") and idle.value("genserve_queue_depth", priority="0") == 0
    assert idle.value("genserve_queue_capacity") > 0
    for counter in ("restarts", "hangs", "oom_failures"):  # per slot, exported before any fault
        assert idle.has(f"genserve_worker_{counter}_total", **slot_zero(server)), counter

    gate = gates.new()
    try:
        holder = submit(server, **held(gate))
        wait_status(server, holder, "running")
        waiting = [submit(server, **SMALL_JOB, prompt="later", priority=7) for _ in range(2)]
        waiting.append(submit(server, **SMALL_JOB, prompt="sooner", priority=-2))
        busy = scrape(server)
        assert busy.value("genserve_workers", state="busy") == 1 and busy.value("genserve_workers", state="ready") == 0
        assert busy.value("genserve_queue_depth", priority="7") == 2
        assert busy.value("genserve_queue_depth", priority="-2") == 1
        assert busy.value("genserve_queue_depth", priority="0") == 0
    finally:
        gates.open(gate)
    for task_id in (holder, *waiting):
        wait_status(server, task_id, "completed")
    drained = scrape(server)
    assert not drained.has("genserve_queue_depth", priority="7")
    assert drained.value("genserve_queue_depth", priority="0") == 0


def test_hang_and_restart_counters_start_at_zero(server: GenServeProcess) -> None:
    # Only a fault moves them (tests/e2e/test_faults.py makes those faults); here they must be exported, at 0.
    now = scrape(server)
    assert now.value("genserve_worker_hangs_total", **slot_zero(server)) == 0
    assert now.value("genserve_worker_restarts_total", **slot_zero(server)) == 0
    assert now.families["genserve_worker_hangs"].type == "counter"


def test_gpu_figures_only_where_there_is_a_gpu(server: GenServeProcess) -> None:
    families = scrape(server).families
    gpu_families = {name for name in families if name.startswith("genserve_gpu_")}
    if not slot_zero(server)["device"].startswith("cuda"):  # no GPU: absent, and the scrape still answers
        assert gpu_families == set()
        return
    total = families["genserve_gpu_memory_total_bytes"].samples
    assert total and all(sample.value > 0 for sample in total)
    assert {"genserve_gpu_memory_used_bytes", "genserve_gpu_utilization_ratio"} <= gpu_families


# --- the metrics port ----------------------------------------------------------------------------------------------


def test_metrics_port_serves_the_same_registry_without_a_key(server: GenServeProcess, metrics_port: int) -> None:
    response = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    assert response.status_code == 200
    on_port = Scrape(response.text)
    main = scrape(server)
    assert on_port.value("genserve_workers", state="ready") == main.value("genserve_workers", state="ready")
    submitted = ("genserve_jobs_submitted_total", {"mode": "text2img"})
    assert on_port.value(submitted[0], **submitted[1]) == main.value(submitted[0], **submitted[1])
    assert set(on_port.families) == set(main.families)
