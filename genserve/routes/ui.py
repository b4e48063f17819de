"""The web playground: the single-page app in ``genserve/ui``, served by the API process at ``/`` (to browsers) and
``/ui``, its JavaScript and CSS under ``/ui/assets``.

The page and its assets are public. They are the same static files every install ships and hold no data; what the
page shows (models, jobs, images, the pool) it fetches from the API with the key the user types in, so keys guard the
data exactly as they do for any other client. That is why these are plain Starlette routes and a static mount rather
than FastAPI routes: the app-wide ``authorize`` dependency (genserve.auth) applies to FastAPI routes only, and a page
that needs a key before it can ask for one would be a bare 401 instead of a form that explains it.

``GET /`` answers the page only to a browser, i.e. a request whose ``Accept`` header names ``text/html``. Every
other client (curl's ``*/*``, requests, httpx, the openai SDK) falls through to the JSON of
``genserve.routes.native.root``, behind the keys as before.

Every URL in the page is relative, so it works behind a reverse proxy that serves GenServe under a path prefix
(``https://host/genserve/`` → ``http://gpu-box:12411/``): the HTML names ``ui/assets/…``, which resolves the same
from ``/`` and ``/ui``; ``/ui/`` (one level deeper) is redirected to ``../ui``; and the JavaScript finds the API root
from its own module URL (``ui/assets/js/api.js``), never from the server.

Runs on the API process's event loop; the files are read from the package folder (they ship in the wheel as package
data).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Match, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
PAGE = UI_DIR / "index.html"
ASSETS_URL = "/ui/assets"
ASSETS_MOUNT_NAME = "ui-assets"
PAGE_PATHS = ("/", "/ui")  # where the page is served; both sit at the app's root level, so ui/assets/… resolves

# The page loads nothing from anywhere but this server, and runs no inline script: the policy says so to the
# browser, which then refuses anything else (a stray CDN link would fail in the tests, not only on an air-gapped box).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",  # revalidate: after an upgrade the browser takes the new page (ETag makes it cheap)
    "X-Content-Type-Options": "nosniff",
}


def wants_html(scope: Scope) -> bool:
    """A browser navigating here: its Accept header names text/html (API clients send */* or application/json)."""
    for name, value in scope.get("headers", []):
        if name == b"accept":
            return b"text/html" in value.lower()
    return False


class BrowserPageRoute(Route):
    """A route that matches only requests from a browser (see ``wants_html``); the rest go on to the next route
    with the same path (``GET /``'s JSON)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE and not wants_html(scope):
            return Match.NONE, {}
        return match, child_scope


async def page(request: Request) -> Response:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def page_one_level_down(request: Request) -> Response:
    """``/ui/`` would resolve the page's relative asset URLs one level too deep: send the browser to ``../ui``
    (relative, so a proxy's path prefix is kept)."""
    return RedirectResponse("../ui", status_code=308)


def install_ui(app: FastAPI) -> None:
    """Serve the playground on ``app``. Call it before the native router is included: ``GET /`` for browsers must
    be matched before the JSON route at the same path."""
    app.router.routes.append(BrowserPageRoute("/", page, methods=["GET"], name="playground-root"))
    app.router.routes.append(Route("/ui", page, methods=["GET"], name="playground"))
    app.router.routes.append(Route("/ui/", page_one_level_down, methods=["GET"], name="playground-slash"))
    app.mount(ASSETS_URL, StaticFiles(directory=UI_DIR / "assets"), name=ASSETS_MOUNT_NAME)
