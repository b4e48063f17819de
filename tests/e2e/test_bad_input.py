"""Bad input gets the right status and a message naming the problem — never a 500, never a dead worker."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
import requests
from PIL import Image

from tests.server import GenServeProcess, b64, mask_png, png_bytes, png_claiming

SMALL = {"width": 64, "height": 64, "num_inference_steps": 1}


def image_as(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format=fmt)
    return buffer.getvalue()


def noisy_png() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


# (id, JSON body, expected status, words the error must contain)
JSON_CASES: list[tuple[str, Any, int, list[str]]] = [
    ("missing-prompt", {**SMALL}, 400, ["prompt", "required"]),
    ("empty-prompt", {"prompt": "   ", **SMALL}, 400, ["prompt", "empty"]),
    ("prompt-not-string", {"prompt": 42, **SMALL}, 400, ["prompt"]),
    ("unknown-mode", {"prompt": "x", "mode": "paint", **SMALL}, 400, ["mode"]),
    ("img2img-no-input", {"prompt": "x", "mode": "img2img", **SMALL}, 400, ["img2img", "input_image"]),
    (
        "fill-no-mask",
        {"prompt": "x", "mode": "fill", "input_image": b64(png_bytes((64, 64))), **SMALL},
        400,
        ["mask_image"],
    ),
    ("controlnet-no-control", {"prompt": "x", "mode": "controlnet", **SMALL}, 400, ["control_image"]),
    (
        "not-base64",
        {"prompt": "x", "mode": "img2img", "input_image": "!!!not base64!!!", **SMALL},
        400,
        ["input_image", "base64"],
    ),
    (
        "random-bytes",
        {"prompt": "x", "mode": "img2img", "input_image": b64(os.urandom(2048)), **SMALL},
        400,
        ["input_image", "not a decodable image"],
    ),
    (
        "truncated-png",
        {"prompt": "x", "mode": "img2img", "input_image": b64(noisy_png()[:5000]), **SMALL},
        400,
        ["input_image", "truncated"],
    ),
    (
        "gif",
        {"prompt": "x", "mode": "img2img", "input_image": b64(image_as("GIF")), **SMALL},
        400,
        ["input_image", "unsupported format GIF"],
    ),
    (
        "bmp",
        {"prompt": "x", "mode": "controlnet", "control_image": b64(image_as("BMP")), **SMALL},
        400,
        ["control_image", "unsupported format BMP"],
    ),
    (
        "bomb-header",
        {"prompt": "x", "mode": "img2img", "input_image": b64(png_claiming(5000, 5000)), **SMALL},
        400,
        ["input_image", "5000x5000", "limit"],
    ),
    (
        "giant-bomb",
        {"prompt": "x", "mode": "img2img", "input_image": b64(png_claiming(100000, 100000)), **SMALL},
        400,
        ["input_image", "pixels"],
    ),
    (
        "mask-mismatch",
        {
            "prompt": "x",
            "mode": "fill",
            "input_image": b64(png_bytes((64, 64))),
            "mask_image": b64(mask_png((32, 32))),
            **SMALL,
        },
        400,
        ["mask_image", "32x32", "64x64"],
    ),
    ("width-too-big", {"prompt": "x", "width": 5000, "height": 64}, 400, ["width", "2048"]),
    ("height-too-small", {"prompt": "x", "width": 64, "height": 8}, 400, ["height", "64"]),
    (
        "steps-zero",
        {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 0},
        400,
        ["num_inference_steps"],
    ),
    (
        "steps-too-many",
        {"prompt": "x", "width": 64, "height": 64, "steps": 1000},
        400,
        ["num_inference_steps"],
    ),
    ("cfg-negative", {"prompt": "x", "cfg": -1, **SMALL}, 400, ["cfg"]),
    ("strength-above-one", {"prompt": "x", "strength": 1.5, **SMALL}, 400, ["strength"]),
    ("seed-below-minus-one", {"prompt": "x", "seed": -2, **SMALL}, 400, ["seed"]),
    ("seed-too-big", {"prompt": "x", "seed": 2**63, **SMALL}, 400, ["seed"]),
    ("width-wrong-type", {"prompt": "x", "width": "wide", "height": 64}, 400, ["width"]),
    ("seed-fraction", {"prompt": "x", "seed": 1.5, **SMALL}, 400, ["seed"]),
    ("priority-wrong-type", {"prompt": "x", "priority": [1], **SMALL}, 400, ["priority"]),
    ("unknown-model", {"prompt": "x", "model_id": "sdxl", **SMALL}, 400, ["model_id", "sdxl"]),
    (
        "unknown-controlnet-type",
        {
            "prompt": "x",
            "mode": "controlnet",
            "controlnet_type": "sketchy",
            "control_image": b64(png_bytes((64, 64))),
            **SMALL,
        },
        400,
        ["controlnet_type"],
    ),
    ("not-an-object", [1, 2, 3], 400, ["JSON object"]),
]


@pytest.mark.parametrize("body,status,words", [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_bad_json_input(server: GenServeProcess, body: Any, status: int, words: list[str]) -> None:
    response = requests.post(f"{server.url}/generate", json=body, timeout=60)
    assert_error(response, status, words)


def assert_error(response: requests.Response, status: int, words: list[str]) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert body["image_base64"] is None
    assert body["detail"] == body["error"]
    for word in words:
        assert word.lower() in body["error"].lower(), f"{word!r} not in {body['error']!r}"


def test_invalid_json_is_400(server: GenServeProcess) -> None:
    response = requests.post(
        f"{server.url}/generate",
        data=b'{"prompt": "x",',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert_error(response, 400, ["not valid JSON"])


def test_empty_body_is_400(server: GenServeProcess) -> None:
    response = requests.post(f"{server.url}/generate", data=b"", headers={"Content-Type": "application/json"})
    assert_error(response, 400, ["empty"])


def test_image_over_50_mb_is_413_in_json(server: GenServeProcess) -> None:
    too_big = b64(os.urandom(50 * 1024 * 1024 + 1024))
    response = requests.post(
        f"{server.url}/generate",
        json={"prompt": "x", "mode": "img2img", "input_image": too_big, **SMALL},
        timeout=60,
    )
    assert_error(response, 413, ["input_image", "50.0 MB"])


def test_image_over_50_mb_is_413_in_form(server: GenServeProcess) -> None:
    files = {"input_image": ("big.png", os.urandom(50 * 1024 * 1024 + 1024), "image/png")}
    data = {"prompt": "x", "mode": "img2img", "width": "64", "height": "64"}
    response = requests.post(f"{server.url}/generate/img2img", data=data, files=files, timeout=60)
    assert_error(response, 413, ["input_image", "50 MB"])


FORM_CASES: list[tuple[str, dict[str, str], dict[str, bytes], list[str]]] = [
    ("missing-prompt", {"width": "64"}, {}, ["prompt", "required"]),
    ("width-not-a-number", {"prompt": "x", "width": "abc"}, {}, ["width"]),
    ("steps-not-a-number", {"prompt": "x", "num_inference_steps": "many"}, {}, ["num_inference_steps"]),
    ("cfg-not-a-number", {"prompt": "x", "cfg": "lots"}, {}, ["cfg"]),
    ("strength-out-of-range", {"prompt": "x", "mode": "img2img", "strength": "2"}, {}, ["strength"]),
    ("unknown-mode", {"prompt": "x", "mode": "sketch"}, {}, ["mode"]),
    (
        "fill-without-mask",
        {"prompt": "x", "mode": "fill"},
        {"input_image": png_bytes((64, 64))},
        ["mask_image"],
    ),
    (
        "random-bytes-file",
        {"prompt": "x", "mode": "img2img"},
        {"input_image": os.urandom(4096)},
        ["input_image", "not a decodable image"],
    ),
    (
        "gif-file",
        {"prompt": "x", "mode": "img2img"},
        {"input_image": image_as("GIF")},
        ["unsupported format GIF"],
    ),
    ("unexpected-file-field", {"prompt": "x"}, {"surprise": png_bytes((8, 8))}, ["surprise"]),
    (
        "mask-mismatch",
        {"prompt": "x", "mode": "fill"},
        {"input_image": png_bytes((64, 64)), "mask_image": mask_png((48, 48))},
        ["must match"],
    ),
]


@pytest.mark.parametrize("data,files,words", [c[1:] for c in FORM_CASES], ids=[c[0] for c in FORM_CASES])
def test_bad_form_input(
    server: GenServeProcess, data: dict[str, str], files: dict[str, bytes], words: list[str]
) -> None:
    # (None, value) parts are plain form fields: this always sends multipart/form-data, files or not.
    parts: dict[str, Any] = {key: (None, value) for key, value in data.items()}
    parts.update({name: (f"{name}.bin", content, "application/octet-stream") for name, content in files.items()})
    response = requests.post(f"{server.url}/generate/img2img", files=parts, timeout=60)
    assert_error(response, 400, words)


def test_malformed_multipart_is_400(server: GenServeProcess) -> None:
    response = requests.post(
        f"{server.url}/generate/img2img",
        data=b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nunterminated',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert response.json()["success"] is False


def test_unknown_route_is_404_in_genserve_shape(server: GenServeProcess) -> None:
    response = requests.get(f"{server.url}/no/such/route", timeout=5)
    assert_error(response, 404, ["not found"])


def test_service_still_serves_after_all_the_garbage(server: GenServeProcess) -> None:
    status = server.status()
    assert status["concurrent_manager"]["total_restarts"] == 0
    assert status["concurrent_manager"]["alive_processes"] == 1
    response = server.generate(**SMALL)
    assert response.status_code == 200 and response.json()["success"] is True
