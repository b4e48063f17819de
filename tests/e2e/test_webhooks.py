"""Signed webhooks against a real server: every job-submitting route delivers, signatures verify with the
``standardwebhooks`` package, a receiver that fails twice gets the event on the third attempt (and the job record
says so), events are filtered and arrive in order, and bad or unsafe requests are refused with 400.

The server runs fault-injection workers (tests/fault_worker.py) so a job can fail ([oom]) or be held in the queue
behind a gated one; other jobs run the real pipeline. The receiver (tests/webhook_receiver.py) is a real HTTP server
on loopback, which is why this server sets inputs.allow_private_urls.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from tests.conftest import FAULT_SERVER, Gates, ServerFactory, held
from tests.server import GenServeProcess, png_bytes, wait_until
from tests.webhook_receiver import WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"genserve-test-webhook-key-32byte").decode()
WEBHOOKS = {
    "secret": SECRET,
    "max_attempts": 3,
    "backoff_s": 0.05,
    "backoff_max_s": 0.2,
    "timeout_s": 5,
    "progress_interval_s": 0,
}
FAST = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver(SECRET).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hooked(start_server: ServerFactory) -> GenServeProcess:
    return start_server(
        {"webhooks": WEBHOOKS, "inputs": {"allow_private_urls": True}}, module=FAULT_SERVER, in_process=True
    )


def submit(server: GenServeProcess, **fields: Any) -> str:
    answer = requests.post(f"{server.url}/jobs", json={"prompt": "a lighthouse", **FAST, **fields}, timeout=30)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


def webhook_of(server: GenServeProcess, task_id: str) -> dict[str, Any]:
    view = requests.get(f"{server.url}/jobs/{task_id}", timeout=10).json()
    webhook: dict[str, Any] = view["webhook"]
    return webhook


def settled(server: GenServeProcess, task_id: str, count: int) -> dict[str, Any]:
    """The job's webhook once ``count`` deliveries are shown and none is pending."""

    def done() -> dict[str, Any] | None:
        webhook = webhook_of(server, task_id)
        deliveries = webhook["deliveries"]
        return webhook if len(deliveries) == count and all(d["status"] != "pending" for d in deliveries) else None

    return wait_until(done, 60, 0.05, f"job {task_id}'s webhook deliveries to settle")


# --- deliveries ---------------------------------------------------------------------------------------------------


def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt(
    hooked: GenServeProcess, receiver: WebhookReceiver
) -> None:
    url, token = receiver.url(fail=2)
    task_id = submit(hooked, webhook_url=url, webhook_events=["completed"])
    received = receiver.wait_for(token, "job.completed")
    print(f"\nwebhook delivery trace (job {task_id}):\n{receiver.trace(token)}")
    assert [(item.type, item.status) for item in received] == [("job.completed", 500)] * 2 + [("job.completed", 204)]
    assert all(item.verified for item in received)
    assert len({item.webhook_id for item in received}) == 1  # one event: the same webhook-id on every retry
    body = received[-1].body
    assert body["data"]["task_id"] == task_id and body["data"]["status"] == "completed"
    assert body["data"]["result"]["images"][0]["url"] == f"/image/{task_id}"

    webhook = settled(hooked, task_id, 1)
    assert webhook["url"] == url and webhook["events"] == ["completed"]
    assert webhook["deliveries"] == [
        {
            "event": "completed",
            "id": received[0].webhook_id,
            "status": "delivered",
            "attempts": 3,
            "last_status_code": 204,
            "last_error": None,
        }
    ]
    record = requests.get(f"{hooked.url}/jobs/{task_id}", timeout=10).text
    assert SECRET not in record and SECRET.removeprefix("whsec_") not in record


def test_a_receiver_that_never_accepts_is_given_up_after_max_attempts(
    hooked: GenServeProcess, receiver: WebhookReceiver
) -> None:
    url, token = receiver.url(fail=99)
    task_id = submit(hooked, webhook_url=url, webhook_events=["completed"])
    [delivery] = settled(hooked, task_id, 1)["deliveries"]
    assert delivery["status"] == "failed" and delivery["attempts"] == WEBHOOKS["max_attempts"]
    assert delivery["last_status_code"] == 500 and delivery["last_error"] == "HTTP 500 Internal Server Error"
    assert len(receiver.of(token)) == WEBHOOKS["max_attempts"]


