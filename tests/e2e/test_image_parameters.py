"""Generation parameters inside the images (results.embed_parameters): a PNG "parameters" text chunk, as A1111
writes and viewers read, and EXIF UserComment when /image re-encodes to JPEG or WEBP."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, b64, png_bytes

FAST = {"width": 96, "height": 64, "num_inference_steps": 2}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def png_parameters(image_base64: str) -> str | None:
    with Image.open(io.BytesIO(base64.b64decode(image_base64))) as image:
        text: str | None = image.info.get("parameters")
        return text


def test_each_png_carries_its_own_parameters(server: GenServeProcess) -> None:
    body = server.generate(prompt="a lighthouse, übertrieben", seed=7, num_images=2, cfg=4.5, **FAST).json()
    first, second = (png_parameters(image["image_base64"]) for image in body["images"])
    assert first == (
        "a lighthouse, übertrieben\nSteps: 2, CFG scale: 4.5, Seed: 7, Size: 96x64, Model: flux1-dev, Mode: text2img"
    )
    assert second is not None and "Seed: 8," in second  # a sibling's own seed
    img2img = server.generate(
        prompt="p", mode="img2img", input_image=b64(png_bytes((96, 64))), strength=0.5, loras=None, **FAST
    ).json()
    assert "Mode: img2img, Denoising strength: 0.5" in (png_parameters(img2img["image_base64"]) or "")


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_re_encoded_images_keep_them_as_exif_user_comment(server: GenServeProcess, fmt: str) -> None:
    body = server.generate(prompt="a red fox", seed=3, **FAST).json()
    answer = requests.get(f"{server.url}/image/{body['task_id']}", params={"format": fmt}, timeout=30)
    assert answer.status_code == 200
    with Image.open(io.BytesIO(answer.content)) as image:
        comment = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
    assert comment[:8] == b"UNICODE\0"
    assert comment[8:].decode("utf-16-be") == png_parameters(body["image_base64"])


def test_embedding_can_be_turned_off(start_server: ServerFactory) -> None:
    plain = start_server({"results": {"embed_parameters": False}}, in_process=True)
    body = plain.generate(prompt="nothing inside", **FAST).json()
    assert png_parameters(body["image_base64"]) is None
