"""URL fetching (genserve.fetch) against real HTTP(S) servers on loopback: 127.0.0.1 and 127.0.0.2, ephemeral ports.

Nothing of the network stack is mocked. Where a test needs a hostname to resolve to a given address it uses the
policy's ``resolve`` override; where it needs loopback to count as "public" it uses ``address_allowed``.
"""

from __future__ import annotations

import io
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genserve import __version__, fetch
from genserve.errors import BadRequest, PayloadTooLarge
from genserve.fetch import FetchPolicy, IPAddress, fetch_url, is_public_address, is_url


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
FIELD = "input_image"
LOCAL = FetchPolicy(allow_private=True, timeout_s=5.0)
SMALL = FetchPolicy(allow_private=True, timeout_s=5.0, max_bytes=1000)
QUICK = FetchPolicy(allow_private=True, timeout_s=0.5)
LOOPBACK_1 = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK_2 = ipaddress.IPv4Address("127.0.0.2")

# Self-signed, CN and SAN "secure.test", valid 2000-2100 (made with openssl; the key is for these tests only).
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgTKLEyxQI2PNpxnnC
wZ7vO4yvQPF9du6V+sCUwpssL9KhRANCAART1fq39iqsfUdr7PTI3R0tL75PyECW
XIKrIjPQMGNTLgHxUX2MxA9A4uJY7WSDhqliCB2fvPw3d9wrK2/4zSpc
-----END PRIVATE KEY-----
"""
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBaDCCAQ2gAwIBAgIBATAKBggqhkjOPQQDAjAWMRQwEgYDVQQDDAtzZWN1cmUu
dGVzdDAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFowFjEUMBIGA1UE
AwwLc2VjdXJlLnRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAART1fq39iqs
fUdr7PTI3R0tL75PyECWXIKrIjPQMGNTLgHxUX2MxA9A4uJY7WSDhqliCB2fvPw3
d9wrK2/4zSpco0owSDAWBgNVHREEDzANggtzZWN1cmUudGVzdDAPBgNVHRMBAf8E
BTADAQH/MB0GA1UdDgQWBBRInXYmu+uUX3ANkPLaFxOoRCpeIDAKBggqhkjOPQQD
AgNJADBGAiEAvjL8pjSYy5H8HbTRsPGpCQ4/Mmx2TztGhKkvyD7HmZsCIQCa9Cdx
lvft9PidsFgvBHVcaxZvKagvNBqYS7/AFAaE2w==
-----END CERTIFICATE-----
"""


# --- the local servers ---------------------------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]


Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalServer

    def do_GET(self) -> None:
        self.server.hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = self.server.route(self.path)
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self)
        except OSError:  # the client gave up (refused body, timeout): expected in these tests
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def stopping(self) -> threading.Event:
        return self.server.stop


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        super().__init__((host, port), Handler)
        self.routes: dict[str, Route] = dict(ROUTES)
        self.hits: list[Hit] = []
        self.sni: list[str | None] = []  # server names sent in TLS handshakes
        self.stop = threading.Event()
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.server_address[0]!s}:{self.port}{path}"

    def route(self, path: str) -> Route | None:
        path = path.split("?", 1)[0]
        if path in self.routes:
            return self.routes[path]
        return next((r for prefix, r in self.routes.items() if prefix.endswith("/") and path.startswith(prefix)), None)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.do_handshake()  # in the request's thread, not the accept loop
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # broken pipes and failed handshakes are what several tests provoke


def reply(h: Handler, body: bytes, content_type: str = "image/png", status: int = 200, **headers: str) -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        h.send_header(name.replace("_", "-"), value)
    h.end_headers()
    h.wfile.write(body)


def redirect(h: Handler, location: str, status: int = 302) -> None:
    h.send_response(status)
    h.send_header("Location", location)
    h.send_header("Content-Length", "0")
    h.end_headers()


def chain(h: Handler) -> None:
    """/chain/N redirects to /chain/N-1 ... /chain/0 is the image."""
    n = int(h.path.rsplit("/", 1)[1])
    if n:
        redirect(h, f"/chain/{n - 1}", 307)
    else:
        reply(h, PNG)


