"""Memory plans through real servers: int8 weight-only quantisation end to end on the CPU, and a model that does not
fit (the slot fails once, with its plan, and is never reloaded)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, b64, decode_png, mask_png, png_bytes, wait_until

INT8 = {"memory": {"strategy": "quantized", "auto_quantization": "int8"}}
JOB = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "num_inference_steps": 4, "seed": 1234}


def pixels(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(decode_png(response.json()["image_base64"]), dtype=np.float64)


def test_int8_serves_every_mode_and_its_images_are_close_to_unquantised_ones(
    server: GenServeProcess, start_server: ServerFactory
) -> None:
    int8 = start_server(INT8, in_process=True)
    plan = int8.status()["workers"][0]["memory_plan"]
    assert plan["fits"] and plan["setting"] == "transformers quantised (int8)"
    assert plan["quantize"] == {"transformer": "int8", "fill": "int8", "controlnet": "int8", "text_encoder_2": "none"}
    precision = {c["name"]: c["precision"] for c in plan["components"]}
    assert precision == {
        "text_encoder": "fp32",
        "text_encoder_2": "fp32",
        "vae": "fp32",
        "transformer": "int8",
        "fill": "int8",
        "controlnet": "int8",
        "redux_image_encoder": "fp32",  # never quantised: they run once per job, like the text encoders
        "redux_image_embedder": "fp32",
    }
    reference, quantised = pixels(server.generate(**JOB)), pixels(int8.generate(**JOB))
    difference = np.abs(reference - quantised)
    # Same seed, same prompt: int8 weights change the image a little, not into another image.
    assert difference.max() > 0
    assert difference.mean() < 4, difference.mean()
    assert np.array_equal(quantised, pixels(int8.generate(**JOB)))  # and it is deterministic
    # The other modes run on the same quantised transformer (img2img, controlnet) or their own (fill).
    image, mask = b64(png_bytes((256, 256))), b64(mask_png((256, 256)))
    for fields in (
        {"mode": "img2img", "input_image": image, "strength": 0.6},
        {"mode": "fill", "input_image": image, "mask_image": mask},
        {"mode": "controlnet", "control_image": image},
        {"mode": "controlnet", "control_image": image, "input_image": image},
    ):
        assert pixels(int8.generate(**JOB, **fields)).shape == (256, 256, 3), fields


def test_models_shows_each_workers_plan(server: GenServeProcess) -> None:
    model = requests.get(f"{server.url}/models", timeout=5).json()[0]
    plans = model["memory_plans"]
    assert len(plans) == 1 and plans[0]["slot"] == 0
    assert plans[0]["fits"] is True and plans[0]["setting"] == "everything pinned"
    assert plans[0]["device_gib"] > 0 and plans[0]["device"] == "cpu"


def test_a_model_that_does_not_fit_fails_once_with_its_plan_and_is_not_reloaded(start_server: ServerFactory) -> None:
    tiny = start_server(
        {"workers": {"device_memory_gb": 0.001, "restart_backoff_s": 0.05}, "memory": {"strategy": "pinned"}},
        wait_ready=False,
    )

    def failed() -> dict[str, Any] | None:
        worker = tiny.status()["workers"][0]
        return worker if worker["state"] == "failed" else None

    worker = wait_until(failed, 120, 0.1, "the worker to refuse its plan")
    time.sleep(1.0)  # a reload loop at this backoff would have respawned it several times by now
    status = tiny.status()
    assert status["workers"][0]["state"] == "failed" and status["workers"][0]["restarts"] == 0
    assert status["status"] == "failed"
    plan = worker["memory_plan"]
    assert plan["fits"] is False and plan["strategy"] == "pinned" and plan["device_available_gib"] == 0.0
    assert "no setting fits this device" in plan["note"]
    ready = requests.get(f"{tiny.url}/ready", timeout=5)
    assert ready.status_code == 503
    assert "cannot load the models" in ready.json()["reason"] and "do not fit" in ready.json()["reason"]
    refused = tiny.generate(**JOB)
    assert refused.status_code == 503 and "do not fit" in refused.json()["error"]
    assert "memory plan for cpu: strategy pinned" in tiny.log_tail(200)
