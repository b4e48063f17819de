"""The redux mode (FLUX.1-Redux: an image's embedding as the prompt) against a real server on the embedded model
and its tiny random Redux (SigLIP + image embedder): the native routes, the jobs API, and image variations on the
OpenAI and Flux Imaging routes. Batched redux and every-route coverage of the modes are in test_generate.py."""

from __future__ import annotations

import base64
from typing import Any

import openai
import pytest
import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, b64, decode_png, png_bytes

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}
BLUE = png_bytes((96, 96), (30, 90, 200))
RED = png_bytes((96, 96), (220, 40, 30))


def redux(server: GenServeProcess, image: bytes = BLUE, **fields: Any) -> dict[str, Any]:
    response = requests.post(
        f"{server.url}/generate",
        json={"mode": "redux", "input_image": b64(image), "seed": 5, **FAST, **fields},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def pixels(image_base64: str) -> bytes:
    return decode_png(image_base64).tobytes()


def test_redux_needs_no_prompt_and_follows_the_image(server: GenServeProcess) -> None:
    blue = redux(server)
    assert blue["success"] is True and blue["mode"] == "redux" and blue["cfg"] == 2.5  # defaults.redux_cfg
    assert blue["strength"] is None  # redux takes the image's embedding, not a strength
    assert decode_png(blue["image_base64"]).size == (64, 64)
    assert pixels(redux(server)["image_base64"]) == pixels(blue["image_base64"])  # deterministic for a seed
    assert pixels(redux(server, RED)["image_base64"]) != pixels(blue["image_base64"])  # the image guides it


def test_a_prompt_and_the_scales_change_the_result(server: GenServeProcess) -> None:
    plain = pixels(redux(server)["image_base64"])
    assert pixels(redux(server, prompt="a lighthouse")["image_base64"]) != plain
    assert pixels(redux(server, prompt="   ")["image_base64"]) == plain  # a blank prompt is no prompt
    scaled = redux(server, prompt_embeds_scale=0.5, pooled_prompt_embeds_scale=0.8)
    assert pixels(scaled["image_base64"]) != plain


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "redux"}, "mode 'redux' requires input_image"),
        ({"mode": "redux", "input_image": b64(BLUE), "prompt_embeds_scale": -1}, "prompt_embeds_scale"),
        ({"mode": "text2img"}, "prompt: field required"),
    ],
    ids=["no-image", "negative-scale", "text2img-still-needs-a-prompt"],
)
def test_bad_redux_requests_are_400(server: GenServeProcess, fields: dict[str, Any], message: str) -> None:
    response = requests.post(f"{server.url}/generate", json={**FAST, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_redux_through_form_data_and_the_jobs_api(server: GenServeProcess) -> None:
    form = requests.post(
        f"{server.url}/generate/img2img",
        data={"mode": "redux", "seed": "5", **{key: str(value) for key, value in FAST.items()}},
        files={"input_image": ("blue.png", BLUE, "image/png")},
        timeout=120,
    )
    assert form.status_code == 200, form.text
    assert pixels(form.json()["image_base64"]) == pixels(redux(server)["image_base64"])
    job = requests.post(f"{server.url}/jobs", json={"mode": "redux", "input_image": b64(BLUE), **FAST}, timeout=30)
    assert job.status_code == 202, job.text
    view = server.completed_job(job.json()["task_id"])
    assert view["params"]["mode"] == "redux" and view["params"]["prompt_embeds_scale"] == 1.0


def openai_variation(server: GenServeProcess) -> str:
    """A 64x64, 2-step variation of BLUE with seed 5 through the openai SDK: its base64 PNG."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.images.create_variation(
        image=("blue.png", BLUE, "image/png"),
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 2},
    )
    assert answer.data and answer.data[0].b64_json
    return answer.data[0].b64_json


def test_variations_use_redux_when_it_is_served(server: GenServeProcess) -> None:
    variation = openai_variation(server)
    same = redux(server)  # the same seed, size and steps through the native route
    assert pixels(variation) == pixels(same["image_base64"])
    processed = requests.post(
        f"{server.url}/process",
        data={"seed": "5", **{key: str(value) for key, value in FAST.items()}},
        files={"input_file": ("blue.png", BLUE, "image/png")},
        timeout=120,
    )
    assert processed.status_code == 200, processed.text
    assert processed.json()["mode"] == "variation"
    assert pixels(processed.json()["b64_json"]) == pixels(same["image_base64"])


def test_variations_fall_back_to_img2img_when_asked(start_server: ServerFactory) -> None:
    server = start_server({"openai": {"variation_mode": "img2img"}}, in_process=True)
    variation = openai_variation(server)
    img2img = requests.post(
        f"{server.url}/generate",
        json={
            "mode": "img2img",
            "prompt": "a variation of this image, same subject and style",  # openai.variation_prompt
            "strength": 0.6,  # openai.variation_strength
            "input_image": b64(BLUE),
            "seed": 5,
            **FAST,
        },
        timeout=120,
    ).json()
    assert pixels(variation) == pixels(img2img["image_base64"])
    assert base64.b64decode(variation)