def test_default_events_leave_progress_out(hooked: GenServeProcess, receiver: WebhookReceiver) -> None:
    url, token = receiver.url()
    task_id = submit(hooked, webhook_url=url, num_inference_steps=3)
    received = receiver.wait_for(token, "job.completed")
    assert [item.type for item in received] == ["job.started", "job.completed"]
    webhook = settled(hooked, task_id, 2)
    assert webhook["events"] == ["started", "completed", "failed", "canceled"]
    assert [d["event"] for d in webhook["deliveries"]] == ["started", "completed"]


def test_one_jobs_events_arrive_in_order(hooked: GenServeProcess, receiver: WebhookReceiver) -> None:
    """started is refused once: progress and completed wait behind its retry, never overtaking it."""
    url, token = receiver.url(fail=1, only="started")
    submit(hooked, webhook_url=url, webhook_events="started,progress,completed", num_inference_steps=3)
    received = receiver.wait_for(token, "job.completed")
    print(f"\nwebhook delivery trace (events in order):\n{receiver.trace(token)}")
    assert [(item.type, item.status) for item in received] == [
        ("job.started", 500),
        ("job.started", 204),
        ("job.progress", 204),
        ("job.progress", 204),
        ("job.progress", 204),
        ("job.completed", 204),
    ]
    assert [item.body["data"]["step"] for item in received if item.type == "job.progress"] == [1, 2, 3]
    assert all(item.verified for item in received)


def test_failed_and_canceled_jobs_are_delivered(
    hooked: GenServeProcess, receiver: WebhookReceiver, gates: Gates, gate: str
) -> None:
    failed_url, failed_token = receiver.url()
    submit(hooked, prompt="[oom] too big", webhook_url=failed_url, webhook_events=["failed"])
    [failure] = receiver.wait_for(failed_token, "job.failed")
    assert failure.verified and failure.body["data"]["error"]["type"] == "out_of_memory"

    submit(hooked, **held(gate))  # holds the only worker, so the next job stays queued
    canceled_url, canceled_token = receiver.url()
    queued = submit(hooked, webhook_url=canceled_url)
    assert requests.post(f"{hooked.url}/jobs/{queued}/cancel", timeout=30).status_code == 200
    gates.open(gate)
    [canceled] = receiver.wait_for(canceled_token, "job.canceled")
    assert canceled.verified and canceled.body["data"]["cancel_reason"] == "canceled by client"


# --- every job-submitting route -----------------------------------------------------------------------------------


def sdk(server: GenServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0, timeout=120)


def image_file() -> tuple[str, bytes, str]:
    return ("in.png", png_bytes((64, 64)), "image/png")


def post_generate(server: GenServeProcess, url: str) -> None:
    answer = requests.post(f"{server.url}/generate", json={"prompt": "p", **FAST, "webhook_url": url}, timeout=120)
    assert answer.status_code == 200, answer.text


def post_generate_form(server: GenServeProcess, url: str) -> None:
    fields = {"prompt": "p", "mode": "img2img", **FAST, "webhook_url": url, "webhook_events": "completed"}
    answer = requests.post(
        f"{server.url}/generate/img2img", data=fields, files={"input_image": image_file()}, timeout=120
    )
    assert answer.status_code == 200, answer.text


def post_jobs_form(server: GenServeProcess, url: str) -> None:
    fields = {"prompt": "p", **FAST, "webhook_url": url, "webhook_events": '["completed"]'}
    answer = requests.post(f"{server.url}/jobs/form", data=fields, timeout=30)
    assert answer.status_code == 202, answer.text


def sdk_generations(server: GenServeProcess, url: str) -> None:
    hook = {"webhook_url": url, "webhook_events": ["completed"], "num_inference_steps": 2}
    result = sdk(server).images.generate(prompt="p", size="64x64", extra_body=hook)
    assert result.data and result.data[0].url


def sdk_edits(server: GenServeProcess, url: str) -> None:
    # Multipart: the SDK sends the list as webhook_events[]=completed
    hook = {"webhook_url": url, "webhook_events": ["completed"], "num_inference_steps": 2}
    result = sdk(server).images.edit(image=image_file(), prompt="p", size="64x64", extra_body=hook)
    assert result.data and result.data[0].url


