"""Fetching an input image given as an http(s) URL, in the API process (blocking: call it from a worker thread).

A URL in a request makes the *server* open a connection on the client's behalf, so without care GenServe becomes a
proxy into the operator's network (server-side request forgery): cloud metadata at 169.254.169.254, admin panels on
localhost, databases on 10.x. The rules here, each checked on the first URL and again on every redirect hop:

- only http and https; no credentials in the URL; a host is required;
- the host is resolved once per hop and *every* address it resolves to must pass the address rule (by default: a
  globally routable unicast address, see ``is_public_address``; ``inputs.allow_private_urls`` lifts it);
- the connection goes to the vetted address itself, never to the hostname again, so a DNS answer that changes
  between the check and the connect (DNS rebinding) cannot slip through; the original Host header, SNI and
  certificate verification against the hostname are kept;
- redirects are followed by hand, at most ``max_redirects`` of them;
- the response must be 2xx with an ``image/*`` Content-Type; the body is capped at ``max_bytes`` (checked on
  Content-Length before reading, and while streaming); one deadline covers resolution, connects, TLS handshakes,
  redirects and every read, so a server that trickles bytes cannot hold a thread past ``timeout_s``;
- no cookies, no proxies from the environment, no content encodings.

Whatever the remote side does ends as ``BadRequest`` (400) or ``PayloadTooLarge`` (413), never a 500.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from genserve import __version__
from genserve.errors import BadRequest, PayloadTooLarge

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_PRIVATE_KEY = "inputs.allow_private_urls"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = f"GenServe/{__version__}"
_CHUNK = 64 * 1024
_URL_SHOWN_CHARS = 200
# Characters left as they are when a path or query is percent-encoded: the reserved set plus '%' (already encoded).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"

_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_ULA = ipaddress.ip_network("fc00::/7")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are the IPv4 target
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible IPv6 (also holds :: and ::1)


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False  # allow loopback/private/link-local/... targets (config inputs.allow_private_urls)
    timeout_s: float = 10.0  # whole fetch, all redirects included (resolve + connect + read)
    max_bytes: int = 50 * 1024 * 1024  # body cap
    max_redirects: int = 3
    # Override of the address rule (tests); None = the rule from allow_private. When set, it alone decides.
    address_allowed: Callable[[IPAddress], bool] | None = None
    # Override of DNS (tests); None = socket.getaddrinfo. Not consulted for IP-literal hosts.
    resolve: Callable[[str, int], list[IPAddress]] | None = None


# --- URLs --------------------------------------------------------------------------------------------------------


def is_url(value: str) -> bool:
    """True for an http:// or https:// URL (case-insensitive, surrounding whitespace ignored)."""
    return value.lstrip()[:8].lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class _Target:
    url: str  # as given (after strip), for messages and for resolving relative redirects
    tls: bool
    host: str  # ASCII: IDNA-encoded name or IP literal without brackets
    port: int
    path: str  # request target: percent-encoded path and query
    literal: IPAddress | None  # the host when it is an IP literal

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"


def _shown(url: str) -> str:
    return url if len(url) <= _URL_SHOWN_CHARS else url[:_URL_SHOWN_CHARS] + "…"


def _split(url: str, field: str) -> tuple[SplitResult, int | None]:
    try:
        parts = urlsplit(url)
        return parts, parts.port  # .port raises ValueError on a bad port
    except ValueError as exc:
        raise BadRequest(f"{field}: {_shown(url)!r} is not a valid URL ({exc})") from None


def _ascii_host(hostname: str, field: str) -> tuple[str, IPAddress | None]:
    try:
        literal = ipaddress.ip_address(hostname)
    except ValueError:
        pass
    else:
        return hostname, literal
    try:
        return hostname.encode("idna").decode("ascii"), None
    except UnicodeError:
        raise BadRequest(f"{field}: URL host {hostname!r} is not a valid host name") from None


