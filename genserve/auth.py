"""API keys: who may use the service, and for what (API process).

Keys come from config (``auth.keys``), from ``GENSERVE_API_KEYS`` (merged into the same list by genserve.config)
and from a keys file that stores only SHA-256 digests. In memory every key is kept as its digest too. A presented
key is hashed and compared with ``hmac.compare_digest`` against every known digest — no early exit — so the time
taken says nothing about which key or how much of it matched. Keys are never logged; only their names are.

Once any key is configured, every route except /health and /ready needs one, sent as ``Authorization: Bearer``,
``X-API-Key`` or HTTP Basic with the key as the password (a browser opening /docs can send only that): 401 without
or with an unknown key (on the docs pages with a Basic challenge, so the browser prompts), 403 without the route's
scope. The docs (genserve.docs) need ``read``, or nothing with ``auth.public_docs``. Scopes: ``read`` for GET,
``generate`` for everything that starts or stops work, ``metrics`` for GET /metrics, ``admin`` for all.

A job belongs to the key that submitted it. Without ``admin`` a key sees, lists, streams, downloads and cancels
only its own jobs; another key's job answers 404 as an unknown id would (``Caller.sees``).

``python -m genserve.auth`` reads a key on stdin and prints the line to put in a keys file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from fastapi import Request

from genserve.config import Config, ConfigError, expand_path
from genserve.docs import DOCS_PATHS
from genserve.errors import Forbidden, Unauthorized

OPEN_PATHS = frozenset({"/health", "/ready"})
ALL_SCOPES = frozenset({"generate", "read", "metrics", "admin"})
METRICS_PATH = "/metrics"
DOCS_CHALLENGE = 'Basic realm="GenServe API docs"'  # a browser answers it with a login prompt


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as far as jobs are concerned (``request.state.caller``)."""

    name: str | None  # the key's name; None when keys are off
    admin: bool  # sees every key's jobs (keys off: everyone does)

    def sees(self, owner: str | None) -> bool:
        """May this caller see (and cancel) a job submitted by ``owner``?"""
        return self.admin or owner == self.name

    @property
    def only_owner(self) -> str | None:
        """The owner a listing is restricted to; None: every job."""
        return None if self.admin else self.name


ANYONE = Caller(name=None, admin=True)  # keys off: one tenant, who sees everything


def caller_of(request: Request) -> Caller:
    caller: Caller = getattr(request.state, "caller", ANYONE)
    return caller


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    def __init__(self, keys: list[ApiKey], public_docs: bool = False) -> None:
        self._keys = keys
        self.public_docs = public_docs  # auth.public_docs: the docs need no key even when keys exist

    @classmethod
    def from_config(cls, config: Config) -> KeyRing:
        keys = [ApiKey(key.name, digest(key.key), frozenset(key.scopes)) for key in config.auth.keys]
        if config.auth.keys_file:
            keys.extend(load_keys_file(expand_path(config.auth.keys_file)))
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"API key names must be unique; repeated: {', '.join(duplicates)}")
        return cls(keys, public_docs=config.auth.public_docs)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def names(self) -> list[str]:
        return [key.name for key in self._keys]

    def identify(self, presented: str) -> ApiKey | None:
        wanted = digest(presented)
        found: ApiKey | None = None
        for key in self._keys:  # every digest is compared, whichever matches
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found


def load_keys_file(path: Path) -> list[ApiKey]:
    """``{keys: [{name, sha256, scopes}]}``; errors name the file and entry, never a digest."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read auth.keys_file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"auth.keys_file {path} is not valid YAML: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"auth.keys_file {path} must hold 'keys:', a list of {{name, sha256, scopes}}")
    keys = []
    for index, entry in enumerate(entries):
        where = f"auth.keys_file {path}, entry {index + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError(f"{where}: needs a name")
        hex_digest = str(entry.get("sha256", ""))
        if len(hex_digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hex_digest):
            raise ConfigError(f"{where} ({entry['name']}): sha256 must be 64 hex digits")
        scopes = entry.get("scopes", ["generate", "read"])
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= ALL_SCOPES:
            raise ConfigError(f"{where} ({entry['name']}): scopes must be a list from {sorted(ALL_SCOPES)}")
        keys.append(ApiKey(entry["name"], bytes.fromhex(hex_digest), frozenset(scopes)))
    return keys


def required_scope(method: str, path: str, public_docs: bool = False) -> str | None:
    """The scope a request needs; None for the open routes."""
    if path in OPEN_PATHS or (public_docs and path in DOCS_PATHS):
        return None
    if path == METRICS_PATH:
        return "metrics"
    return "read" if method in ("GET", "HEAD", "OPTIONS") else "generate"


def presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scheme.lower() == "basic":
        password = basic_password(token.strip())
        if password:
            return password
    header = request.headers.get("x-api-key", "").strip()
    return header or None


def basic_password(credentials: str) -> str | None:
    """The password of HTTP Basic credentials (base64 of "user:password"; any user name), None if malformed."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon else None


def unauthorized(message: str, path: str) -> Unauthorized:
    error = Unauthorized(message)
    if path in DOCS_PATHS:  # a browser navigating to the docs cannot send a Bearer header: have it ask for Basic
        error.headers["WWW-Authenticate"] = DOCS_CHALLENGE
    return error


async def authorize(request: Request) -> None:
    """FastAPI dependency on every route: sets request.state.api_key (a key name, or None when keys are off) and
    request.state.caller."""
    request.state.api_key = None
    request.state.caller = ANYONE
    keyring: KeyRing = request.app.state.keyring
    path = request.url.path
    scope = required_scope(request.method, path, keyring.public_docs)
    if not keyring.enabled or scope is None:
        return
    presented = presented_key(request)
    if presented is None:
        raise unauthorized("an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", path)
    key = keyring.identify(presented)
    if key is None:
        raise unauthorized("the API key is not valid", path)
    if not key.allows(scope):
        raise Forbidden(f"API key '{key.name}' lacks the '{scope}' scope this route needs", code="insufficient_scope")
    request.state.api_key = key.name
    request.state.caller = Caller(name=key.name, admin="admin" in key.scopes)


def main() -> int:
    """Print a keys-file entry for a key read from stdin (so it never lands in shell history)."""
    key = sys.stdin.readline().strip()
    if len(key) < 16:
        print("genserve.auth: give a key of at least 16 characters on stdin", file=sys.stderr)
        return 2
    name = sys.argv[1] if len(sys.argv) > 1 else "NAME"
    print(f"  - {{name: {name}, sha256: {hashlib.sha256(key.encode()).hexdigest()}, scopes: [generate, read]}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
