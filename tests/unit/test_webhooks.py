"""Webhooks without a server: signing (both secret forms), backoff, field parsing, the submission checks, and the
dispatcher against a real receiver on loopback (order of one job's events, retries, the last effort at shutdown)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from genserve.config import Config, ConfigError
from genserve.errors import BadRequest
from genserve.job_manager import record_of
from genserve.jobs import Job, JobEvent, JobState
from genserve.messages import JobResult
from genserve.persistence import PersistenceWriter
from genserve.store import ResultStore
from genserve.webhooks import (
    DEFAULT_EVENTS,
    Signer,
    WebhookDispatcher,
    WebhookSpec,
    backoff_s,
    parse_events_field,
    payload,
    webhook_spec,
)
from tests.pool import make_job
from tests.server import wait_until
from tests.webhook_receiver import WebhookReceiver

WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
RAW_SECRET = "a plain secret of 16+ characters"
RAW_AS_WHSEC = "whsec_" + base64.b64encode(RAW_SECRET.encode()).decode()  # the same key, for other languages' libraries


def config(**webhooks: Any) -> Config:
    settings = {"secret": WHSEC, "backoff_s": 0.02, "backoff_max_s": 0.05, "max_attempts": 3, "timeout_s": 5.0}
    settings.update(webhooks)
    return Config.model_validate({"webhooks": settings, "inputs": {"allow_private_urls": True}})


def event(kind: str = "completed", seq: int = 1) -> JobEvent:
    return JobEvent(job_id="j1", seq=seq, kind=kind, data={"task_id": "j1", "status": kind}, at=1_700_000_000.5)


# --- signing and backoff ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "receiver_key"),
    [(WHSEC, WHSEC), (RAW_SECRET, RAW_SECRET.encode()), (RAW_SECRET, RAW_AS_WHSEC)],
    ids=["whsec", "raw-bytes", "raw-as-whsec"],
)
def test_a_receiver_verifies_either_form_of_secret(secret: str, receiver_key: str | bytes) -> None:
    body = payload(event())
    headers = Signer(secret).headers("msg_1", body)
    assert headers["webhook-signature"].startswith("v1,")
    verified = Webhook(receiver_key).verify(body, headers)
    assert verified["type"] == "job.completed" and verified["data"] == {"task_id": "j1", "status": "completed"}
    assert verified["timestamp"] == "2023-11-14T22:13:20.500000Z"


def test_a_wrong_secret_does_not_verify() -> None:
    body = payload(event())
    headers = Signer(RAW_SECRET).headers("msg_1", body)
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(WHSEC).verify(body, headers)


@pytest.mark.parametrize(
    ("secret", "message"),
    [("short", "at least 16 characters"), ("whsec_!!notbase64!!", "not base64"), ("whsec_YWJj", "at least 16 bytes")],
)
def test_unusable_secrets_are_config_errors(secret: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Signer(secret)


def test_backoff_doubles_up_to_the_cap() -> None:
    settings = config(backoff_s=1.0, backoff_max_s=5.0)
    assert [backoff_s(n, settings) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


# --- the request fields -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("started,completed", ["started", "completed"]),
        ('["Progress", "failed"]', ["progress", "failed"]),
        (["canceled", "canceled"], ["canceled"]),
        (None, None),
    ],
)
def test_events_field_takes_lists_json_and_commas(value: Any, parsed: list[str] | None) -> None:
    assert parse_events_field(value) == parsed


@pytest.mark.parametrize(
    ("value", "message"),
    [("started,finished", "unknown webhook event 'finished'"), ([], "at least one event"), ("[x", "a list like")],
)
def test_bad_events_are_named(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_events_field(value)


def test_submission_checks() -> None:
    open_config = config()
    assert webhook_spec(None, None, open_config) is None
    spec = webhook_spec(" http://127.0.0.1:9/hook ", None, open_config)
    assert spec == WebhookSpec(url="http://127.0.0.1:9/hook", events=DEFAULT_EVENTS)
    assert "progress" not in DEFAULT_EVENTS
    cases: list[tuple[str | None, Any, Config, str]] = [
        (None, ["completed"], open_config, "webhook_events needs a webhook_url"),
        ("ftp://example.com/x", None, open_config, "must be an http:// or https:// URL"),
        ("http://user:pw@127.0.0.1/x", None, open_config, "credentials"),
        ("http://127.0.0.1/x", None, config(secret=""), "webhooks.secret"),
    ]
    guarded = Config.model_validate({"webhooks": {"secret": WHSEC}})  # inputs.allow_private_urls: false
    cases += [
        ("http://127.0.0.1:8080/x", None, guarded, "loopback address; set inputs.allow_private_urls"),
        ("http://169.254.169.254/latest", None, guarded, "link-local"),
        ("http://[::ffff:10.0.0.1]/x", None, guarded, "private"),
    ]
    for url, events, settings, message in cases:
        with pytest.raises(BadRequest, match=message) as caught:
            webhook_spec(url, events, settings)
        assert caught.value.param in ("webhook_url", "webhook_events")
    public = webhook_spec("https://93.184.215.14/hook", ["completed"], guarded)  # a public address passes
    assert public is not None and public.events == ("completed",)


# --- the dispatcher, against a real receiver ----------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver(WHSEC).start()
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    result_store = ResultStore(tmp_path / "results")
    yield result_store
    result_store.close()


def watched_job(dispatcher: WebhookDispatcher, tmp_path: Path, url: str, events: tuple[Any, ...]) -> Job:
    job = make_job(tmp_path)
    dispatcher.watch(job, WebhookSpec(url=url, events=events))
    return job


def run_job(job: Job, steps: int = 3) -> None:
    """The events the supervisor would publish for a job that runs and completes."""
    job.mark_dispatched(0, "cpu")
    job.mark_started(1.0)
    for step in range(1, steps + 1):
        job.mark_progress(step, steps, 0.1 * step)
    result = JobResult(
        job_id=job.id,
        image_path="x.png",
        image_bytes=1,
        width=16,
        height=16,
        seed=7,
        started_at=1.0,
        pipeline_s=0.1,
        encode_s=0.01,
    )
    job.finish(JobState.COMPLETED, result=result)


def test_one_jobs_events_arrive_in_order_even_when_one_is_retried(
    receiver: WebhookReceiver, store: ResultStore, tmp_path: Path
) -> None:
    writer = PersistenceWriter(store)
    dispatcher = WebhookDispatcher(config(progress_interval_s=0), writer)
    writer.start()
    dispatcher.start()
    try:
        url, token = receiver.url(fail=1, only="started")
        job = watched_job(dispatcher, tmp_path, url, ("started", "progress", "completed"))
        run_job(job)
        items = receiver.wait_for(token, "job.completed")
        assert [(i.type, i.status) for i in items] == [
            ("job.started", 500),
            ("job.started", 204),
            *[("job.progress", 204)] * 3,
            ("job.completed", 204),
        ]
        assert all(item.verified for item in items)
        assert [i.body["data"]["step"] for i in items if i.type == "job.progress"] == [1, 2, 3]
        assert items[0].webhook_id == items[1].webhook_id  # a retry keeps the event's id
        assert len({i.webhook_id for i in items}) == 5
    finally:
        dispatcher.stop()
        writer.stop()


def test_progress_is_rate_limited_per_job(receiver: WebhookReceiver, store: ResultStore, tmp_path: Path) -> None:
    writer = PersistenceWriter(store)
    dispatcher = WebhookDispatcher(config(progress_interval_s=60), writer)
    writer.start()
    dispatcher.start()
    try:
        url, token = receiver.url()
        run_job(watched_job(dispatcher, tmp_path, url, ("progress", "completed")), steps=5)
        items = receiver.wait_for(token, "job.completed")
        assert [i.type for i in items] == ["job.progress", "job.completed"]  # steps 2-5 came within the interval
    finally:
        dispatcher.stop()
        writer.stop()


def test_stop_gives_a_pending_terminal_event_one_last_try(
    receiver: WebhookReceiver, store: ResultStore, tmp_path: Path
) -> None:
    """A completed event waiting out a long backoff is tried once more at shutdown; a progress one is given up."""
    writer = PersistenceWriter(store)
    dispatcher = WebhookDispatcher(config(backoff_s=60, backoff_max_s=60, progress_interval_s=0), writer)
    writer.start()
    dispatcher.start()
    url, token = receiver.url(fail=1, only="completed")
    job = make_job(tmp_path)
    spec = WebhookSpec(url=url, events=("progress", "completed"))
    store.insert(replace(record_of(job), webhook=spec.initial_view()))
    dispatcher.watch(job, spec)
    run_job(job, steps=1)
    wait_until(lambda: len(receiver.of(token)) == 2, 10, what="progress, then completed's first (failed) attempt")
    dispatcher.stop()  # the backoff has 60 s to go: only the last effort can deliver it now
    writer.stop()
    assert [(i.type, i.status) for i in receiver.of(token)] == [
        ("job.progress", 204),
        ("job.completed", 500),
        ("job.completed", 204),
    ]
    stored = store.get(job.id)
    assert stored is not None and stored.webhook is not None
    assert [(d["event"], d["status"], d["attempts"]) for d in stored.webhook["deliveries"]] == [
        ("progress", "delivered", 1),
        ("completed", "delivered", 2),
    ]
    assert stored.webhook["deliveries"][1]["last_status_code"] == 204
