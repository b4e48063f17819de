"""LoRAs per request, against real servers on the embedded model and its two tiny random LoRAs (embedded-style,
embedded-detail): the real loading code (diffusers' load_lora_weights, PEFT), no leakage between jobs, every route
that takes them, the refusals, and the dispatcher's affinity for workers that hold a job's adapters."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, b64, decode_png, mask_png, png_bytes

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}
STYLE = {"name": "embedded-style", "weight": 1.0}
DETAIL = {"name": "embedded-detail", "weight": 0.8}


@pytest.fixture(scope="module")
def loras_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def served(start_server: ServerFactory, loras_dir: Path) -> GenServeProcess:
    """One worker, fused q/k/v on (the default), so LoRA jobs also test running the attentions unfused."""
    return start_server({"loras": {"dir": str(loras_dir), "max_per_request": 2}}, in_process=True)


def make(server: GenServeProcess, **fields: Any) -> dict[str, Any]:
    response = server.generate(**{"prompt": "a lighthouse", "seed": 21, **FAST, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def pixels(body: dict[str, Any]) -> bytes:
    return decode_png(body["image_base64"]).tobytes()


def test_a_lora_changes_the_image_and_nothing_leaks_into_the_next_job(served: GenServeProcess) -> None:
    fresh = make(served)  # before this worker ever loaded an adapter
    styled = make(served, loras=[STYLE])
    assert styled["loras"] == [STYLE] and fresh["loras"] is None
    assert pixels(styled) != pixels(fresh)
    after = make(served)
    assert pixels(after) == pixels(fresh)  # bit-identical: LoRA layers off, attentions fused again
    both = make(served, loras=[STYLE, DETAIL])
    assert pixels(both) not in (pixels(fresh), pixels(styled))
    assert pixels(make(served, loras=[STYLE])) == pixels(styled)  # the same adapters give the same image


def test_weight_zero_gives_the_base_image_and_scale_is_weight(served: GenServeProcess) -> None:
    base = make(served)
    zero = make(served, loras=[{"name": "embedded-style", "scale": 0.0}])
    assert zero["loras"] == [{"name": "embedded-style", "weight": 0.0}]
    assert pixels(zero) == pixels(base)
    half = make(served, loras=[{"name": "embedded-style", "scale": 0.5}])
    assert pixels(half) not in (pixels(base), pixels(make(served, loras=[STYLE])))


def test_fill_takes_loras_into_its_own_transformer(served: GenServeProcess) -> None:
    images = {"input_image": b64(png_bytes((64, 64))), "mask_image": b64(mask_png((64, 64)))}
    plain = make(served, mode="fill", **images)
    styled = make(served, mode="fill", loras=[STYLE], **images)
    assert pixels(styled) != pixels(plain)
    workers = served.status()["workers"]
    held = workers[0]["loras"]["held"]
    assert any(key.startswith("fill/embedded-style@") for key in held)
    assert any(key.startswith("base/embedded-style@") for key in held)


def test_form_jobs_openai_and_process_take_loras(served: GenServeProcess) -> None:
    form = requests.post(
        f"{served.url}/generate/img2img",
        data={"prompt": "p", "mode": "text2img", "seed": "21", "loras": json.dumps([STYLE]), **_strings(FAST)},
        timeout=120,
    )
    assert form.status_code == 200, form.text
    assert form.json()["loras"] == [STYLE]
    assert pixels(form.json()) == pixels(make(served, prompt="p", loras=[STYLE]))

    job = requests.post(f"{served.url}/jobs", json={"prompt": "p", "loras": [DETAIL], **FAST}, timeout=30)
    assert job.status_code == 202, job.text
    view = served.completed_job(job.json()["task_id"])
    assert view["params"]["loras"] == [DETAIL]

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    plain = client.images.generate(prompt="p", size="64x64", response_format="b64_json", extra_body={"seed": 3})
    styled = client.images.generate(
        prompt="p", size="64x64", response_format="b64_json", extra_body={"seed": 3, "loras": [STYLE]}
    )
    assert plain.data and styled.data
    assert base64.b64decode(plain.data[0].b64_json or "") != base64.b64decode(styled.data[0].b64_json or "")

    process = requests.post(
        f"{served.url}/process",
        data={"prompt": "p", "loras": json.dumps([STYLE]), **_strings(FAST)},
        timeout=120,
    )
    assert process.status_code == 200, process.text


def _strings(fields: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in fields.items()}


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"name": "nope"}], "no LoRA named 'nope'; available: embedded-detail, embedded-style"),
        ([STYLE, DETAIL, {"name": "x"}], "at most 2 LoRAs per request (loras.max_per_request), got 3"),
        ([STYLE, STYLE], "each LoRA may be named once"),
        ([{"name": "embedded-style", "weight": 9}], "weight of LoRA 'embedded-style' must be between -4 and 4"),
        ([{"name": "embedded-style", "strength": 1}], "loras"),
        ("not json", "loras must be a JSON list"),
    ],
    ids=["unknown", "too-many", "twice", "weight-range", "unknown-field", "not-json"],
)
def test_bad_loras_are_400_naming_the_problem(served: GenServeProcess, loras: Any, message: str) -> None:
    response = served.generate(prompt="p", loras=loras, **FAST)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_a_lora_that_does_not_fit_the_fill_transformer_is_refused_for_fill(
    served: GenServeProcess, loras_dir: Path, embedded_cache: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    config = next(embedded_cache.glob("flux-embedded-v*/base/transformer/config.json"))
    settings = json.loads(config.read_text())
    width = int(settings["num_attention_heads"] * settings["attention_head_dim"])
    # x_embedder takes 64 latent channels in the base transformer, 384 in Fill: this one fits only the base.
    tensors = {
        "transformer.x_embedder.lora_A.weight": torch.zeros(4, settings["in_channels"]),
        "transformer.x_embedder.lora_B.weight": torch.zeros(width, 4),
    }
    save_file(tensors, str(loras_dir / "base-only.safetensors"))
    fill = served.generate(
        prompt="p",
        mode="fill",
        input_image=b64(png_bytes((64, 64))),
        mask_image=b64(mask_png((64, 64))),
        loras=[{"name": "base-only"}],
        **FAST,
    )
    assert fill.status_code == 400, fill.text
    assert "LoRA 'base-only' does not fit the Fill transformer that mode 'fill' runs on" in fill.json()["error"]
    shutil.move(str(loras_dir / "base-only.safetensors"), str(loras_dir.parent / "base-only.safetensors"))


def test_workers_report_the_adapters_they_hold(served: GenServeProcess) -> None:
    make(served, loras=[STYLE])
    view = served.status()["workers"][0]["loras"]
    assert view["loads"] >= 1 and view["adapter_mib"] > 0
    assert any(key.startswith("base/embedded-style@") for key in view["held"])


def test_loras_can_be_turned_off(start_server: ServerFactory) -> None:
    server = start_server({"loras": {"enabled": False}}, in_process=True)
    response = server.generate(prompt="p", loras=[STYLE], **FAST)
    assert response.status_code == 400
    assert "LoRAs are turned off on this server (loras.enabled: false)" in response.json()["error"]


def test_jobs_go_to_the_worker_that_holds_their_adapters(start_server: ServerFactory) -> None:
    """Two workers, one adapter slot each, jobs one at a time alternating between two LoRAs: after the first
    two loads every job lands where its adapter is warm, so nothing is loaded or unloaded again."""
    server = start_server({"workers": {"cpu_workers": 2}, "loras": {"max_loaded": 1}}, in_process=True)
    server.wait_full_strength()  # both workers idle: affinity chooses among idle workers only
    landed: dict[str, set[int]] = {"embedded-style": set(), "embedded-detail": set()}
    for round_ in range(3):
        for lora in (STYLE, DETAIL):
            body = make(server, loras=[lora], seed=round_)
            landed[lora["name"]].add(body["worker_id"])
    assert all(len(workers) == 1 for workers in landed.values()), landed
    assert landed["embedded-style"] != landed["embedded-detail"]
    status = server.status()
    assert status["loras"]["adapter_loads"] == 2
    assert status["loras"]["adapter_loads_avoided"] >= 2  # the first idle worker held the other LoRA each time
    assert sum(worker["loras"]["unloads"] for worker in status["workers"]) == 0
