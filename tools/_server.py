"""A GenServe server of a tool's own: ``python -m genserve`` as a subprocess, on a free port, with a config the tool
writes (benchmarks that compare settings, the GPU check). Stopped with SIGTERM, then SIGKILL; no worker outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil
import requests

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """The server exited or did not become ready; the message says why (with the log's last lines)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loading_problem(status: dict[str, Any]) -> str | None:
    """Why a starting server will not become ready by waiting longer: a worker that failed or died while loading."""
    if status.get("status") == "failed":
        return str(status.get("reason"))
    for worker in status.get("workers", []):
        if worker.get("last_error") and worker.get("state") not in ("ready", "busy"):
            return f"worker {worker.get('slot')}: {worker['last_error']}"
    return None


class LocalServer:
    """``python -m genserve --config folder/config.yaml``; its output goes to folder/server.log."""

    def __init__(self, folder: Path, config: dict[str, Any], python: str = sys.executable) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = {"host": "127.0.0.1", "port": self.port, "log_level": "info", **config.get("server", {})}
        server["port"] = self.port
        self.config = {**config, "server": server}
        self.config_path = folder / "config.yaml"
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")  # JSON is YAML
        self.log_path = folder / "server.log"
        self.python = python
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self, ready_timeout_s: float) -> float:
        """Start it and wait for /ready; returns the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}  # the config file decides
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "genserve", "--config", str(self.config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the tool does not reach it: stop() does the stopping
            )
        self._wait_ready(self.process, ready_timeout_s)
        return time.monotonic() - self.started_at

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        """Until /ready says 200. Gives up at once when waiting cannot help: the server exited, or a worker failed
        to load (a refused memory plan, or an error while loading: a respawn would only fail the same way)."""
        session = requests.Session()
        deadline = time.monotonic() + timeout_s
        why = "no answer yet"
        while True:
            if process.poll() is not None:
                last_line = self.log_tail(1).strip()[-300:]
                raise ServerError(f"server exited with status {process.returncode} before it was ready: {last_line}")
            try:
                answer = session.get(f"{self.url}/ready", timeout=2)
                if answer.status_code == 200:
                    return
                why = str(answer.json().get("reason") or answer.text[:500])
                problem = loading_problem(self.status())
                if problem:
                    raise ServerError(f"a worker cannot load: {problem}")
            except (requests.RequestException, ValueError) as exc:
                why = str(exc)
            if time.monotonic() > deadline:
                raise ServerError(f"server not ready within {timeout_s:g} s: {why}")
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = requests.get(f"{self.url}/status", timeout=10).json()
        return answer

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM and wait for the drain; SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print("server ignored SIGTERM; killing it", file=sys.stderr)
                self.process.kill()
                self.process.wait()
        for child in descendants:  # psutil checks the pid still names the same process before it signals
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def add_embedded_cache_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--embedded-cache: where the embedded model is, so the benchmarks build it once between them."""
    parser.add_argument(
        "--embedded-cache",
        type=Path,
        default=Path("~/.cache/genserve/embedded").expanduser(),
        help=f"where the embedded model is (built there on first use){note}",
    )


def run_bench(name: str, measure: Callable[[], T], report: Callable[[T], None]) -> int:
    """A benchmark's exit status: 0 once ``report`` printed what ``measure`` found, 1 (and why) when a server of
    its own would not start or answer."""
    try:
        results = measure()
    except (ServerError, requests.RequestException) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    report(results)
    return 0


@contextmanager
def local_server(config: dict[str, Any], ready_timeout_s: float, folder: Path | None = None) -> Iterator[LocalServer]:
    """A started server, stopped whatever happens; in a temporary folder (removed after) unless one is given.
    A start that fails raises ServerError with the log's last lines."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genserve-tool-")))
        server = LocalServer(folder, config)
        try:
            server.start(ready_timeout_s)
            yield server
        except ServerError as exc:
            raise ServerError(f"{exc}\n--- server log, last lines ---\n{server.log_tail()}") from None
        finally:
            server.stop()
