"""tools/chaos.py run as a user runs it: a short kill-loop against a real two-worker CPU server, then the pool is
checked from the outside; a short node-killing run on a Redis cluster the tool starts itself (--cluster
--kill-nodes); plus its failure modes (closed port, bad arguments) and --help."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from PIL import Image

from tests.conftest import ServerFactory
from tests.server import REPO_ROOT, GenServeProcess
from tests.stubs import QuietHandler, serving

TOOL = "tools/chaos.py"
CLOSED_PORT_URL = "http://127.0.0.1:1"
LAST_LINE = re.compile(
    r"^jobs sent (?P<sent>\d+), completed (?P<completed>\d+), failed (?P<failed>\d+)(?: \((?P<reasons>[^)]*)\))?, "
    r"canceled (?P<canceled>\d+), refused (?P<refused>\d+), lost (?P<lost>\d+), restarts (?P<restarts>\d+), "
    r"longest recovery (?P<longest>\d+\.\d{2})s$"
)


def run_tool(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    # A wide console so rich never folds a table; no terminal, so no colour codes.
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, TOOL, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    lines = proc.stdout.strip().splitlines()
    assert lines, explain(proc)
    match = LAST_LINE.match(lines[-1])
    assert match, f"last line is not the summary line: {lines[-1]!r}\n{explain(proc)}"
    return match.groupdict()


@pytest.fixture(scope="module")
def pool(start_server: ServerFactory) -> GenServeProcess:
    return start_server({"workers": {"cpu_workers": 2, "cpu_threads": 1, "restart_backoff_s": 0.2}}, in_process=True)


def test_kill_loop_loses_no_job_and_the_pool_recovers(pool: GenServeProcess) -> None:
    restarts_before = pool.status()["concurrent_manager"]["total_restarts"]
    proc = run_tool("--url", pool.url, "--jobs", "24", "--kill-every", "3", "--size", "64", "--steps", "2")
    assert proc.returncode == 0, explain(proc)
    line = summary(proc)
    sent, lost, restarts = int(line["sent"]), int(line["lost"]), int(line["restarts"])
    completed, failed, canceled, refused = (int(line[k]) for k in ("completed", "failed", "canceled", "refused"))
    assert sent == 24
    assert lost == 0, explain(proc)
    assert restarts >= 1, explain(proc)
    assert completed + failed + canceled + refused == sent, explain(proc)
    assert float(line["longest"]) > 0
    if failed:  # "reason: count, ..." adds up to the failures
        counts = [int(part.rsplit(":", 1)[1]) for part in (line["reasons"] or "").split(", ")]
        assert sum(counts) == failed, explain(proc)
    assert "kill 1 at" in proc.stdout and "ready again as pid" in proc.stdout

    # The tool exits only once the pool is back: the server agrees, from the outside.
    status = pool.status()
    workers = status["workers"]
    assert len(workers) == 2
    assert all(w["state"] == "ready" and w["pid"] and not w["budget_spent"] for w in workers), status
    assert status["concurrent_manager"]["alive_processes"] == 2
    assert status["concurrent_manager"]["total_restarts"] - restarts_before == restarts


def test_node_kills_lose_no_job_and_the_cluster_recovers(embedded_cache: Path, tmp_path: Path) -> None:
    """One API node and two worker nodes on a Redis, all started by the tool; one whole node is SIGKILLed (process
    group) while jobs run and restarted. Every job is accounted for, the killed node comes back, and nothing the
    tool started outlives it. About 100 s on 2 cores: each node start imports torch twice (node and forkserver).
    Like every cluster test it needs Debian's redis-server; without it the tool exits 2 with the install command."""
    folder = tmp_path / "cluster"
    args = ["--cluster", "--kill-nodes", "--nodes", "2", "--jobs", "10", "--kill-every", "2", "--max-kills", "1"]
    args += ["--size", "64", "--steps", "2", "--modes", "text2img,img2img", "--lease", "1.5", "--seed", "7"]
    proc = run_tool(*args, "--embedded-cache", str(embedded_cache), "--cluster-dir", str(folder), timeout=280)
    assert proc.returncode == 0, explain(proc)
    line = summary(proc)
    sent, lost, restarts = int(line["sent"]), int(line["lost"]), int(line["restarts"])
    completed, failed, canceled, refused = (int(line[k]) for k in ("completed", "failed", "canceled", "refused"))
    assert sent == 10 and lost == 0, explain(proc)
    assert completed + failed + canceled + refused == sent, explain(proc)
    assert completed >= 1, explain(proc)
    assert restarts == 1, explain(proc)  # in node mode: the node restarts, one per kill
    assert float(line["longest"]) > 0
    if failed:  # every failure has its stated reason
        counts = [int(part.rsplit(":", 1)[1]) for part in (line["reasons"] or "").split(", ")]
        assert sum(counts) == failed, explain(proc)
    kill = re.search(r"^kill 1 at [\d.]+ s: node (node-\d) pid (\d+) and its process group", proc.stdout, re.M)
    assert kill, explain(proc)
    node, killed_pid = kill.group(1), int(kill.group(2))
    assert re.search(rf"^  node {node} back as pid \d+ .*after kill 1$", proc.stdout, re.M), explain(proc)
    assert "kill 2 at" not in proc.stdout  # --max-kills 1

    # The node died at once, without the drain a SIGTERM starts, and was started again: its log has a second launch.
    log = (folder / node / "server.log").read_text()
    first, marker, second = log.partition(f"=== launch 2 of node {node} ===")
    assert marker and f"Started server process [{killed_pid}]" in first, log[-3000:]
    assert "stopping the service" not in first and "Started server process" in second, log[-3000:]
    # Nothing the tool started is left: no node (their command lines name their config in the folder) nor Redis.
    left = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(folder) in cmdline:
            left.append(f"{process.info['pid']}: {cmdline}")
    assert not left, left


