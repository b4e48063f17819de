"""The official openai SDK against a live GenServe; image inputs by URL; the Flux Imaging API routes (seed 004)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import openai
import pytest
import requests
from PIL import Image

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, b64, png_bytes
from tests.stubs import QuietHandler, serving

FAST = {"steps": 2}  # extension field: keeps the embedded model quick


def client(server: GenServeProcess) -> openai.OpenAI:
    # No retries: the tests want to see each answer, not the SDK's second try.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0, timeout=120)


def png_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def upload(size: tuple[int, int] = (96, 64), color: tuple[int, ...] = (200, 60, 30)) -> tuple[str, bytes, str]:
    return ("input.png", png_bytes(size, color), "image/png")


def openai_mask(size: tuple[int, int]) -> tuple[str, bytes, str]:
    """OpenAI's convention: opaque everywhere except a fully transparent hole to edit."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return ("mask.png", buffer.getvalue(), "image/png")


def test_generate_n2_urls_are_absolute_and_serve_two_different_images(server: GenServeProcess) -> None:
    result = client(server).images.generate(
        model="black-forest-labs/flux.1-dev", prompt="a red fox", n=2, size="128x64", extra_body=FAST
    )
    assert len(result.data) == 2 and result.created > 0
    images = []
    for item in result.data:
        assert item.url is not None and item.url.startswith(f"{server.url}/image/")
        assert item.revised_prompt == "a red fox"
        response = requests.get(item.url, timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        images.append(png_of(response.content))
    assert [image.size for image in images] == [(128, 64), (128, 64)]
    assert images[0].tobytes() != images[1].tobytes()
    seeds = [item.model_extra["seed"] for item in result.data]  # type: ignore[index]
    assert seeds[1] == seeds[0] + 1


def test_generate_b64_json_with_fixed_seed_is_reproducible(server: GenServeProcess) -> None:
    sdk = client(server)
    first = sdk.images.generate(
        prompt="a boat", n=2, size="64x64", response_format="b64_json", extra_body={"seed": 11, **FAST}
    )
    again = sdk.images.generate(
        prompt="a boat", n=1, size="64x64", response_format="b64_json", extra_body={"seed": 12, **FAST}
    )
    decoded = [base64.b64decode(item.b64_json or "") for item in first.data]
    assert [png_of(data).size for data in decoded] == [(64, 64), (64, 64)]
    assert decoded[0] != decoded[1]
    assert base64.b64decode(again.data[0].b64_json or "") == decoded[1]  # seed 12 = the second of seed 11, n=2


def test_output_format_jpeg_and_webp(server: GenServeProcess) -> None:
    sdk = client(server)
    jpeg = sdk.images.generate(
        prompt="x",
        size="64x64",
        response_format="b64_json",
        output_format="jpeg",
        output_compression=60,
        extra_body=FAST,
    )
    assert png_of(base64.b64decode(jpeg.data[0].b64_json or "")).format == "JPEG"
    webp = sdk.images.generate(prompt="x", size="64x64", output_format="webp", extra_body=FAST)
    url = webp.data[0].url or ""
    assert "format=webp" in url
    assert png_of(requests.get(url, timeout=10).content).format == "WEBP"


def test_edit_with_and_without_a_mask(server: GenServeProcess) -> None:
    sdk = client(server)
    plain = sdk.images.edit(image=upload(), prompt="make it blue", size="auto", extra_body=FAST)
    assert png_of(requests.get(plain.data[0].url or "", timeout=10).content).size == (96, 64)  # the input's size
    masked = sdk.images.edit(
        image=upload(),
        mask=openai_mask((96, 64)),
        prompt="add a hat",
        size="64x64",
        response_format="b64_json",
        extra_body=FAST,
    )
    assert png_of(base64.b64decode(masked.data[0].b64_json or "")).size == (64, 64)
    tasks = requests.get(f"{server.url}/jobs", params={"limit": 2}, timeout=10).json()["jobs"]
    assert [task["mode"] for task in tasks] == ["fill", "img2img"]


def test_edit_accepts_a_black_and_white_mask(server: GenServeProcess) -> None:
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (10, 10, 40, 40))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    result = client(server).images.edit(
        image=upload(), mask=("m.png", buffer.getvalue(), "image/png"), prompt="a window", size="64x64", extra_body=FAST
    )
    assert result.data[0].url


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks variations deprecated
def test_create_variation(server: GenServeProcess) -> None:
    result = client(server).images.create_variation(image=upload((80, 80)), n=2, size="64x64", extra_body=FAST)
    assert len(result.data) == 2
    tasks = requests.get(f"{server.url}/jobs", params={"limit": 2}, timeout=10).json()["jobs"]
    # The embedded model serves redux, and openai.variation_mode is redux: variations come from the image's
    # embedding (test_redux.py checks the img2img fallback).
    assert all(task["mode"] == "redux" for task in tasks)
    assert all(task["params"]["prompt"] == "" for task in tasks)


