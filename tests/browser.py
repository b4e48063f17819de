"""A real browser for the playground tests: the system's headless Chromium, driven by Playwright's sync API.

Playwright cannot download its own browsers here (and CI machines should not fetch ~150 MB per run), so it launches
Debian's ``chromium`` package (``.ci/run`` installs it when it is missing). The flags keep it from reaching for
the network on its own (component updates, sync, QUIC probes) and from needing a GPU or a user namespace sandbox in
a container.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright, Request, expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}


def launch_chromium(playwright: Playwright) -> Browser:
    if not CHROMIUM.exists():
        pytest.skip(f"no system Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does it)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def open_playground(page: Page, url: str) -> None:
    """Load the page and wait until it has read GET /models (the form knows the server's limits)."""
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=20_000)


def png_data(size: tuple[int, int], color: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def drop_file(page: Page, selector: str, data: bytes, name: str, mime: str = "image/png") -> None:
    """Drag a file onto ``selector`` and drop it, as a user dragging it from their file manager does."""
    transfer = page.evaluate_handle(
        """([encoded, name, mime]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [base64.b64encode(data).decode("ascii"), name, mime],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def choose_file(page: Page, field: str, data: bytes, name: str, mime: str = "image/png") -> None:
    """Pick a file for an image field through its file input (the click-to-choose path)."""
    page.set_input_files(f"input.file[data-field={field}]", files=[{"name": name, "mimeType": mime, "buffer": data}])


def posted_json(request: Request) -> dict[str, Any]:
    body = request.post_data
    assert body is not None, "the request had no body"
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def data_uri_image(uri: str) -> Image.Image:
    """An image sent as a data: URI, decoded."""
    header, _, encoded = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    image.load()
    return image
