"""tools/performance_monitor.py against a real server: run as users run it (a subprocess) and check what it says.

A few cases need a server that misbehaves on cue (answers /status with an error, goes away mid-run); a small stub
HTTP server stands in for GenServe there. A fake ``pynvml`` module on PYTHONPATH stands in for NVIDIA GPUs, so the
GPU path runs on machines without one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.server import REPO_ROOT, GenServeProcess, free_port, wait_until

SERVER_IN_PROCESS = False  # tests read the API process itself (its pid, its resources)

TOOL = REPO_ROOT / "tools" / "performance_monitor.py"
SUMMARY_LINE = re.compile(r"^\d\d:\d\d:\d\d  cpu ", re.MULTILINE)
SAMPLE_KEYS = {"timestamp", "time", "url", "cpu_percent", "memory", "gpus", "gpu_note", "service", "processes"}
GIB = 1024**3


def run_tool(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        cwd=REPO_ROOT,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tool_env(**extra: str) -> dict[str, str]:
    """The caller's environment without settings that change rich's output (width, colour) or module lookup."""
    drop = {"COLUMNS", "LINES", "FORCE_COLOR", "PYTHONPATH"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def flat(text: str) -> str:
    """text on one line: rich wraps error messages at 80 columns when stderr is not a terminal."""
    return " ".join(text.split())


def read_samples(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_png(path: Path) -> None:
    assert path.stat().st_size > 20_000, "the plot is suspiciously small"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 1000 and image.height >= 700
        image.load()
    assert not list(path.parent.glob(f".{path.name}.*")), "a temporary plot file was left behind"


# --- --once --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [["--once"], []], ids=["once", "default"])
def test_once_prints_a_sample(server: GenServeProcess, mode: list[str]) -> None:
    status = server.status()
    result = run_tool(*mode, "--url", server.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for pid in (w["pid"] for w in status["workers"]):
        assert re.search(rf"\bworker 0\s+{pid}\b", out), f"worker pid {pid} not in the process table:\n{out}"
        assert str(pid) in out
    assert "no NVIDIA GPU" in out
    assert re.search(r"queue size\s+0 \(max \d+\)", out), out
    assert re.search(r"workers\s+1 alive, 0 dead", out), out
    assert re.search(r"status\s+running", out), out
    assert re.search(r"\bapi\s+\d+\s", out), "the API process (the workers' parent) is missing"
    assert "GiB" in out and "CPU" in out


def test_once_out_appends_json_lines(server: GenServeProcess, tmp_path: Path) -> None:
    samples_file = tmp_path / "samples.jsonl"
    for _ in range(2):
        result = run_tool("--once", "--url", server.url, "--out", str(samples_file))
        assert result.returncode == 0, result.stderr
    samples = read_samples(samples_file)
    assert len(samples) == 2
    status = server.status()
    sample = samples[-1]
    assert SAMPLE_KEYS <= sample.keys()
    assert sample["url"] == server.url
    assert sample["gpus"] == [] and "no NVIDIA GPU" in sample["gpu_note"]
    memory = sample["memory"]
    assert 0 < memory["used_bytes"] < memory["total_bytes"] and 0 < memory["percent"] < 100
    service = sample["service"]
    assert service["reachable"] is True and service["status"] == "running"
    assert (service["alive_workers"], service["dead_workers"], service["queue_size"]) == (1, 0, 0)
    assert service["total_restarts"] == status["concurrent_manager"]["total_restarts"]
    assert [w["pid"] for w in service["workers"]] == [w["pid"] for w in status["workers"]]
    processes = {p["role"]: p for p in sample["processes"]}
    assert processes["worker"]["pid"] == status["workers"][0]["pid"]
    assert server.process is not None and processes["api"]["pid"] == server.process.pid
    assert all(p["rss_bytes"] > 10 * 1024**2 and p["cpu_percent"] >= 0 for p in processes.values())
    assert samples[0]["timestamp"] < samples[1]["timestamp"]


# --- --continuous and --plot ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def continuous_run(
    server: GenServeProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """One short continuous run, shared by the tests that check its output and redraw its samples."""
    workdir = tmp_path_factory.mktemp("monitor")
    plot, samples = workdir / "X.png", workdir / "S.jsonl"
    result = run_tool(
        "--continuous", "1", "2", "--samples", "3", "--url", server.url, "--plot-file", str(plot), "--out", str(samples)
    )
    return result, plot, samples


def test_continuous_prints_lines_and_writes_plot_and_samples(
    continuous_run: tuple[subprocess.CompletedProcess[str], Path, Path], server: GenServeProcess
) -> None:
    result, plot, samples_file = continuous_run
    assert result.returncode == 0, result.stderr
    lines = SUMMARY_LINE.findall(result.stdout)
    assert len(lines) == 3 and len(result.stdout.splitlines()) == 3, result.stdout
    for line in result.stdout.splitlines():
        assert "no GPU" in line and "queue 0" in line and "workers 1 alive/0 dead" in line and "restarts 0" in line
    assert "written to" in result.stderr
    check_png(plot)
    samples = read_samples(samples_file)
    assert len(samples) == 3
    assert all(s["service"]["reachable"] for s in samples)
    steps = [b["timestamp"] - a["timestamp"] for a, b in zip(samples, samples[1:], strict=False)]
    assert all(0.8 < step < 2.5 for step in steps), steps


def test_plot_redraws_from_recorded_samples(
    continuous_run: tuple[subprocess.CompletedProcess[str], Path, Path], tmp_path: Path
) -> None:
    _, _, samples_file = continuous_run
    plot = tmp_path / "Y.png"
    result = run_tool("--plot", "--out", str(samples_file), "--plot-file", str(plot))
    assert result.returncode == 0, result.stderr
    assert "plot of 3 samples" in result.stdout
    check_png(plot)


def test_plot_skips_a_torn_line_and_fails_without_samples(tmp_path: Path) -> None:
    missing = run_tool("--plot", "--out", str(tmp_path / "none.jsonl"), "--plot-file", str(tmp_path / "p.png"))
    assert missing.returncode == 1
    assert "error: no samples file" in flat(missing.stderr)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"timestamp": 1, "cpu_perc\n')  # a line torn by a kill
    result = run_tool("--plot", "--out", str(empty), "--plot-file", str(tmp_path / "p.png"))
    assert result.returncode == 1
    assert "holds no samples" in flat(result.stderr) and "skipped 1 line" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_sigterm_ends_a_continuous_run_cleanly(server: GenServeProcess, tmp_path: Path) -> None:
    samples_file, plot = tmp_path / "S.jsonl", tmp_path / "Z.png"
    args = ["--continuous", "1", "--url", server.url, "--out", str(samples_file), "--plot-file", str(plot)]
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), *args],
        cwd=REPO_ROOT,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: samples_file.exists() and samples_file.read_text().count("\n") >= 1, 30, 0.05, "a sample")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in err
    assert len(SUMMARY_LINE.findall(out)) == len(read_samples(samples_file)) >= 1
    check_png(plot)


# --- failures ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [["--once"], ["--continuous", "1", "--samples", "2"]], ids=["once", "continuous"])
def test_closed_port_fails_with_a_clear_message(mode: list[str], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    plot = ["--plot-file", str(tmp_path / "p.png")] if "--continuous" in mode else []
    result = run_tool(*mode, *plot, "--url", url)
    assert result.returncode == 1, result.stdout
    stderr = flat(result.stderr)
    if "--continuous" in mode:
        lines = result.stdout.splitlines()
        assert len(lines) == 2, result.stdout
        assert all(f"service unreachable: cannot reach {url}/status" in line for line in lines), result.stdout
        assert all("(Connection refused)" in line for line in lines), result.stdout
        assert f"error: no sample reached the server at {url}" in stderr
    else:
        assert f"error: cannot reach {url}/status: is GenServe running there? (Connection refused)" in stderr
        assert result.stdout == ""


class StubStatus(ThreadingHTTPServer):
    """Answers GET /status with a given code and JSON body: a GenServe that misbehaves on cue."""

    def __init__(self, code: int, body: Any) -> None:
        self.code, self.body = code, json.dumps(body).encode()
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(BaseHTTPRequestHandler):
    server: StubStatus

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(self.server.code if self.path == "/status" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[Any]:
    started: list[StubStatus] = []

    def start(code: int, body: Any) -> StubStatus:
        server = StubStatus(code, body)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("code", "body", "message"),
    [
        (500, {"success": False, "error": "boom"}, "answered 500: boom"),
        (200, {"hello": "world"}, "did not answer with GenServe's status"),
    ],
    ids=["http-error", "not-genserve"],
)
def test_status_errors_fail_once(stub: Any, code: int, body: Any, message: str) -> None:
    result = run_tool("--once", "--url", stub(code, body).url)
    assert result.returncode == 1
    assert message in flat(result.stderr)


def test_server_going_away_mid_run_is_a_gap_not_a_failure(server: GenServeProcess, stub: Any, tmp_path: Path) -> None:
    fake = stub(200, server.status())
    samples_file = tmp_path / "S.jsonl"
    args = ["--continuous", "1", "0", "--samples", "3", "--url", fake.url, "--out", str(samples_file)]
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), *args, "--plot-file", str(tmp_path / "p.png")],
        cwd=REPO_ROOT,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: samples_file.exists() and samples_file.read_text().count("\n") >= 1, 30, 0.05, "a sample")
        fake.shutdown()
        fake.server_close()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert "workers 1 alive/0 dead" in lines[0]
    # The first failed request may meet the closing stub half-way ("Connection reset by peer").
    unreachable = re.compile(r"service unreachable: .*\(Connection (refused|reset by peer)\)$")
    assert all(unreachable.search(line) for line in lines[1:]), out
    samples = read_samples(samples_file)
    assert [s["service"]["reachable"] for s in samples] == [True, False, False]
    # The stub's worker pids belong to the real server, whose API process does not listen on the stub's port.
    assert samples[0]["processes"] == [] and "not this server's processes" in samples[0]["process_note"]
    check_png(tmp_path / "p.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--continuous", "1", "2", "3"], "at most two values"),
        (["--continuous", "0"], "INTERVAL must be at least 1"),
        (["--continuous", "5", "-1"], "PLOT_INTERVAL must be 0"),
        (["--continuous", "x"], "invalid int value"),
        (["--samples", "3"], "--samples needs --continuous"),
        (["--continuous", "--samples", "0"], "--samples must be at least 1"),
        (["--plot"], "--plot needs --out FILE"),
        (["--once", "--plot-file", "p.png"], "--once draws no plot"),
        (["--once", "--continuous"], "not allowed with"),
    ],
)
def test_bad_command_lines_exit_2(args: list[str], message: str) -> None:
    result = run_tool(*args, "--url", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert message in flat(result.stderr)


def test_help_documents_every_option() -> None:
    result = run_tool("--help")
    assert result.returncode == 0, result.stderr
    options = ["--url", "--api-key", "--timeout", "--once", "--continuous", "--plot", "--out", "--plot-file"]
    for option in [*options, "--samples", "INTERVAL", "PLOT_INTERVAL", "examples:", "exit status:"]:
        assert option in result.stdout, option
    assert "[INTERVAL [PLOT_INTERVAL]]" in result.stdout


# --- NVIDIA GPUs (faked) -------------------------------------------------------------------------------------

FAKE_PYNVML = '''\
"""A stand-in for nvidia-ml-py: two 80 GiB GPUs; the first runs pid {pid} with 29 GiB."""
from types import SimpleNamespace

GIB = 1024**3


class NVMLError(Exception):
    pass


def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 2
def nvmlDeviceGetHandleByIndex(index): return index
def nvmlDeviceGetName(handle): return b"Fake H100" if handle == 0 else "Fake H100"  # old and new pynvml
def nvmlDeviceGetMemoryInfo(handle): return SimpleNamespace(used=(30 + handle) * GIB, total=80 * GIB)


def nvmlDeviceGetUtilizationRates(handle):
    if handle == 1:
        raise NVMLError("Not Supported")
    return SimpleNamespace(gpu=87, memory=40)


def nvmlDeviceGetComputeRunningProcesses(handle):
    return [SimpleNamespace(pid={pid}, usedGpuMemory=29 * GIB)] if handle == 0 else []
'''


def test_gpus_are_reported_and_plotted(server: GenServeProcess, tmp_path: Path) -> None:
    worker_pid = server.worker_pids()[0]
    fake_dir = tmp_path / "fake_nvml"
    fake_dir.mkdir()
    (fake_dir / "pynvml.py").write_text(FAKE_PYNVML.format(pid=worker_pid))
    env = tool_env(PYTHONPATH=str(fake_dir))

    once = run_tool("--once", "--url", server.url, env=env)
    assert once.returncode == 0, once.stderr
    assert "no NVIDIA GPU" not in once.stdout
    assert re.search(r"GPU 0\s+Fake H100: 30\.0 / 80\.0 GiB \(37\.5 %\), utilisation 87 %", once.stdout), once.stdout
    assert re.search(r"GPU 1\s+Fake H100: 31\.0 / 80\.0 GiB \(38\.8 %\), utilisation -", once.stdout), once.stdout
    assert re.search(rf"worker 0\s+{worker_pid}\s+\S+\s+\d+\s+29696\b", once.stdout), once.stdout

    samples_file, plot = tmp_path / "S.jsonl", tmp_path / "gpu.png"
    args = ["--continuous", "1", "0", "--samples", "2", "--url", server.url, "--out", str(samples_file)]
    result = run_tool(*args, "--plot-file", str(plot), env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("gpu0 30.0/80.0 GiB 87%  gpu1 31.0/80.0 GiB -" in line for line in lines), lines
    sample = read_samples(samples_file)[-1]
    assert [g["name"] for g in sample["gpus"]] == ["Fake H100", "Fake H100"] and sample["gpu_note"] is None
    assert sample["gpus"][1]["utilization_percent"] is None
    worker = next(p for p in sample["processes"] if p["role"] == "worker")
    assert worker["gpu_memory_bytes"] == 29 * GIB
    check_png(plot)