def post_variations(server: GenServeProcess, url: str) -> None:
    fields = {"size": "64x64", "num_inference_steps": "2", "webhook_url": url}
    answer = requests.post(
        f"{server.url}/v1/images/variations", data=fields, files={"image": image_file()}, timeout=120
    )
    assert answer.status_code == 200, answer.text


def post_process(server: GenServeProcess, url: str) -> None:
    body = {"prompt": "p", **FAST, "webhook_url": url, "webhook_events": ["completed"]}
    answer = requests.post(f"{server.url}/process", json=body, timeout=120)
    assert answer.status_code == 200, answer.text


def post_process_raw(server: GenServeProcess, url: str) -> None:
    fields = {"prompt": "p", **FAST, "webhook_url": url}
    answer = requests.post(f"{server.url}/process/raw", data=fields, files={"input_file": image_file()}, timeout=120)
    assert answer.status_code == 200 and answer.content[:4] == b"\x89PNG", answer.text


ROUTES = {
    "POST /generate": post_generate,
    "POST /generate/img2img": post_generate_form,
    "POST /jobs/form": post_jobs_form,
    "POST /v1/images/generations (SDK)": sdk_generations,
    "POST /v1/images/edits (SDK)": sdk_edits,
    "POST /v1/images/variations": post_variations,
    "POST /process": post_process,
    "POST /process/raw": post_process_raw,
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_delivers(hooked: GenServeProcess, receiver: WebhookReceiver, route: str) -> None:
    url, token = receiver.url()
    ROUTES[route](hooked, url)
    received = receiver.wait_for(token, "job.completed")
    assert received and all(item.verified for item in received)
    task_id = received[-1].body["data"]["task_id"]
    assert webhook_of(hooked, task_id)["url"] == url


# --- refusals -----------------------------------------------------------------------------------------------------


def refused(server: GenServeProcess, route: str, body: dict[str, Any]) -> str:
    answer = requests.post(f"{server.url}{route}", json={"prompt": "p", **FAST, **body}, timeout=30)
    assert answer.status_code == 400, answer.text
    payload = answer.json()
    message: str = payload["error"]["message"] if route.startswith("/v1/") else payload["error"]
    return message


def test_bad_webhook_fields_are_400(hooked: GenServeProcess) -> None:
    ftp = refused(hooked, "/generate", {"webhook_url": "ftp://example.com/hook"})
    assert "webhook_url must be an http:// or https:// URL" in ftp
    unknown = refused(hooked, "/jobs", {"webhook_url": "http://127.0.0.1:9/h", "webhook_events": ["finished"]})
    assert "unknown webhook event 'finished'; use any of started, progress, completed, failed, canceled" in unknown
    alone = refused(hooked, "/process", {"webhook_events": ["completed"]})
    assert "webhook_events needs a webhook_url" in alone
    answer = requests.post(
        f"{hooked.url}/v1/images/generations",
        json={"prompt": "p", "size": "64x64", "webhook_url": "file:///etc/passwd"},
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "webhook_url"


@pytest.fixture(scope="module")
def guarded(start_server: ServerFactory) -> GenServeProcess:
    """No webhooks.secret and inputs.allow_private_urls false; its refusals come before any worker is needed."""
    return start_server(
        {"webhooks": {"secret": ""}, "inputs": {"allow_private_urls": False}}, wait_ready=False, in_process=True
    )


def test_a_loopback_target_is_refused_without_allow_private_urls(
    guarded: GenServeProcess, receiver: WebhookReceiver
) -> None:
    url, _ = receiver.url()
    message = refused(guarded, "/generate", {"webhook_url": url})
    assert "webhook_url: URL host 127.0.0.1 is a loopback address; set inputs.allow_private_urls to allow it" in message
    metadata = refused(guarded, "/jobs", {"webhook_url": "http://169.254.169.254/latest/meta-data"})
    assert "link-local" in metadata


def test_no_secret_means_no_webhooks(guarded: GenServeProcess) -> None:
    message = refused(guarded, "/jobs", {"webhook_url": "https://93.184.215.14/hook"})  # a public address
    assert "webhooks.secret (or GENSERVE_WEBHOOK_SECRET) is not set" in message
    assert "does not send unsigned webhooks" in message