def test_cluster_arguments_are_checked() -> None:
    proc = run_tool("--kill-nodes", timeout=30)
    assert proc.returncode == 2 and "--kill-nodes needs --cluster" in proc.stderr, explain(proc)
    proc = run_tool("--cluster", timeout=30)  # --kill-every defaults to 5: single workers of a cluster are refused
    assert proc.returncode == 2 and "--kill-nodes" in proc.stderr, explain(proc)
    proc = run_tool("--cluster", "--kill-nodes", "--url", "http://127.0.0.1:9", timeout=30)
    assert proc.returncode == 2 and "leave --url out" in proc.stderr, explain(proc)


class ForgetfulHandler(QuietHandler):
    """A fake GenServe at full strength that answers every sync request with success but keeps no record of the job
    (GET /jobs/{id} is 404), and whose async jobs never end."""

    def do_GET(self) -> None:
        if self.path == "/status":
            worker = {"slot": 0, "pid": 1, "state": "ready", "budget_spent": False, "current_job": None}
            manager = {"alive_processes": 1, "dead_processes": 0, "total_restarts": 0, "global_queue_size": 0}
            self.reply(200, {"workers": [worker], "concurrent_manager": manager, "model": {"modes": ["text2img"]}})
        elif self.path == "/jobs/stuck":
            self.reply(200, {"task_id": "stuck", "status": "running"})
        elif self.path.startswith("/jobs?"):
            self.reply(200, {"jobs": [], "total": 0})
        else:
            self.reply(404, {"success": False, "error_type": "not_found", "error": "no such job"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/jobs":
            self.reply(202, {"task_id": "stuck", "status": "queued"})
            return
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        self.reply(200, {"success": True, "task_id": "forgotten", "image_base64": image})


@pytest.fixture()
def forgetful_server() -> Iterator[str]:
    with serving(ForgetfulHandler) as url:
        yield url


def test_jobs_the_server_forgets_or_never_ends_are_lost(forgetful_server: str) -> None:
    args = ["--url", forgetful_server, "--jobs", "6", "--kill-every", "0", "--routes", "generate-json,jobs-json"]
    proc = run_tool(*args, "--job-timeout", "1", timeout=60)
    assert proc.returncode == 1, explain(proc)
    line = summary(proc)
    assert line["sent"] == "6" and line["lost"] == "6" and line["completed"] == "0", explain(proc)
    assert "but GET /jobs/forgotten answers 404" in proc.stdout
    assert "task stuck): still running" in proc.stdout


def test_closed_port_exits_non_zero() -> None:
    proc = run_tool("--url", CLOSED_PORT_URL, "--jobs", "2", "--kill-every", "0", timeout=30)
    assert proc.returncode == 2, explain(proc)
    assert "cannot reach" in proc.stderr


def test_bad_arguments_are_usage_errors() -> None:
    proc = run_tool("--size", "100", timeout=30)
    assert proc.returncode == 2 and "--size must be a multiple of 16" in proc.stderr, explain(proc)
    proc = run_tool("--modes", "text2img,sketch", timeout=30)
    assert proc.returncode == 2 and "--modes" in proc.stderr, explain(proc)


def test_help_documents_every_option() -> None:
    proc = run_tool("--help", timeout=30)
    assert proc.returncode == 0, explain(proc)
    for option in (
        "--url",
        "--api-key",
        "--timeout",
        "--jobs",
        "--kill-every",
        "--concurrency",
        "--cancel-fraction",
        "--cancel-delay",
        "--size",
        "--steps",
        "--priority-spread",
        "--modes",
        "--routes",
        "--seed",
        "--job-timeout",
        "--recovery-timeout",
        "--report",
        "--max-kills",
        "--cluster",
        "--kill-nodes",
        "--nodes",
        "--node-workers",
        "--lease",
        "--cluster-dir",
        "--embedded-cache",
    ):
        assert option in proc.stdout, option
    assert "examples:" in proc.stdout and "--kill-every 5" in proc.stdout
