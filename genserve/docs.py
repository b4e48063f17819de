"""The API docs of the API process: GET /openapi.json, Swagger UI at /docs, ReDoc at /redoc — behind the API keys,
and working on a machine with no internet.

FastAPI's built-in docs routes are switched off (``FastAPI(docs_url=None, redoc_url=None, openapi_url=None)``):
they bypass the app-wide ``authorize`` dependency, so they stayed open once keys existed. These routes replace
them and go through it like every other route: the ``read`` scope, unless ``auth.public_docs`` opens them. A
browser navigating to /docs cannot send a Bearer header, so ``genserve.auth`` takes HTTP Basic as well (the key is
the password) and answers 401 on these paths with a Basic challenge; the browser prompts once, then sends the same
credentials with the page's fetch of /openapi.json and with Swagger's "Try it out" requests.

The pages load Swagger UI, ReDoc and the favicon from ``/docs-assets`` — the files the ``fastapi-offline`` package
ships, served from where it is installed, never from a CDN (GPU boxes are often air-gapped). Those are public
library files: the mount stays open.

The OpenAPI document is FastAPI's, with two additions made once when it is first built: the key schemes (Bearer and
``X-API-Key``, when keys exist) so that Swagger's "Authorize" button makes "Try it out" send the key, and the
request models' examples (pydantic ``examples`` in their JSON schema) written where Swagger's "Try it out" and ReDoc
take a request body's samples from (the media type's named ``examples``), with ``model_id`` / ``model`` set to the
model this server serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
    swagger_ui_default_parameters,
)
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
REDOC_URL = "/redoc"
DOCS_PATHS = frozenset({OPENAPI_URL, DOCS_URL, OAUTH2_REDIRECT_URL, REDOC_URL})  # genserve.auth: read, or public_docs

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc…, favicon
ASSETS_MOUNT_NAME = "docs-assets"

SWAGGER_PARAMETERS = {
    **swagger_ui_default_parameters,
    # Swagger UI would otherwise send the schema to validator.swagger.io for its badge: nothing leaves the box.
    "validatorUrl": None,
}

# Names of the schemes in components.securitySchemes; either one is enough (genserve.auth.presented_key).
BEARER_SCHEME = "bearerKey"
HEADER_SCHEME = "apiKeyHeader"
SECURITY_SCHEMES = {
    BEARER_SCHEME: {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer YOUR-API-KEY"},
    HEADER_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key: YOUR-API-KEY"},
}
MODEL_FIELDS = ("model_id", "model")  # the native body names the model model_id; OpenAI's, model

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    """The path prefix a reverse proxy serves us under (uvicorn --root-path), so the pages' URLs still resolve."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


@router.get(OPENAPI_URL)
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{OPENAPI_URL}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_URL)
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(
        openapi_url=f"{root}{OPENAPI_URL}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,  # fonts.googleapis.com is a CDN too
    )


def install_docs(app: FastAPI, *, model_id: str, keys_enabled: bool, open_paths: Iterable[str] = ()) -> None:
    """Serve the docs on ``app`` (created with docs_url, redoc_url and openapi_url None) and their assets.

    ``open_paths``: the routes that need no key even when keys exist (genserve.auth.OPEN_PATHS)."""
    build_fastapi_document = app.openapi  # FastAPI's own builder; it caches the document on app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build_fastapi_document()
            if keys_enabled:
                add_security_schemes(document, open_paths)
            add_request_examples(document, model_id)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document
    app.include_router(router)
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name=ASSETS_MOUNT_NAME)


def add_security_schemes(document: dict[str, Any], open_paths: Iterable[str]) -> None:
    """Declare the key schemes and require one of them on every operation but the open ones."""
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    document["security"] = [{BEARER_SCHEME: []}, {HEADER_SCHEME: []}]
    for path in open_paths:
        for operation in document.get("paths", {}).get(path, {}).values():
            operation["security"] = []  # no lock icon, and Swagger sends no key


def add_request_examples(document: dict[str, Any], model_id: str) -> None:
    """Copy each JSON request body's schema ``examples`` to the media type's named ``examples``.

    A JSON Schema ``examples`` list is documentation only to Swagger UI; the media type's named examples are what it
    puts in the "Try it out" body (with a picker when there are several), and what ReDoc shows as the request sample.
    """
    for item in document.get("paths", {}).values():
        for operation in item.values():
            media = _json_body(operation)
            if media is None or "examples" in media:
                continue
            schema = media.get("schema", {})
            fields = list(schema.get("properties", {}))
            values = [_for_this_server(value, model_id, fields) for value in schema.get("examples") or []]
            if values:
                schema["examples"] = values  # the schema's own list says the same
                media["examples"] = {
                    _example_name(index, values): {"value": value} for index, value in enumerate(values)
                }


def _json_body(operation: Any) -> dict[str, Any] | None:
    """The operation's application/json request body (its media type object), if it takes one."""
    if not isinstance(operation, dict):
        return None
    media: dict[str, Any] | None = operation.get("requestBody", {}).get("content", {}).get("application/json")
    return media


def _example_name(index: int, values: list[dict[str, Any]]) -> str:
    """The picker's label: the example's mode, when it names one."""
    mode = values[index].get("mode")
    if mode:
        return str(mode)
    return "example" if len(values) == 1 else f"example {index + 1}"


def _for_this_server(value: dict[str, Any], model_id: str, fields: list[str]) -> dict[str, Any]:
    """An example as this server shows it: naming its model.id (the models' examples name the default, flux1-dev),
    so that "Try it out" runs as is, and with its keys in the order of the schema's fields (pydantic sorts an
    example's keys alphabetically, which would put cfg first and the prompt in the middle)."""
    rank = {name: index for index, name in enumerate(fields)}
    ordered = sorted(value, key=lambda key: rank.get(key, len(rank)))
    return {key: model_id if key in MODEL_FIELDS else value[key] for key in ordered}