def _parse(url: str, field: str) -> _Target:
    """Check scheme, credentials and host of one URL (the first one or a redirect target)."""
    parts, port = _split(url, field)
    scheme = parts.scheme.lower()
    if not scheme:
        raise BadRequest(f"{field}: {_shown(url)!r} is not an absolute http(s) URL")
    if scheme not in ("http", "https"):
        raise BadRequest(f"{field}: URL scheme {scheme!r} is not allowed; only http and https URLs are fetched")
    if "@" in parts.netloc:
        raise BadRequest(f"{field}: URLs with credentials (user:password@host) are not allowed")
    if not parts.hostname:
        raise BadRequest(f"{field}: URL {_shown(url)!r} has no host")
    host, literal = _ascii_host(parts.hostname, field)
    tls = scheme == "https"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_QUERY_SAFE)
    return _Target(url=url, tls=tls, host=host, port=port or (443 if tls else 80), path=path, literal=literal)


# --- addresses ---------------------------------------------------------------------------------------------------


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), with what kind of embedding it is."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped address of", ip.ipv4_mapped
    if ip in _NAT64:
        return "a NAT64 address of", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "a 6to4 address of", ip.sixtofour
    return None


def _address_problem(ip: IPAddress) -> str | None:
    """Why the default rule refuses an address ("a loopback address"), or None if it is a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            kind, v4 = embedded
            problem = _address_problem(v4)
            return f"{kind} {v4}, {problem}" if problem else None
        if ip.teredo is not None:
            return "a Teredo tunnel address"
        if ip in _V4_COMPATIBLE and not (ip.is_unspecified or ip.is_loopback):
            return "an IPv4-compatible IPv6 address (deprecated)"
        if ip.is_site_local:
            return "a site-local address"
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip in _SHARED, "a shared (carrier-grade NAT) address"),
        (any(ip in net for net in _RFC1918) or ip in _ULA, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private or not ip.is_global, "a special-purpose, non-global address"),
    )
    return next((reason for failed, reason in checks if failed), None)


def is_public_address(ip: IPAddress | str) -> bool:
    """The default address rule: True only for a globally routable unicast address.

    Refused: loopback, private (RFC 1918, fc00::/7), link-local (169.254/16 with cloud metadata, fe80::/10),
    multicast, reserved, unspecified, shared 100.64/10, site-local, anything ``ipaddress`` calls non-global, and IPv6
    addresses that embed a refused IPv4 address (IPv4-mapped, NAT64, 6to4) or are Teredo/IPv4-compatible.
    """
    return _address_problem(ipaddress.ip_address(ip) if isinstance(ip, str) else ip) is None


# --- the deadline ------------------------------------------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; TimeoutError once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left


# --- resolution --------------------------------------------------------------------------------------------------


def _getaddrinfo(host: str, port: int, deadline: _Deadline) -> list[IPAddress]:
    """socket.getaddrinfo (both families) bounded by the deadline: it has no timeout of its own, so it runs in a
    daemon thread that is abandoned (and ends at the resolver's own timeout) if the deadline passes first."""
    outcome: list[list[IPAddress] | BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            outcome.append([ipaddress.ip_address(info[4][0]) for info in infos])
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="genserve-resolve", daemon=True).start()
    if not done.wait(deadline.remaining()):
        raise TimeoutError("name resolution")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _resolve(target: _Target, field: str, policy: FetchPolicy, deadline: _Deadline) -> list[IPAddress]:
    if target.literal is not None:
        return [target.literal]
    try:
        if policy.resolve is not None:
            found = policy.resolve(target.host, target.port)
        else:
            found = _getaddrinfo(target.host, target.port, deadline)
    except TimeoutError:
        raise
    except (OSError, UnicodeError) as exc:  # socket.gaierror mostly
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise BadRequest(f"{field}: could not resolve URL host {target.host!r} ({reason})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(a)) for a in found))  # de-duplicated, order kept
    if not addresses:
        raise BadRequest(f"{field}: URL host {target.host!r} does not resolve to any address")
    return addresses


def _vet(target: _Target, addresses: list[IPAddress], field: str, policy: FetchPolicy) -> None:
    """Refuse the hop when any address the host resolves to is not allowed."""
    if policy.address_allowed is None and policy.allow_private:
        return
    for ip in addresses:
        allowed = policy.address_allowed(ip) if policy.address_allowed is not None else is_public_address(ip)
        if allowed:
            continue
        reason = _address_problem(ip) or "an address that is not allowed"
        if target.literal is not None:
            what = f"URL host {target.host} is {reason}"
        else:
            what = f"URL host {target.host!r} resolves to {ip}, {reason}"
        raise BadRequest(f"{field}: {what}; set {ALLOW_PRIVATE_KEY} to allow it")


# --- connections pinned to a vetted address ----------------------------------------------------------------------


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """System CAs, certificate and hostname verification (created once; an SSLContext is thread-safe to use)."""
    return ssl.create_default_context()


def _connect_one(ip: IPAddress, port: int, deadline: _Deadline) -> socket.socket:
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(deadline.remaining())
        sock.connect((str(ip), port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_socket(target: _Target, addresses: list[IPAddress], deadline: _Deadline) -> socket.socket:
    """A TCP (and TLS) connection to the first vetted address that answers; never to the hostname."""
    error: OSError | None = None
    for ip in addresses:
        try:
            sock = _connect_one(ip, target.port, deadline)
            break
        except TimeoutError:
            raise
        except OSError as exc:
            error = exc
    else:
        assert error is not None  # addresses is never empty
        raise error
    if not target.tls:
        return sock
    try:
        # The handshake runs under the socket timeout, which CPython's ssl applies to the whole handshake.
        sock.settimeout(deadline.remaining())
        return _tls_context().wrap_socket(sock, server_hostname=target.host)
    except BaseException:
        sock.close()
        raise


class _DeadlineReader(io.RawIOBase):
    """Raw reads from a socket, each one under a timeout of whatever is left of the deadline; so a slow trickle of
    headers or body cannot outlast it. Reads go through the socket's own SocketIO, which keeps the socket open
    while the response reads, even after http.client closes its connection object."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._io = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int | None:
        self._sock.settimeout(self._deadline.remaining())
        return self._io.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._io.close()
        super().close()


class _DeadlineSocket:
    """What http.client sees as its socket: sends and reads under the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: ReadableBuffer) -> None:
        self._sock.settimeout(self._deadline.remaining())  # sendall's timeout covers the whole call
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        self._sock.close()


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a vetted address; Host, SNI and certificate checks use the URL's hostname."""

    def __init__(self, target: _Target, addresses: list[IPAddress], deadline: _Deadline) -> None:
        super().__init__(target.host, target.port)
        self._target = target
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        self.sock = _DeadlineSocket(_open_socket(self._target, self._addresses, self._deadline), self._deadline)


# --- one request -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Redirect:
    location: str


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _too_large(target: _Target, field: str, policy: FetchPolicy) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{field}: the image at {_shown(target.url)} is larger than the {_megabytes(policy.max_bytes)} limit per image"
    )


def _check_headers(response: http.client.HTTPResponse, target: _Target, field: str, policy: FetchPolicy) -> None:
    content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    if not content_type.startswith("image/"):
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise BadRequest(
            f"{field}: {_shown(target.url)} returned {got}; only image/* responses are accepted "
            "(application/octet-stream is not)"
        )
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise BadRequest(f"{field}: {_shown(target.url)} returned Content-Encoding {encoding!r}; send it uncompressed")
    if response.length is not None and response.length > policy.max_bytes:
        raise _too_large(target, field, policy)


def _read_body(response: http.client.HTTPResponse, target: _Target, field: str, policy: FetchPolicy) -> bytes:
    body = bytearray()
    while chunk := response.read(min(_CHUNK, policy.max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > policy.max_bytes:
            raise _too_large(target, field, policy)
    return bytes(body)


def _handle(response: http.client.HTTPResponse, target: _Target, field: str, policy: FetchPolicy) -> bytes | _Redirect:
    status = response.status
    if status in REDIRECT_STATUSES:
        location = response.getheader("Location")
        if not location:
            raise BadRequest(f"{field}: {_shown(target.url)} answered HTTP {status} without a Location")
        return _Redirect(location.strip())
    if not 200 <= status < 300:
        reason = (response.reason or "")[:100]
        raise BadRequest(f"{field}: {_shown(target.url)} returned HTTP {status} {reason}".rstrip())
    _check_headers(response, target, field, policy)
    return _read_body(response, target, field, policy)


def _request(
    target: _Target, addresses: list[IPAddress], field: str, policy: FetchPolicy, deadline: _Deadline
) -> bytes | _Redirect:
    connection = _PinnedConnection(target, addresses, deadline)
    headers = {
        "Host": target.host_header,
        "User-Agent": USER_AGENT,
        "Accept": "image/*",
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    try:
        connection.request("GET", target.path, headers=headers)
        with connection.getresponse() as response:
            return _handle(response, target, field, policy)
    finally:
        connection.close()


def _hop(url: str, field: str, policy: FetchPolicy, deadline: _Deadline) -> bytes | _Redirect:
    """Every check and one request for one URL: parse, resolve once, vet, connect to a vetted address, read."""
    target = _parse(url, field)
    addresses = _resolve(target, field, policy, deadline)
    _vet(target, addresses, field, policy)
    try:
        return _request(target, addresses, field, policy, deadline)
    except TimeoutError:
        raise
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, TLS/certificate failure, bad HTTP
        reason = str(exc) or type(exc).__name__
        raise BadRequest(f"{field}: could not fetch {_shown(url)} ({reason})") from None


@dataclass(frozen=True)
class VettedConnection:
    """An unopened connection that can only reach addresses the guard allowed, and what a request through it sends."""

    connection: http.client.HTTPConnection
    path: str  # request target: percent-encoded path and query
    host_header: str  # the URL's host (and port when not the default), for the Host header


def vetted_connection(url: str, field: str, policy: FetchPolicy) -> VettedConnection:
    """The guard above for a URL GenServe calls on its own (webhook deliveries): check the URL, resolve its host once,
    vet every address, and return a connection pinned to those addresses, so DNS rebinding cannot move it later.

    One deadline of ``policy.timeout_s`` starts here and covers resolution, connect, TLS and every send and read.
    Raises BadRequest when the URL or one of its addresses is refused, TimeoutError when resolution outlasts the
    deadline. No redirect is followed: that, and what to send, is the caller's business."""
    deadline = _Deadline(policy.timeout_s)
    target = _parse(url.strip(), field)
    addresses = _resolve(target, field, policy, deadline)
    _vet(target, addresses, field, policy)
    return VettedConnection(_PinnedConnection(target, addresses, deadline), target.path, target.host_header)


def fetch_url(url: str, field: str, policy: FetchPolicy) -> bytes:
    """The body of an image URL, after the checks in the module docstring; BadRequest/PayloadTooLarge otherwise."""
    deadline = _Deadline(policy.timeout_s)
    first = current = url.strip()
    try:
        for _ in range(policy.max_redirects + 1):
            result = _hop(current, field, policy, deadline)
            if not isinstance(result, _Redirect):
                return result
            current = urljoin(current, result.location)
    except TimeoutError:
        raise BadRequest(f"{field}: timed out after {policy.timeout_s:g} s fetching {_shown(first)}") from None
    raise BadRequest(f"{field}: too many redirects (more than {policy.max_redirects}) fetching {_shown(first)}")
