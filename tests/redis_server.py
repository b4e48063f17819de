"""A real Redis for the tests: ``redis-server`` on a free loopback port, in a temporary directory of its own.

No persistence by default (nothing written to disk); ``appendonly=True`` turns on the AOF with an fsync per write,
for tests that stop and start the server and expect what was accepted to survive. ``stop()`` and ``start()`` keep
the port and the directory, so clients reconnect to the same address. Never a fake: CI installs Debian's
``redis-server`` (.ci/run), and a machine without it fails with the command that installs it.

Use the ``redis_server`` fixture (one server per test module), or ``RedisServer`` directly for a server a test
restarts or kills.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.server import free_port

INSTALL_HINT = "redis-server is not installed: apt-get install -y redis-server (.ci/run installs it in CI)"


class RedisServer:
    def __init__(self, appendonly: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="genserve-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it and return once it answers PING (after loading its AOF, when it has one)."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        args = [
            executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",  # no RDB snapshots
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            give_up = time.monotonic() + timeout
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}: {self.log_tail()}")
                try:
                    if client.ping():  # LOADING (still reading the AOF) raises, like a refused connection
                        return self
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > give_up:
                    raise RuntimeError(f"redis-server did not answer PING within {timeout} s: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (Redis flushes its AOF and exits) or SIGKILL; wait for the process to be gone."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        log = self.dir / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One Redis per test module; tests keep apart by using their own key prefix."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()
