"""The API docs against real servers: behind the keys (Bearer, X-API-Key or a browser's Basic prompt), opened by
auth.public_docs, open without keys; Swagger UI and ReDoc loading every asset from the server itself; and the
request examples of /openapi.json, sent as they stand, making images with the embedded model."""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from PIL import Image

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, wait_until

READER = "reader-secret-key-0001"  # read only: enough for the docs
WRITER = "writer-secret-key-0001"  # generate only: not enough for them
KEYS = {"GENSERVE_API_KEYS": f"reader:{READER}:read;writer:{WRITER}:generate"}
DOCS_PAGES = ["/docs", "/redoc", "/docs/oauth2-redirect"]
DOCS_PATHS = [*DOCS_PAGES, "/openapi.json"]
BASIC_CHALLENGE = 'Basic realm="GenServe API docs"'
OTHER_MODEL_ID = "flux-house-model"  # a configured model.id the examples must name instead of the default
# The JSON routes that generate: each must offer at least one example in /openapi.json.
EXAMPLE_ROUTES = {"/generate", "/jobs", "/v1/images/generations", "/process", "/process/raw"}
EXAMPLE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def guarded(start_server: ServerFactory) -> GenServeProcess:
    # Only the docs are asked of this server: it need not wait for its worker.
    return start_server(env=KEYS, in_process=True, wait_ready=False)


@pytest.fixture(scope="module")
def public_docs(start_server: ServerFactory) -> GenServeProcess:
    overrides = {"auth": {"public_docs": True}, "model": {"id": OTHER_MODEL_ID}}
    return start_server(overrides, env=KEYS, in_process=True, wait_ready=False)


def basic(key: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode("ascii")}


def get(server: GenServeProcess, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(f"{server.url}{path}", headers=headers or {}, timeout=30)


# --- behind the keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCS_PATHS)
def test_the_docs_need_a_key_and_ask_a_browser_for_one(guarded: GenServeProcess, path: str) -> None:
    for headers in ({}, basic("not-a-key-at-all-0000"), {"X-API-Key": "not-a-key-at-all-0000"}):
        refused = get(guarded, path, headers)
        assert refused.status_code == 401, (headers, refused.text)
        assert refused.json()["error_type"] == "unauthorized"
        # The challenge makes a browser show its login prompt; it then sends the key as the Basic password.
        assert refused.headers["WWW-Authenticate"] == BASIC_CHALLENGE
    assert get(guarded, path, {"X-API-Key": WRITER}).status_code == 403  # a key without the read scope


@pytest.mark.parametrize("path", DOCS_PATHS)
@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {READER}"}, {"X-API-Key": READER}, basic(READER), basic(READER, user="")],
    ids=["bearer", "x-api-key", "basic", "basic-without-user"],
)
def test_any_way_of_sending_the_key_opens_the_docs(
    guarded: GenServeProcess, path: str, headers: dict[str, str]
) -> None:
    answer = get(guarded, path, headers)
    assert answer.status_code == 200, answer.text
    expected = "application/json" if path.endswith(".json") else "text/html"
    assert answer.headers["content-type"].startswith(expected)


def test_basic_works_on_every_route_and_other_routes_keep_the_bearer_challenge(guarded: GenServeProcess) -> None:
    assert get(guarded, "/status", basic(READER)).status_code == 200  # "Try it out" from a page opened with Basic
    refused = get(guarded, "/status")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"


def test_the_schema_declares_the_key_schemes(guarded: GenServeProcess) -> None:
    schema = get(guarded, "/openapi.json", {"X-API-Key": READER}).json()
    schemes = schema["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= next(
        s for s in schemes.values() if s["type"] == "http"
    ).items()
    assert {"type": "apiKey", "in": "header", "name": "X-API-Key"}.items() <= next(
        s for s in schemes.values() if s["type"] == "apiKey"
    ).items()
    # Either scheme on every operation ("Try it out" sends the key the Authorize button took) …
    assert sorted(name for requirement in schema["security"] for name in requirement) == sorted(schemes)
    # … but the two routes that need no key
    assert schema["paths"]["/health"]["get"]["security"] == schema["paths"]["/ready"]["get"]["security"] == []


def test_public_docs_opens_the_docs_only(public_docs: GenServeProcess) -> None:
    for path in DOCS_PATHS:
        assert get(public_docs, path).status_code == 200, path
    assert get(public_docs, "/status").status_code == 401
    assert get(public_docs, "/docs-assets/swagger-ui.css").status_code == 200


def test_examples_name_the_configured_model(public_docs: GenServeProcess) -> None:
    names = {example.get("model_id") or example.get("model") for _, example in json_examples(public_docs)}
    assert names - {None} == {OTHER_MODEL_ID}


