"""Small things a new user trips over: the wrong body type for a route, GET /, HEAD and jpg on /image, a stream
request on /v1, the strength a fill never used, an OpenAI edit whose mask is the image's transparency, and CORS for
a browser front end on another origin."""

from __future__ import annotations

import io
import re

import pytest
import requests
from PIL import Image

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, b64, mask_png, png_bytes

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.mark.parametrize(
    ("route", "other"),
    [("/generate", "/generate/img2img"), ("/jobs", "/jobs/form")],
)
def test_form_data_on_a_json_route_points_to_the_form_route(server: GenServeProcess, route: str, other: str) -> None:
    answer = requests.post(f"{server.url}{route}", data={"prompt": "p"}, files={"x": ("a", b"b")}, timeout=30)
    assert answer.status_code == 400
    assert f"{route} takes a JSON body; send form-data (file uploads) to {other}" in answer.text


@pytest.mark.parametrize(
    ("route", "other"),
    [("/generate/img2img", "/generate"), ("/jobs/form", "/jobs")],
)
def test_json_on_a_form_route_points_to_the_json_route(server: GenServeProcess, route: str, other: str) -> None:
    answer = requests.post(f"{server.url}{route}", json={"prompt": "p"}, timeout=30)
    assert answer.status_code == 400
    assert f"{route} takes form-data (file uploads); send JSON to {other}" in answer.text


def test_root_says_what_this_is_and_where_the_docs_are(server: GenServeProcess) -> None:
    """API clients (curl's and requests' Accept: */*) get JSON at /; a browser (Accept: text/html) the playground."""
    body = requests.get(f"{server.url}/", timeout=10).json()
    assert body["service"] == "GenServe" and body["docs"] == "/docs" and body["openapi"] == "/openapi.json"
    assert requests.get(f"{server.url}{body['docs']}", timeout=10).status_code == 200
    as_json = requests.get(f"{server.url}/", headers={"Accept": "application/json"}, timeout=10)
    assert as_json.json()["playground"] == "/ui"
    page = requests.get(f"{server.url}/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, timeout=10)
    assert page.headers["content-type"].startswith("text/html") and "GenServe playground" in page.text


def test_head_and_jpg_on_image(server: GenServeProcess) -> None:
    task = server.generate(prompt="p", **FAST).json()["task_id"]
    full = requests.get(f"{server.url}/image/{task}", timeout=10)
    head = requests.head(f"{server.url}/image/{task}", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/png"
    assert int(head.headers["content-length"]) == len(full.content)
    jpg = requests.get(f"{server.url}/image/{task}", params={"format": "jpg"}, timeout=10)
    assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg" and jpg.content[:2] == b"\xff\xd8"
    assert requests.head(f"{server.url}/image/nope", timeout=10).status_code == 404


def test_stream_true_on_v1_is_a_clear_400(server: GenServeProcess) -> None:
    answer = requests.post(
        f"{server.url}/v1/images/generations", json={"prompt": "p", "size": "64x64", "stream": True}, timeout=30
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "stream" and "streaming (stream: true) is not supported" in error["message"]


def test_fill_reports_no_strength(server: GenServeProcess) -> None:
    body = server.generate(
        prompt="p", mode="fill", input_image=b64(png_bytes((64, 64))), mask_image=b64(mask_png((64, 64))), **FAST
    ).json()
    assert body["success"] is True and body["strength"] is None


def _edit_mode(server: GenServeProcess, image: bytes) -> str:
    """The mode of the job an OpenAI edit without a mask ran."""
    answer = requests.post(
        f"{server.url}/v1/images/edits",
        data={"prompt": "p", "size": "64x64", "response_format": "url"},
        files={"image": ("in.png", image, "image/png")},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    task = re.search(r"/image/([0-9a-f]+)", answer.json()["data"][0]["url"])
    assert task is not None
    mode: str = requests.get(f"{server.url}/jobs/{task.group(1)}", timeout=10).json()["mode"]
    return mode


def test_an_edit_without_a_mask_repaints_the_images_transparent_pixels(server: GenServeProcess) -> None:
    holed = Image.new("RGBA", (64, 64), (200, 80, 40, 255))
    holed.paste((0, 0, 0, 0), (16, 16, 48, 48))
    buffer = io.BytesIO()
    holed.save(buffer, format="PNG")
    assert _edit_mode(server, buffer.getvalue()) == "fill"  # the transparent square is the mask, as at OpenAI
    assert _edit_mode(server, png_bytes((64, 64), (200, 80, 40, 255), mode="RGBA")) == "img2img"  # all opaque
    assert _edit_mode(server, png_bytes((64, 64))) == "img2img"  # no alpha at all


def test_cors_lets_a_configured_origin_call_the_api(start_server: ServerFactory) -> None:
    server = start_server({"server": {"cors_origins": ["https://studio.example"]}}, in_process=True)
    preflight = requests.options(
        f"{server.url}/generate",
        headers={"Origin": "https://studio.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://studio.example"
    other = requests.get(f"{server.url}/health", headers={"Origin": "https://elsewhere.example"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers
