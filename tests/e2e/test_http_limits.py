"""HTTP limits at the edge (genserve/edge.py) against a real server: request heads that are too large, carry too
many headers or arrive too slowly are refused, keep-alive and pipelining still work, and memory stays flat."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess

pytestmark = pytest.mark.e2e
SERVER_IN_PROCESS = False  # tests read the API process itself (its pid, its resources)

HEADER_TIMEOUT_S = 1.0
MAX_HEAD_BYTES = 64 * 1024  # server.max_header_kb's default
MAX_HEADERS = 100  # server.max_headers's default


@pytest.fixture(scope="module")
def server(start_server: ServerFactory) -> GenServeProcess:
    # /health answers while the worker still loads: no test here needs a worker.
    return start_server({"server": {"header_timeout_s": HEADER_TIMEOUT_S}}, wait_ready=False)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One raw HTTP/1.1 connection: send exactly the bytes a test wants, read responses one by one."""

    def __init__(self, server: GenServeProcess, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_until_answered(self, chunks: Iterable[bytes]) -> int:
        """Send ``chunks`` one by one, stopping as soon as the server answers or closes. Returns the bytes sent."""
        sent = 0
        for chunk in chunks:
            try:
                self.sock.sendall(chunk)
            except OSError:  # the server closed: reset or broken pipe
                break
            sent += len(chunk)
            if select.select([self.sock], [], [], 0)[0]:
                break
        return sent

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buffer += data
        return bool(data)

    def response(self) -> Response | None:
        """The next response; None when the server closes before a whole one."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._fill():
                return None
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(int(status_line.split()[1]), headers, body)

    def closed_by_server(self) -> bool:
        """True when the server ends the connection (EOF or reset) with nothing more to read."""
        return not self.buffer and not self._fill()


def request_head(size: int | None = None, headers: int = 1, close: bool = False) -> bytes:
    """A GET /health head with ``headers`` headers (Host counts), padded by its last header to exactly ``size``
    bytes when given."""
    lines = [b"GET /health HTTP/1.1", b"Host: 127.0.0.1"]
    if close:
        lines.append(b"Connection: close")
    lines += [b"X-Header-%d: %d" % (n, n) for n in range(len(lines) - 1, headers)]
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if size is not None:
        lines[-1] += b"a" * (size - len(head))
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        assert len(head) == size
    return head


def never_ending_header(total: int, chunk_size: int) -> Iterator[bytes]:
    """A request head of one header whose value goes on for ``total`` bytes, in chunks."""
    yield b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Never-Ending: "
    chunk = b"a" * chunk_size
    for _ in range(total // chunk_size):
        yield chunk


def in_chunks(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def exchange(server: GenServeProcess, data: bytes) -> Response | None:
    conn = Connection(server)
    try:
        conn.send(data)
        return conn.response()
    finally:
        conn.close()


def assert_refused(response: Response | None, status: int, error_type: str) -> dict[str, Any]:
    assert response is not None, "the server closed the connection without an answer"
    assert response.status == status, response
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["success"] is False
    assert body["error_type"] == error_type
    assert body["error"] == body["detail"] and body["error"]
    return dict(body)


def test_a_4_mb_header_gets_431_and_the_connection_is_closed(server: GenServeProcess) -> None:
    conn = Connection(server)
    try:
        conn.send_until_answered(never_ending_header(4 * 1024 * 1024, 65536))
        body = assert_refused(conn.response(), 431, "headers_too_large")
        assert str(MAX_HEAD_BYTES) in body["error"]
        assert conn.closed_by_server()
    finally:
        conn.close()


def test_a_client_that_sends_all_its_headers_before_reading_still_reads_the_431(server: GenServeProcess) -> None:
    # requests writes the whole 4 MB head before it reads anything; the server keeps draining for a moment after
    # it answered, so the client reads the 431 instead of a connection reset.
    response = requests.get(f"{server.url}/health", headers={"X-Big": "a" * (4 * 1024 * 1024)}, timeout=30)
    assert response.status_code == 431
    assert response.json()["error_type"] == "headers_too_large"


def test_200_000_headers_get_431(server: GenServeProcess) -> None:
    conn = Connection(server)
    try:
        head = request_head(headers=200_000)
        assert len(head) > MAX_HEAD_BYTES and head.count(b"\r\n") == 200_002
        conn.send_until_answered(in_chunks(head))
        body = assert_refused(conn.response(), 431, "headers_too_large")
        assert f"more than {MAX_HEADERS} request headers" in body["error"]
        assert conn.closed_by_server()
    finally:
        conn.close()


def test_a_head_at_the_size_limit_is_served_and_one_byte_more_is_refused(server: GenServeProcess) -> None:
    response = exchange(server, request_head(size=MAX_HEAD_BYTES))
    assert response is not None and response.status == 200, response
    assert response.json()["status"] == "ok"
    assert_refused(exchange(server, request_head(size=MAX_HEAD_BYTES + 1)), 431, "headers_too_large")


def test_a_request_line_over_the_limit_gets_414(server: GenServeProcess) -> None:
    url = b"/jobs/" + b"a" * MAX_HEAD_BYTES
    body = assert_refused(exchange(server, b"GET " + url + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 414, "uri_too_long")
    assert "request line" in body["error"]


def test_100_headers_are_served_and_101_are_refused(server: GenServeProcess) -> None:
    response = exchange(server, request_head(headers=MAX_HEADERS))
    assert response is not None and response.status == 200, response
    body = assert_refused(exchange(server, request_head(headers=MAX_HEADERS + 1)), 431, "headers_too_large")
    assert f"more than {MAX_HEADERS} request headers" in body["error"]


def test_a_head_that_stalls_is_closed_after_the_header_timeout(server: GenServeProcess) -> None:
    conn = Connection(server, timeout=15)
    try:
        started = time.monotonic()
        conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        response = conn.response()
        elapsed = time.monotonic() - started
        if response is not None:
            body = assert_refused(response, 408, "header_timeout")
            assert "not complete within" in body["error"]
            assert conn.closed_by_server()
        assert 0.5 * HEADER_TIMEOUT_S <= elapsed <= 10, elapsed
    finally:
        conn.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server: GenServeProcess) -> None:
    conn = Connection(server, timeout=15)
    try:
        started = time.monotonic()
        assert conn.closed_by_server()
        assert 0.5 * HEADER_TIMEOUT_S <= time.monotonic() - started <= 10
    finally:
        conn.close()


def test_keep_alive_requests_share_a_connection_and_idle_between_them_is_not_a_stalled_head(
    server: GenServeProcess,
) -> None:
    conn = Connection(server)
    try:
        for pause in (0.0, 1.5 * HEADER_TIMEOUT_S):  # uvicorn's keep-alive timeout (5 s) owns the idle time
            time.sleep(pause)
            conn.send(request_head())
            response = conn.response()
            assert response is not None and response.status == 200, response
            assert response.headers.get("connection") != "close"
    finally:
        conn.close()


def test_pipelined_requests_are_all_served(server: GenServeProcess) -> None:
    conn = Connection(server)
    try:
        conn.send(request_head() + request_head(size=MAX_HEAD_BYTES - 100) + request_head(close=True))
        for _ in range(3):
            response = conn.response()
            assert response is not None and response.status == 200, response
        assert conn.closed_by_server()
    finally:
        conn.close()


def test_memory_stays_flat_under_8_never_ending_64_mb_headers(server: GenServeProcess) -> None:
    assert server.process is not None
    api = psutil.Process(server.process.pid)
    before = api.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, api.memory_info().rss)
            time.sleep(0.01)

    results: list[tuple[int, Response | None]] = []

    def flood() -> None:
        conn = Connection(server)
        try:
            sent = conn.send_until_answered(never_ending_header(64 * 1024 * 1024, 262144))
            results.append((sent, conn.response()))
        finally:
            conn.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    floods = [threading.Thread(target=flood) for _ in range(8)]
    for thread in floods:
        thread.start()
    for thread in floods:
        thread.join(60)
    done.set()
    sampler.join()
    peak = max(peak, api.memory_info().rss)

    assert len(results) == 8
    for sent, response in results:
        assert_refused(response, 431, "headers_too_large")
        assert sent < 32 * 1024 * 1024, sent  # refused early, not after the whole 64 MB
    growth_mb = (peak - before) / 2**20
    assert growth_mb < 50, f"API process grew {growth_mb:.0f} MB"
    response_after = requests.get(f"{server.url}/health", timeout=10)
    assert response_after.status_code == 200