# --- without keys, and offline -----------------------------------------------------------------------------------


def test_without_keys_the_docs_are_open_and_declare_no_scheme(server: GenServeProcess) -> None:
    for path in DOCS_PATHS:
        assert get(server, path).status_code == 200, path
    schema = get(server, "/openapi.json").json()
    assert "security" not in schema and "securitySchemes" not in schema.get("components", {})
    # FastAPI's own docs routes are gone: these pages are GenServe's, not in the schema they describe
    assert not set(DOCS_PATHS) & set(schema["paths"])


ASSET_TYPES = {
    "script": {"text/javascript", "application/javascript"},
    "stylesheet": {"text/css"},
    "icon": {"image/png"},
}


def referenced_assets(html: str) -> list[tuple[str, str]]:
    """(kind, URL) of every script, stylesheet and icon the page loads."""
    assets = [("script", url) for url in re.findall(r"<script[^>]*\bsrc=[\"']([^\"']+)", html)]
    for attributes in re.findall(r"<link([^>]*)>", html):
        href = re.search(r"\bhref=[\"']([^\"']+)", attributes)
        if href is None:
            continue
        kind = "stylesheet" if "stylesheet" in attributes else "icon" if "icon" in attributes else "other"
        assets.append((kind, href.group(1)))
    return assets


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_every_asset_from_the_server_itself(
    server: GenServeProcess, guarded: GenServeProcess, page: str
) -> None:
    html = get(server, page).text
    own_host = urlsplit(server.url).netloc
    for url in re.findall(r"(?:https?:)?//[^\s\"'<>)]+", html):  # no CDN, no Google Fonts: any absolute URL is ours
        assert urlsplit(url).netloc == own_host, f"{page} loads {url} from another host"
    assets = referenced_assets(html)
    assert {kind for kind, _ in assets} >= {"script", "icon"}, assets
    for kind, url in assets:
        assert kind in ASSET_TYPES, (kind, url)
        absolute = urljoin(f"{server.url}{page}", url)
        assert urlsplit(absolute).netloc == own_host
        answer = requests.get(absolute, timeout=30)
        assert answer.status_code == 200, url
        media_type = answer.headers["content-type"].split(";")[0].strip()
        assert media_type in ASSET_TYPES[kind], (url, media_type)
        assert len(answer.content) > 1000  # the library file, not an error page
        # The assets are public library files: a browser fetches them before anyone logs in.
        assert requests.get(urljoin(f"{guarded.url}{page}", url), timeout=30).status_code == 200


# --- examples that run ---------------------------------------------------------------------------------------------


def json_examples(server: GenServeProcess, headers: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of every JSON request example in the served /openapi.json."""
    schema = get(server, "/openapi.json", headers).json()
    found = []
    for path, item in schema["paths"].items():
        media = item.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {})
        found += [(path, example["value"]) for example in media.get("examples", {}).values()]
    return found


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def image_of(server: GenServeProcess, path: str, answer: requests.Response) -> bytes:
    """The PNG a generating route answered with, however that route gives it."""
    if path == "/process/raw":
        return answer.content
    body = answer.json()
    if path == "/generate":
        return base64.b64decode(body["image_base64"])
    if path == "/process":
        return base64.b64decode(body["b64_json"])
    if path == "/v1/images/generations":
        item = body["data"][0]
        return (
            base64.b64decode(item["b64_json"]) if "b64_json" in item else requests.get(item["url"], timeout=30).content
        )
    assert path == "/jobs", path
    wait_until(
        lambda: get(server, f"/jobs/{body['task_id']}").json()["status"] == "completed",
        EXAMPLE_TIMEOUT_S,
        0.2,
        "the example job to complete",
    )
    return get(server, f"/image/{body['task_id']}").content


def test_every_json_example_makes_an_image_as_it_stands(server: GenServeProcess) -> None:
    examples = json_examples(server)
    assert {path for path, _ in examples} == EXAMPLE_ROUTES
    for path, example in examples:
        assert "string" not in example.values(), (path, example)  # no placeholder left by the schema generator
        assert example.get("model_id", example.get("model", "flux1-dev")) == "flux1-dev", example
        started = time.perf_counter()
        answer = requests.post(f"{server.url}{path}", json=example, timeout=EXAMPLE_TIMEOUT_S)
        assert 200 <= answer.status_code < 300, (path, example, answer.text[:500])
        size = png_size(image_of(server, path, answer))
        asked = f"{example['width']}x{example['height']}" if "width" in example else example.get("size")
        assert asked is None or f"{size[0]}x{size[1]}" == asked, (path, size, asked)
        print(f"{path} {example.get('mode', '')} {size[0]}x{size[1]}: {time.perf_counter() - started:.1f} s")
