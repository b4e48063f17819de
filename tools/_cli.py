"""Shared plumbing of GenServe's client tools: --url/--api-key, one HTTP session, failures as exit codes.

Client side only: tools speak HTTP to a running server and never import genserve or workers.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NoReturn

import requests
from rich.console import Console

DEFAULT_URL = "http://localhost:12411"

# Colour only when stdout is a terminal (rich decides); errors go to stderr.
console = Console()
error_console = Console(stderr=True)


class ToolError(Exception):
    """A failure the tool reports in one line and turns into a non-zero exit code."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"GenServe base URL (default: {DEFAULT_URL})")
    parser.add_argument(
        "--api-key",
        default=None,
        help="API key, sent as 'Authorization: Bearer KEY' and 'X-API-Key: KEY' (servers without keys ignore it)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one request (default 600)")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def make_session(api_key: str | None) -> requests.Session:
    session = requests.Session()
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
        session.headers["X-API-Key"] = api_key
    return session


def request_json(
    session: requests.Session, method: str, url: str, *, timeout: float, expect_ok: bool = True, **kwargs: Any
) -> tuple[int, Any]:
    """One HTTP call → (status, parsed JSON body). Unreachable server or non-JSON body → ToolError."""
    try:
        response = session.request(method, url, timeout=timeout, **kwargs)
    except requests.ConnectionError as exc:
        raise ToolError(f"cannot reach {url}: is GenServe running there? ({_short(exc)})") from None
    except requests.Timeout:
        raise ToolError(f"{method} {url} did not answer within {timeout:g} s") from None
    except requests.RequestException as exc:
        raise ToolError(f"{method} {url} failed: {_short(exc)}") from None
    try:
        body = response.json()
    except ValueError:
        raise ToolError(f"{method} {url} answered {response.status_code} with a non-JSON body") from None
    if expect_ok and response.status_code >= 400:
        message = body.get("error") or body.get("detail") if isinstance(body, dict) else body
        raise ToolError(f"{method} {url} answered {response.status_code}: {message}")
    return response.status_code, body


def fail(message: str, code: int = 1) -> NoReturn:
    # soft_wrap: one line even when stderr is a pipe, so scripts and logs get the whole message together.
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")


def _short(exc: BaseException) -> str:
    """urllib3 buries the reason ("[Errno 111] Connection refused") deep in a long repr: surface it."""
    text = str(exc)
    match = _ERRNO.search(text)
    if match:
        return match.group(0).strip()
    return text if len(text) < 200 else text[:197] + "..."