def test_errors_are_openai_shaped_sdk_exceptions(server: GenServeProcess) -> None:
    sdk = client(server)
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.images.generate(model="dall-e-3", prompt="x")
    assert not_found.value.status_code == 404
    assert not_found.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert not_found.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_many:
        sdk.images.generate(prompt="x", n=9)
    assert too_many.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk.images.generate(prompt="x", size="big")
    assert bad_size.value.body["param"] == "size"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_large:
        sdk.images.generate(prompt="x", size="4096x4096")
    assert "width" in str(too_large.value)
    with pytest.raises(openai.BadRequestError) as no_prompt:
        sdk.images.edit(image=upload(), prompt="  ")
    assert no_prompt.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as garbage:
        sdk.images.edit(image=("x.png", b"not an image at all", "image/png"), prompt="x")
    assert "not a decodable image" in str(garbage.value)
    raw = requests.post(f"{server.url}/v1/images/generations", data=b"{", headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_generations_form_data_as_seed_004_shows(server: GenServeProcess) -> None:
    response = requests.post(
        f"{server.url}/v1/images/generations",
        data={"prompt": "A cute cat illustration", "n": "2", "size": "64x64", "steps": "2", "response_format": "url"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2


def test_private_urls_are_refused_by_default(server: GenServeProcess, image_server: str) -> None:
    response = server.generate(mode="img2img", input_image=f"{image_server}/red.png", width=64, height=64)
    assert response.status_code == 400
    assert "127.0.0.1" in response.json()["error"] and "allow_private_urls" in response.json()["error"]
    with pytest.raises(openai.BadRequestError):
        client(server).images.generate(prompt="x", extra_body={"image": f"{image_server}/red.png", **FAST})


# --- with private URLs allowed, against a local image server -----------------------------------------------------


class _ImageHandler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/red.png":
            body, kind = png_bytes((72, 72), (255, 0, 0)), "image/png"
        elif self.path == "/page.html":
            body, kind = b"<html></html>", "text/html"
        elif self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", "/red.png")
            self.end_headers()
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    with serving(_ImageHandler) as url:
        yield url


@pytest.fixture(scope="module")
def trusting_server(start_server: ServerFactory) -> GenServeProcess:
    return start_server(
        {
            "inputs": {"allow_private_urls": True},
            "openai": {"process_response": "url", "model_aliases": ["flux", "dall-e-3", "gpt-image-1"]},
        },
        in_process=True,
    )


def test_model_aliases_let_openai_model_names_run_flux(trusting_server: GenServeProcess) -> None:
    for model in ("dall-e-3", "GPT-Image-1", "flux1-dev"):  # aliases are case-insensitive; model.id always works
        result = client(trusting_server).images.generate(model=model, prompt="x", size="64x64", extra_body=FAST)
        assert result.data[0].url
    with pytest.raises(openai.NotFoundError):  # the list replaced the default one: a name left out is unknown
        client(trusting_server).images.generate(model="flux-1-dev", prompt="x", size="64x64", extra_body=FAST)


def test_url_inputs_are_fetched_when_private_urls_are_allowed(
    trusting_server: GenServeProcess, image_server: str
) -> None:
    server = trusting_server
    native = server.generate(mode="img2img", input_image=f"{image_server}/hop", width=64, height=64)
    assert native.status_code == 200, native.text
    result = client(server).images.generate(
        prompt="x", size="64x64", extra_body={"image": f"{image_server}/red.png", **FAST}
    )
    assert result.data[0].url
    assert requests.get(f"{server.url}/jobs", params={"limit": 1}, timeout=10).json()["jobs"][0]["mode"] == "img2img"
    html = server.generate(mode="img2img", input_image=f"{image_server}/page.html", width=64, height=64)
    assert html.status_code == 400 and "text/html" in html.json()["error"]
    missing = server.generate(mode="img2img", input_image=f"{image_server}/none.png", width=64, height=64)
    assert missing.status_code == 400 and "404" in missing.json()["error"]


def test_process_picks_each_mode(trusting_server: GenServeProcess, image_server: str) -> None:
    url = trusting_server.url
    generate = requests.post(
        f"{url}/process",
        data={"prompt": "a kite", "width": "64", "height": "64", "num_inference_steps": "2"},
        timeout=60,
    )
    assert generate.status_code == 200, generate.text
    assert generate.json()["mode"] == "generate" and generate.json()["url"].startswith(url)
    edit = requests.post(
        f"{url}/process",
        data={"prompt": "winter", "num_inference_steps": "2", "width": "64", "height": "64"},
        files={"input_file": upload()},
        timeout=60,
    )
    assert edit.json()["mode"] == "edit"
    variation = requests.post(
        f"{url}/process",
        json={"input_image_url": f"{image_server}/red.png", "width": 64, "height": 64, "num_inference_steps": 2},
        timeout=60,
    )
    assert variation.status_code == 200, variation.text
    assert variation.json()["mode"] == "variation"
    nothing = requests.post(f"{url}/process", data={"seed": "3"}, timeout=10)
    assert nothing.status_code == 400 and "prompt" in nothing.json()["error"]


def test_process_raw_returns_png_bytes(trusting_server: GenServeProcess) -> None:
    response = requests.post(
        f"{trusting_server.url}/process/raw",
        data={"prompt": "a kite", "width": "64", "height": "64", "num_inference_steps": "2"},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-genserve-mode"] == "generate"
    assert png_of(response.content).size == (64, 64)


def test_process_returns_base64_by_default(server: GenServeProcess) -> None:
    response = requests.post(
        f"{server.url}/process",
        json={"prompt": "a kite", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 4},
        timeout=60,
    )
    body = response.json()
    assert response.status_code == 200 and body["seed"] == 4 and "url" not in body
    assert png_of(base64.b64decode(body["b64_json"])).size == (64, 64)


def test_native_fields_accept_data_uris_of_urls_too(server: GenServeProcess) -> None:
    response = server.generate(
        mode="img2img", input_image="data:image/png;base64," + b64(png_bytes((64, 64))), width=64, height=64
    )
    assert response.status_code == 200
