"""API keys on their own: sources, hashing, matching, scopes, and errors that never show a secret."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from genserve.auth import ANYONE, ApiKey, Caller, KeyRing, basic_password, digest, load_keys_file, required_scope
from genserve.config import ConfigError, load_config

SECRET = "a-very-secret-key-123"


def write_keys(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_env_keys_are_parsed_with_scopes_and_defaults() -> None:
    config = load_config(None, {"GENSERVE_API_KEYS": f"ci:{SECRET}:read; bot:{SECRET}x"})
    assert [(key.name, key.scopes) for key in config.auth.keys] == [("ci", ["read"]), ("bot", ["generate", "read"])]


@pytest.mark.parametrize("raw", ["justaname", ":nokey", "name:", "a:b:c:d"])
def test_malformed_env_keys_are_config_errors_that_hide_the_key(raw: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, {"GENSERVE_API_KEYS": raw})
    assert "GENSERVE_API_KEYS entry 1" in str(error.value)


def test_short_keys_and_unknown_scopes_are_refused() -> None:
    with pytest.raises(ConfigError, match="auth.keys.0.key"):
        load_config(None, {"GENSERVE_API_KEYS": "x:short"})
    with pytest.raises(ConfigError, match="auth.keys.0.scopes"):
        load_config(None, {"GENSERVE_API_KEYS": f"x:{SECRET}:everything"})


def test_keyring_matches_only_the_right_key_and_stores_digests(tmp_path: Path) -> None:
    keys_file = write_keys(
        tmp_path / "k.yaml",
        f"keys:\n  - {{name: filed, sha256: {hashlib.sha256(b'file-key-0000000001').hexdigest()}, scopes: [admin]}}\n",
    )
    config = load_config(None, {"GENSERVE_API_KEYS": f"env:{SECRET}:read", "GENSERVE_API_KEYS_FILE": str(keys_file)})
    ring = KeyRing.from_config(config)
    assert ring.enabled and ring.names() == ["env", "filed"]
    found = ring.identify(SECRET)
    assert found is not None and found.name == "env" and found.allows("read") and not found.allows("generate")
    admin = ring.identify("file-key-0000000001")
    assert admin is not None and admin.allows("generate") and admin.allows("read")
    assert ring.identify(SECRET + "x") is None and ring.identify("") is None
    assert all(isinstance(key.digest, bytes) and len(key.digest) == 32 for key in ring._keys)


def test_no_keys_means_auth_is_off() -> None:
    assert not KeyRing.from_config(load_config(None, {})).enabled


def test_duplicate_names_are_refused() -> None:
    config = load_config(None, {"GENSERVE_API_KEYS": f"same:{SECRET};same:{SECRET}-2"})
    with pytest.raises(ConfigError, match="unique"):
        KeyRing.from_config(config)


@pytest.mark.parametrize(
    "body,words",
    [
        ("keys: 3\n", "must hold 'keys:'"),
        ("keys:\n  - {sha256: " + "a" * 64 + "}\n", "needs a name"),
        ("keys:\n  - {name: x, sha256: abc}\n", "64 hex digits"),
        ("keys:\n  - {name: x, sha256: " + "a" * 64 + ", scopes: [root]}\n", "scopes must be"),
        ("keys: [\n", "not valid YAML"),
    ],
)
def test_bad_keys_files_are_named_errors(tmp_path: Path, body: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_keys_file(write_keys(tmp_path / "keys.yaml", body))


def test_missing_keys_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read auth.keys_file"):
        load_keys_file(tmp_path / "absent.yaml")


def test_required_scope_by_route() -> None:
    assert required_scope("GET", "/health") is None and required_scope("GET", "/ready") is None
    assert required_scope("GET", "/jobs") == "read" and required_scope("HEAD", "/status") == "read"
    assert required_scope("POST", "/generate") == "generate" and required_scope("DELETE", "/jobs/x") == "generate"
    assert required_scope("GET", "/metrics") == "metrics"


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_the_docs_need_read_unless_public_docs(path: str) -> None:
    assert required_scope("GET", path) == "read"
    assert required_scope("GET", path, public_docs=True) is None
    assert required_scope("GET", "/status", public_docs=True) == "read"  # only the docs open up


@pytest.mark.parametrize(
    ("credentials", "password"),
    [
        (base64.b64encode(b"anyone:" + SECRET.encode()).decode(), SECRET),
        (base64.b64encode(b":" + SECRET.encode()).decode(), SECRET),  # no user name
        (base64.b64encode(b"user:pass:with:colons").decode(), "pass:with:colons"),
        (base64.b64encode(b"no-colon-at-all").decode(), None),
        ("not base64!", None),
        (base64.b64encode(b"\xff\xfe:x").decode(), None),  # not UTF-8
    ],
)
def test_basic_credentials_give_the_key_as_their_password(credentials: str, password: str | None) -> None:
    assert basic_password(credentials) == password


def test_a_caller_sees_its_own_jobs_and_an_admin_all() -> None:
    alice, ops = Caller(name="alice", admin=False), Caller(name="ops", admin=True)
    assert alice.sees("alice") and not alice.sees("bob") and not alice.sees(None)  # None: stored before ownership
    assert ops.sees("alice") and ops.sees(None) and ANYONE.sees("anyone")
    assert alice.only_owner == "alice" and ops.only_owner is None and ANYONE.only_owner is None


def test_admin_allows_everything() -> None:
    key = ApiKey("ops", digest(SECRET), frozenset({"admin"}))
    assert key.allows("generate") and key.allows("read") and key.allows("admin")
