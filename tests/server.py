"""A real GenServe server for the end-to-end tests, on a free port: ``python -m genserve`` as a subprocess, or the
same server (genserve.__main__.build_server: the app, uvicorn and the worker processes) on a thread of the test
process.

Tests talk plain HTTP to it (requests) and inspect its worker processes by pid (psutil), exactly as a user would.
The subprocess is for tests of the process itself (signals, exit status, its log, the API process dying). The
in-process server serves everything else: its workers fork from the test process's forkserver, which imports
torch and diffusers once for the whole run instead of once per server (about 12 s of CPU per start on 2 cores).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class GenServeProcess:
    def __init__(
        self,
        workdir: Path,
        embedded_cache: Path,
        overrides: dict[str, Any] | None = None,
        module: str = "genserve",
        env: dict[str, str] | None = None,
        in_process: bool = False,
    ) -> None:
        self.module = module  # tests.fault_server for workers that take fault-injection markers
        self.extra_env = env or {}
        self.in_process = in_process  # serve on a thread of this process (see the module docstring)
        self._thread: threading.Thread | None = None
        self._server: Any = None  # genserve.__main__.GenServeServer while in-process
        self._log_handler: logging.Handler | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        config: dict[str, Any] = {
            "server": {"port": self.port, "log_level": "info", "shutdown_grace_s": 20},
            "model": {"embedded_cache_dir": str(embedded_cache)},
            # Small defaults keep tests that leave fields out fast; tests that check GenServe's own defaults
            # read them from a fresh Config instead.
            "defaults": {"width": 128, "height": 128, "num_inference_steps": 2},
            "workers": {"restart_backoff_s": 0.2},
            "results": {"dir": str(workdir / "results")},
        }
        for section, fields in (overrides or {}).items():
            config.setdefault(section, {}).update(fields)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 180) -> GenServeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
        env.update(self.extra_env)
        if self.in_process:
            self._start_thread(env)
        else:
            self._start_process(env)
        wait_until(self._answers, timeout, 0.1, "the server to answer /health")
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _start_process(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a test can signal the server and its workers at once
            )

    def _start_thread(self, env: dict[str, str]) -> None:
        from genserve import forkserver
        from genserve.__main__ import build_server
        from genserve.config import load_config

        worker_target = None
        if self.module == "tests.fault_server":
            from tests.fault_worker import run_faulty_worker

            worker_target = run_faulty_worker
        config = load_config(self.config_path, env)
        self._log_handler = logging.FileHandler(self.log_path)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        genserve_log = logging.getLogger("genserve")
        genserve_log.addHandler(self._log_handler)
        genserve_log.setLevel(config.server.log_level.upper())
        forkserver.start_early()  # a no-op once this process's forkserver runs
        self._server = build_server(config, worker_target)
        self._thread = threading.Thread(target=self._server.run, name=f"genserve-{self.port}", daemon=True)
        self._thread.start()

    def _answers(self) -> bool:
        if self.in_process:
            assert self._thread is not None
            if not self._thread.is_alive():
                raise AssertionError(f"in-process server stopped:\n{self.log_tail()}")
        else:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
        return self._answers_200("/health")

    def _answers_200(self, path: str) -> bool:
        """One probe; no answer yet (refused, or a server just starting that is slow to reply on a loaded
        machine) is a "not yet" for the caller's wait_until, whose own timeout decides when to give up."""
        try:
            return requests.get(f"{self.url}{path}", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def wait_ready(self, timeout: float = 180) -> None:
        wait_until(lambda: self._answers_200("/ready"), timeout, 0.1, "/ready")

    def wait_full_strength(self, timeout: float = 180) -> dict[str, Any]:
        """Every worker loaded and idle."""

        def all_ready() -> dict[str, Any] | None:
            status = self.status()
            return status if all(w["state"] == "ready" for w in status["workers"]) else None

        return wait_until(all_ready, timeout, 0.05, "all workers ready")

    def status(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/status", timeout=5).json()

    def generate(self, timeout: float = 120, **fields: Any) -> requests.Response:
        fields.setdefault("prompt", "a lighthouse at dusk")
        return requests.post(f"{self.url}/generate", json=fields, timeout=timeout)

    def completed_job(self, task_id: str, timeout: float = 60) -> dict[str, Any]:
        """GET /jobs/{id} once the job has completed (fails the test if it ends otherwise or takes too long)."""

        def completed() -> dict[str, Any] | None:
            view: dict[str, Any] = requests.get(f"{self.url}/jobs/{task_id}", timeout=30).json()
            assert view["status"] not in ("failed", "canceled"), view
            return view if view["status"] == "completed" else None

        return wait_until(completed, timeout, 0.1, f"job {task_id} to complete")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["pid"]]

    def stop(self, timeout: float = 60) -> int | None:
        if self.in_process:
            return self._stop_thread(timeout)
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for child in children:  # never leave a worker behind, even if the server misbehaved
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        return self.process.returncode

    def _stop_thread(self, timeout: float) -> int | None:
        """As SIGTERM does: drain, then stop (the workers are shut down by the service's lifespan)."""
        if self._server is None or self._thread is None:
            return None
        self._server.service.stop.request("test over")
        self._thread.join(timeout)
        if self._thread.is_alive():  # a drain that hangs: stop at once, as a second signal would
            self._server.should_exit = self._server.force_exit = True
            self._thread.join(timeout)
        if self._log_handler is not None:
            logging.getLogger("genserve").removeHandler(self._log_handler)
            self._log_handler.close()
        code: int = self._server.service.stop.exit_code
        return code

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the server's whole process group, as a terminal's Ctrl-C or a container stop can."""
        assert self.process is not None, "an in-process server has no process group to signal"
        os.killpg(self.process.pid, sig)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- job event streams ------------------------------------------------------------------------------------------

Event = tuple[str, dict[str, Any]]  # (SSE event kind, its data)


def read_events(
    server: GenServeProcess, task_id: str, into: list[Event] | None = None, headers: dict[str, str] | None = None
) -> list[Event]:
    """The whole SSE stream of a job, parsed, up to the server closing it (appended to ``into`` as it arrives)."""
    events: list[Event] = [] if into is None else into
    with requests.get(f"{server.url}/jobs/{task_id}/events", headers=headers, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: ") :])))
    return events


class EventReader:
    """Reads a job's SSE stream on a thread, so the test can wait for one event before it moves the job on."""

    def __init__(self, server: GenServeProcess, task_id: str) -> None:
        self.events: list[Event] = []
        self._thread = threading.Thread(target=read_events, args=(server, task_id, self.events), daemon=True)
        self._thread.start()

    def wait_for(self, what: str, seen: Callable[[list[Event]], bool]) -> None:
        wait_until(lambda: seen(list(self.events)), 60, 0.05, what)

    def wait_for_kind(self, kind: str) -> None:
        self.wait_for(f"a {kind} event", lambda events: any(k == kind for k, _ in events))

    def join(self) -> list[Event]:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the event stream did not end"
        return self.events


# --- images the tests send --------------------------------------------------------------------------------------


def png_bytes(size: tuple[int, int], color: tuple[int, ...] = (200, 80, 40), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(size: tuple[int, int]) -> bytes:
    """Black with a white rectangle in the middle: repaint the middle."""
    mask = Image.new("L", size, 0)
    w, h = size
    mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_png(image_base64: str) -> Image.Image:
    data = base64.b64decode(image_base64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "response image is not a PNG"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_claiming(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