def slow_chain(h: Handler) -> None:
    """Like /chain/, each hop taking 0.2 s."""
    h.stopping.wait(0.2)
    n = int(h.path.rsplit("/", 1)[1])
    if n:
        redirect(h, f"/slow-chain/{n - 1}")
    else:
        reply(h, PNG)


def close_delimited(h: Handler, size: int) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Connection", "close")  # no Content-Length: the body ends when the connection does
    h.end_headers()
    for _ in range(size // 500):
        h.wfile.write(b"x" * 500)


def chunked(h: Handler, body: bytes) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    for start in range(0, len(body), 300):
        piece = body[start : start + 300]
        h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    h.wfile.write(b"0\r\n\r\n")


def declared_too_big(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(10**9))
    h.end_headers()
    h.wfile.write(b"x" * 1000)
    h.close_connection = True


def trickle_body(h: Handler) -> None:
    """A byte every 50 ms: each read is quick, only the overall deadline can stop it."""
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "100")
    h.end_headers()
    for _ in range(100):
        if h.stopping.wait(0.05):
            return
        h.wfile.write(b"x")


def trickle_headers(h: Handler) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: ")
    for _ in range(100):
        if h.stopping.wait(0.05):
            return
        h.wfile.write(b"a")
    h.close_connection = True


def sleep_then_image(h: Handler) -> None:
    h.stopping.wait(3)
    reply(h, PNG)


def hang_up(h: Handler) -> None:
    h.close_connection = True  # no response at all


ROUTES: dict[str, Route] = {
    "/image.png": lambda h: reply(h, PNG),
    "/image-with-charset": lambda h: reply(h, PNG, "IMAGE/PNG; charset=binary"),
    "/dir/relative": lambda h: redirect(h, "../image.png?v=1"),
    "/absolute": lambda h: redirect(h, f"http://127.0.0.1:{h.server.port}/image.png", 301),
    "/chain/": chain,
    "/slow-chain/": slow_chain,
    "/no-location": lambda h: reply(h, b"", "text/plain", 302),
    "/to-file": lambda h: redirect(h, "file:///etc/passwd"),
    "/html": lambda h: reply(h, b"<html></html>", "text/html; charset=utf-8"),
    "/octet": lambda h: reply(h, PNG, "application/octet-stream"),
    "/no-type": lambda h: reply(h, PNG, ""),
    "/gzip": lambda h: reply(h, PNG, Content_Encoding="gzip"),
    "/exact": lambda h: reply(h, b"x" * 1000),
    "/declared-too-big": declared_too_big,
    "/streamed-too-big": lambda h: close_delimited(h, 5000),
    "/streamed-ok": lambda h: close_delimited(h, 1000),
    "/chunked-too-big": lambda h: chunked(h, b"x" * 5000),
    "/chunked-ok": lambda h: chunked(h, PNG),
    "/error": lambda h: reply(h, b"boom", "text/plain", 500),
    "/hang-up": hang_up,
    "/slow": sleep_then_image,
    "/trickle-body": trickle_body,
    "/trickle-headers": trickle_headers,
}


def start(server: LocalServer) -> Iterator[LocalServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """Server A, on 127.0.0.1."""
    yield from start(LocalServer("127.0.0.1"))


@pytest.fixture
def server_b(server: LocalServer) -> Iterator[LocalServer]:
    """Server B, on 127.0.0.2 and (when free) the same port as A: a connection to the wrong address lands here."""
    try:
        b = LocalServer("127.0.0.2", server.port)
    except OSError:
        b = LocalServer("127.0.0.2")
    yield from start(b)


@pytest.fixture
def cert_file(tmp_path: Path) -> Path:
    path = tmp_path / "secure.test.pem"
    path.write_text(TEST_KEY + TEST_CERT)
    return path


@pytest.fixture
def tls_server(cert_file: Path) -> Iterator[LocalServer]:
    """An HTTPS server on 127.0.0.1 with the self-signed secure.test certificate; records the SNI it is sent."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file)
    server = LocalServer("127.0.0.1", tls=context)

    def record_sni(_sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        server.sni.append(name)

    context.sni_callback = record_sni
    yield from start(server)


@dataclass
class Resolver:
    """A resolve override: answers[i] for the i-th call (the last one again after that); records the calls."""

    answers: list[list[str]]
    calls: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append((host, port))
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        return [ipaddress.ip_address(a) for a in answer]


def only(*allowed: IPAddress) -> Callable[[IPAddress], bool]:
    return lambda ip: ip in allowed


# --- fetching with private targets allowed -------------------------------------------------------------------------


def test_fetches_image_bytes(server: LocalServer) -> None:
    assert fetch_url(server.url("/image.png"), FIELD, LOCAL) == PNG
    assert fetch_url("  " + server.url("/image-with-charset") + "\n", FIELD, LOCAL) == PNG


def test_sends_plain_headers_and_no_proxy(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: a proxied fetch would fail
    assert fetch_url(server.url("/image.png"), FIELD, LOCAL) == PNG
    headers = server.hits[0].headers
    assert headers["user-agent"] == f"GenServe/{__version__}"
    assert headers["accept"] == "image/*"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert "cookie" not in headers and "authorization" not in headers


def test_follows_relative_and_absolute_redirects(server: LocalServer) -> None:
    assert fetch_url(server.url("/dir/relative"), FIELD, LOCAL) == PNG
    assert [hit.path for hit in server.hits] == ["/dir/relative", "/image.png?v=1"]
    assert fetch_url(server.url("/absolute"), FIELD, LOCAL) == PNG
    assert [hit.path for hit in server.hits[2:]] == ["/absolute", "/image.png"]


def test_redirect_limit(server: LocalServer) -> None:
    policy = FetchPolicy(allow_private=True, timeout_s=5.0, max_redirects=3)
    assert fetch_url(server.url("/chain/3"), FIELD, policy) == PNG
    server.hits.clear()
    with pytest.raises(BadRequest, match="too many redirects"):
        fetch_url(server.url("/chain/4"), FIELD, policy)
    assert [hit.path for hit in server.hits] == ["/chain/4", "/chain/3", "/chain/2", "/chain/1"]  # /chain/0 never


def test_redirect_without_location(server: LocalServer) -> None:
    with pytest.raises(BadRequest, match="302 without a Location"):
        fetch_url(server.url("/no-location"), FIELD, LOCAL)


def test_redirect_to_another_scheme_is_refused(server: LocalServer) -> None:
    with pytest.raises(BadRequest, match="scheme 'file' is not allowed"):
        fetch_url(server.url("/to-file"), FIELD, LOCAL)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/html", "Content-Type 'text/html'; only image/\\* responses"),
        ("/octet", "'application/octet-stream'.*application/octet-stream is not"),
        ("/no-type", "no Content-Type"),
        ("/gzip", "Content-Encoding 'gzip'"),
    ],
)
def test_refuses_responses_that_are_not_plain_images(server: LocalServer, path: str, expected: str) -> None:
    with pytest.raises(BadRequest, match=f"^{FIELD}: .*{expected}"):
        fetch_url(server.url(path), FIELD, LOCAL)


def test_body_at_the_limit_is_accepted(server: LocalServer) -> None:
    assert fetch_url(server.url("/exact"), FIELD, SMALL) == b"x" * 1000
    assert len(fetch_url(server.url("/streamed-ok"), FIELD, SMALL)) == 1000
    assert fetch_url(server.url("/chunked-ok"), FIELD, SMALL) == PNG


@pytest.mark.parametrize("path", ["/declared-too-big", "/streamed-too-big", "/chunked-too-big"])
def test_body_over_the_limit(server: LocalServer, path: str) -> None:
    began = time.monotonic()
    with pytest.raises(PayloadTooLarge, match=f"{FIELD}: .* larger than the 0.0 MB limit"):
        fetch_url(server.url(path), FIELD, SMALL)
    assert time.monotonic() - began < 2


@pytest.mark.parametrize(("path", "status"), [("/missing", "404"), ("/error", "500")])
def test_error_status_is_a_bad_request(server: LocalServer, path: str, status: str) -> None:
    with pytest.raises(BadRequest, match=f"returned HTTP {status}"):
        fetch_url(server.url(path), FIELD, LOCAL)


def test_connection_failures_are_bad_requests(server: LocalServer) -> None:
    with pytest.raises(BadRequest, match="could not fetch .*Remote end closed"):
        fetch_url(server.url("/hang-up"), FIELD, LOCAL)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free_port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(BadRequest, match="could not fetch .*[Rr]efused"):
        fetch_url(f"http://127.0.0.1:{free_port}/x.png", FIELD, LOCAL)


@pytest.mark.parametrize("path", ["/slow", "/trickle-body", "/trickle-headers", "/slow-chain/4"])
def test_overall_deadline(server: LocalServer, path: str) -> None:
    """A silent server, a trickle of body or header bytes (every read quick) and slow redirect hops all end at the
    deadline of the whole fetch."""
    policy = FetchPolicy(allow_private=True, timeout_s=0.5, max_redirects=5)
    began = time.monotonic()
    with pytest.raises(BadRequest, match=f"^{FIELD}: timed out after 0.5 s fetching http://127.0.0.1"):
        fetch_url(server.url(path), FIELD, policy)
    assert 0.45 < time.monotonic() - began < 1.5


# --- private targets refused by default ----------------------------------------------------------------------------


def test_loopback_literal_refused_before_connecting(server: LocalServer) -> None:
    with pytest.raises(BadRequest) as caught:
        fetch_url(server.url("/image.png"), FIELD, FetchPolicy())
    assert caught.value.message == (
        f"{FIELD}: URL host 127.0.0.1 is a loopback address; set inputs.allow_private_urls to allow it"
    )
    assert server.hits == []


def test_localhost_refused(server: LocalServer) -> None:
    with pytest.raises(BadRequest, match=r"URL host 'localhost' resolves to (127\.0\.0\.1|::1), a loopback address"):
        fetch_url(server.url("/image.png", host="localhost"), FIELD, FetchPolicy())
    assert server.hits == []


def test_ipv6_loopback_literal_refused() -> None:
    with pytest.raises(BadRequest, match="URL host ::1 is a loopback address; set inputs.allow_private_urls"):
        fetch_url("http://[::1]/", FIELD, FetchPolicy())


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "a link-local address"),
        ("10.0.0.5", "a private address"),
        ("172.16.3.4", "a private address"),
        ("192.168.1.20", "a private address"),
        ("100.64.0.1", "a shared \\(carrier-grade NAT\\) address"),
        ("127.0.0.1", "a loopback address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("::ffff:127.0.0.1", "an IPv4-mapped address of 127.0.0.1, a loopback address"),
        ("::ffff:169.254.169.254", "an IPv4-mapped address of 169.254.169.254, a link-local address"),
        ("2002:a00:5::1", "a 6to4 address of 10.0.0.5, a private address"),
        ("64:ff9b::a00:5", "a NAT64 address of 10.0.0.5, a private address"),
        ("fd12:3456::1", "a private address"),
        ("fe80::1", "a link-local address"),
        ("224.0.0.251", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.1", "a special-purpose, non-global address"),
    ],
)
def test_private_resolutions_refused(address: str, reason: str) -> None:
    """No connection is attempted: the refusal comes first (nothing listens at these; a connect would time out)."""
    resolver = Resolver([[address]])
    policy = FetchPolicy(resolve=resolver, timeout_s=0.5)
    shown = re.escape(str(ipaddress.ip_address(address)))  # ::ffff:7f00:1 on Python 3.11, ::ffff:127.0.0.1 later
    with pytest.raises(BadRequest, match=f"^{FIELD}: URL host 'internal.test' resolves to {shown}, {reason}; "):
        fetch_url("https://internal.test/cat.png", FIELD, policy)
    assert resolver.calls == [("internal.test", 443)]


def test_message_names_address_and_config_key() -> None:
    with pytest.raises(BadRequest) as caught:
        fetch_url("http://x/a.png", FIELD, FetchPolicy(resolve=Resolver([["10.0.0.5"]])))
    assert caught.value.message == (
        "input_image: URL host 'x' resolves to 10.0.0.5, a private address; set inputs.allow_private_urls to allow it"
    )
    assert caught.value.status_code == 400


def test_any_private_answer_refuses_the_host() -> None:
    resolver = Resolver([["8.8.8.8", "2606:4700:4700::1111", "10.0.0.5"]])
    with pytest.raises(BadRequest, match="resolves to 10.0.0.5, a private address"):
        fetch_url("http://mixed.test/a.png", FIELD, FetchPolicy(resolve=resolver, timeout_s=0.5))


def test_unresolvable_host() -> None:
    with pytest.raises(BadRequest, match="could not resolve URL host 'nowhere.invalid'"):
        fetch_url("http://nowhere.invalid/a.png", FIELD, FetchPolicy(timeout_s=5))


# --- redirects and DNS rebinding -----------------------------------------------------------------------------------


def test_redirect_target_is_checked_again(server: LocalServer, server_b: LocalServer) -> None:
    server.routes["/to-b"] = lambda h: redirect(h, server_b.url("/image.png"))
    policy = FetchPolicy(address_allowed=only(LOOPBACK_1), timeout_s=5.0)
    with pytest.raises(BadRequest, match="URL host 127.0.0.2 is a loopback address"):
        fetch_url(server.url("/to-b"), FIELD, policy)
    assert [hit.path for hit in server.hits] == ["/to-b"]
    assert server_b.hits == []


def test_redirect_to_a_name_is_resolved_and_checked(server: LocalServer, server_b: LocalServer) -> None:
    server.routes["/to-b"] = lambda h: redirect(h, server_b.url("/image.png", host="b.test"))
    resolver = Resolver([["127.0.0.2"]])
    policy = FetchPolicy(address_allowed=only(LOOPBACK_1), resolve=resolver, timeout_s=5.0)
    with pytest.raises(BadRequest, match="URL host 'b.test' resolves to 127.0.0.2, a loopback address"):
        fetch_url(server.url("/to-b"), FIELD, policy)
    assert resolver.calls == [("b.test", server_b.port)]
    assert server_b.hits == []


def test_dns_rebinding_connects_to_the_vetted_address(server: LocalServer, server_b: LocalServer) -> None:
    """The resolver answers 127.0.0.1 once, then 127.0.0.2: the fetch uses the vetted answer and never asks again."""
    resolver = Resolver([["127.0.0.1"], ["127.0.0.2"]])
    policy = FetchPolicy(address_allowed=only(LOOPBACK_1), resolve=resolver, timeout_s=5.0)
    assert fetch_url(server.url("/image.png", host="rebind.test"), FIELD, policy) == PNG
    assert resolver.calls == [("rebind.test", server.port)]
    assert [(hit.path, hit.headers["host"]) for hit in server.hits] == [("/image.png", f"rebind.test:{server.port}")]
    assert server_b.hits == []


def test_each_hop_resolves_again(server: LocalServer, server_b: LocalServer) -> None:
    """A host that rebinds between a redirect's hops is checked again on the second hop."""
    resolver = Resolver([["127.0.0.1"], ["127.0.0.2"]])
    policy = FetchPolicy(address_allowed=only(LOOPBACK_1), resolve=resolver, timeout_s=5.0)
    with pytest.raises(BadRequest, match="'rebind.test' resolves to 127.0.0.2"):
        fetch_url(server.url("/chain/1", host="rebind.test"), FIELD, policy)
    assert len(resolver.calls) == 2
    assert [hit.path for hit in server.hits] == ["/chain/1"]
    assert server_b.hits == []


# --- https: SNI and certificate verification against the hostname --------------------------------------------------


def test_https_verifies_certificates(tls_server: LocalServer) -> None:
    """The default context trusts the system CAs only: the self-signed certificate is refused (after SNI)."""
    policy = FetchPolicy(address_allowed=only(LOOPBACK_1), resolve=Resolver([["127.0.0.1"]]), timeout_s=5.0)
    with pytest.raises(BadRequest, match="could not fetch https://secure.test.*certificate verify failed"):
        fetch_url(tls_server.url("/image.png", host="secure.test"), FIELD, policy)
    assert tls_server.sni == ["secure.test"]
    assert tls_server.hits == []


def test_https_to_a_vetted_address_with_the_hostname(
    tls_server: LocalServer, cert_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trusting the test certificate: connected to 127.0.0.1, the name is checked against 'secure.test'."""
    trusting = ssl.create_default_context(cafile=str(cert_file))
    monkeypatch.setattr(fetch, "_tls_context", lambda: trusting)
    policy = FetchPolicy(address_allowed=only(LOOPBACK_1), resolve=Resolver([["127.0.0.1"]]), timeout_s=5.0)
    assert fetch_url(tls_server.url("/image.png", host="secure.test"), FIELD, policy) == PNG
    assert tls_server.hits[0].headers["host"] == f"secure.test:{tls_server.port}"
    assert tls_server.sni == ["secure.test"]
    with pytest.raises(BadRequest, match="could not fetch https://other.test.*[Hh]ostname mismatch"):
        fetch_url(tls_server.url("/image.png", host="other.test"), FIELD, policy)
    assert len(tls_server.hits) == 1


# --- URL checks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://example.com/a.png", True),
        ("https://example.com/a.png", True),
        ("HTTPS://EXAMPLE.COM/A.PNG", True),
        ("  \n https://example.com/a.png ", True),
        ("ftp://example.com/a.png", False),
        ("file:///etc/passwd", False),
        ("data:image/png;base64,iVBORw0KGgo=", False),
        ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", False),
        ("http:/example.com", False),
        ("httpx://example.com", False),
        ("", False),
    ],
)
def test_is_url(value: str, expected: bool) -> None:
    assert is_url(value) is expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///etc/passwd", "URL scheme 'file' is not allowed; only http and https"),
        ("ftp://example.com/a.png", "URL scheme 'ftp' is not allowed"),
        ("gopher://example.com:70/_x", "URL scheme 'gopher' is not allowed"),
        ("javascript:alert(1)", "URL scheme 'javascript' is not allowed"),
        ("http://user:pass@example.com/a.png", "URLs with credentials \\(user:password@host\\) are not allowed"),
        ("https://user@127.0.0.1/a.png", "URLs with credentials"),
        ("http:///a.png", "has no host"),
        ("http://example.com:99999/a.png", "is not a valid URL"),
        ("http://[::1/a.png", "is not a valid URL"),
        ("example.com/a.png", "is not an absolute http\\(s\\) URL"),
    ],
)
def test_url_refusals(url: str, expected: str) -> None:
    resolver = Resolver([["8.8.8.8"]])
    with pytest.raises(BadRequest, match=f"^{FIELD}: .*{expected}"):
        fetch_url(url, FIELD, FetchPolicy(allow_private=True, resolve=resolver, timeout_s=0.5))
    assert resolver.calls == []


def test_credentials_are_not_echoed() -> None:
    with pytest.raises(BadRequest) as caught:
        fetch_url("http://admin:hunter2@example.com/", FIELD, FetchPolicy())
    assert "hunter2" not in caught.value.message


# --- the address rule ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("2002:808:808::1", True),
        ("64:ff9b::808:808", True),
        ("127.0.0.1", False),
        ("127.255.255.254", False),
        ("10.0.0.5", False),
        ("172.31.255.255", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("100.127.255.255", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),
        ("198.18.0.1", False),
        ("::", False),
        ("::1", False),
        ("fc00::1", False),
        ("fd00:ec2::254", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("2001:db8::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::127.0.0.1", False),
        ("2002:7f00:1::1", False),
        ("2002:a9fe:a9fe::1", False),
        ("64:ff9b::7f00:1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public
    assert is_public_address(ipaddress.ip_address(address)) is public
