"""RedisJobRecords and the job event streams against a real redis-server, with the SQLite ResultStore as the
reference for every record answer."""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from genserve.cluster.redis_records import (
    QueueUnavailable,
    RedisJobEvents,
    RedisJobRecords,
    stream_id,
)
from genserve.jobs import JobEvent
from genserve.store import JobRecord, ResultStore
from tests.redis_server import RedisServer, redis_server
from tests.server import free_port, wait_until

__all__ = ["redis_server"]  # the fixture, imported for pytest

STATUSES = ["queued", "running", "completed", "failed", "canceled"]
OWNERS = [None, "alice", "bob", "team:x"]  # a colon in an owner must not confuse the index keys


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def records(redis_server: RedisServer) -> Iterator[RedisJobRecords]:
    r = RedisJobRecords.connect(redis_server.url, prefix=unique_prefix())
    yield r
    r.close()


@pytest.fixture
def events(redis_server: RedisServer) -> Iterator[RedisJobEvents]:
    e = RedisJobEvents.connect(redis_server.url, prefix=unique_prefix(), ttl_s=600, unfinished_ttl_s=3600)
    yield e
    e.close()


def make_record(i: int, rng: random.Random, **overrides: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": f"job-{i:03d}",
        "status": rng.choice(STATUSES),
        "mode": "txt2img",
        "model_id": "tiny",
        "priority": rng.randint(-5, 5),
        "params": {"prompt": f"a cat {i}", "steps": 2, "nested": {"w": 64}},
        # Ties on purpose (the order breaks them by id) and exact floats with many digits.
        "submitted_at": 1_700_000_000.0 + rng.randint(0, 15) + 0.123456789,
        "owner": rng.choice(OWNERS),
        "seed": rng.choice([None, 0, 2**40 + 3]),
    }
    if values["status"] not in ("queued", "running"):
        values |= {"finished_at": values["submitted_at"] + 1.5, "worker_slot": 0, "device": "cpu"}
    values.update(overrides)
    return JobRecord(**values)


def index_members(records: RedisJobRecords) -> dict[str, set[str]]:
    client = records._client
    return {
        key.decode()[len(records.prefix) :]: {member.decode() for member in client.zrange(key, 0, -1)}
        for key in client.scan_iter(match=records.prefix + "jobs:*")
    }


def expected_indexes(record: JobRecord) -> set[str]:
    names = {"jobs:all", f"jobs:status:{record.status}"}
    if record.status not in ("queued", "running"):
        names.add("jobs:finished")
    if record.owner is not None:
        names |= {f"jobs:owner:{record.owner}", f"jobs:owner-status:{record.status}:{record.owner}"}
    return names


def assert_indexes_match_records(records: RedisJobRecords) -> None:
    """Every record is in exactly the indexes of its status and owner, and no index holds anything else."""
    stored = {key.decode().rsplit("job:", 1)[1] for key in records._client.scan_iter(match=records.prefix + "job:*")}
    wanted: dict[str, set[str]] = {}
    for job_id in stored:
        record = records.get(job_id)
        assert record is not None
        for name in expected_indexes(record):
            wanted.setdefault(name, set()).add(job_id)
    assert index_members(records) == wanted


# --- records: the SQLite store is the reference --------------------------------------------------------------------


def test_records_answer_like_the_sqlite_store(records: RedisJobRecords, tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    rng = random.Random(15)
    for i in range(40):
        record = make_record(i, rng)
        store.insert(record)
        records.insert(record)

    # Updates that move records between statuses and owners, clear columns (None) and set JSON columns.
    updates: list[tuple[str, dict[str, Any]]] = []
    for i in rng.sample(range(40), 15):
        updates.append((f"job-{i:03d}", {"status": rng.choice(STATUSES), "error_message": rng.choice([None, "x"])}))
    updates.append(("job-001", {"owner": "bob", "webhook": {"url": "https://example.test/h", "deliveries": [1]}}))
    updates.append(("job-002", {"owner": None, "seed": None, "submitted_at": 1_700_000_003}))  # int for a REAL
    updates.append(("no-such-job", {"status": "failed"}))  # matches nothing, in both
    store.apply(updates)
    records.apply(updates)
    store.update("job-003", status="completed", image_bytes=1234, width=64, height=64)
    records.update("job-003", status="completed", image_bytes=1234, width=64, height=64)
    store.delete("job-004")
    records.delete("job-004")

    assert records.count() == store.count() == 39
    for i in range(40):
        assert records.get(f"job-{i:03d}") == store.get(f"job-{i:03d}")
    assert records.get("job-002").submitted_at == 1_700_000_003.0  # type: ignore[union-attr]
    assert records.get("job-004") is None

    pages = [(50, 0), (3, 0), (3, 2), (5, 7), (0, 0), (10, 35), (-1, 4)]
    for status, owner, (limit, offset) in itertools.product([None, "", *STATUSES, "nope"], OWNERS + ["nobody"], pages):
        mine = records.list(status, limit=limit, offset=offset, owner=owner)
        reference = store.list(status, limit=limit, offset=offset, owner=owner)
        assert mine == reference, (status, owner, limit, offset)
    assert_indexes_match_records(records)
    store.close()


def test_inserting_an_existing_id_and_unknown_columns_are_refused(records: RedisJobRecords) -> None:
    record = make_record(1, random.Random(1), status="queued")
    records.insert(record)
    with pytest.raises(ValueError, match="already exists"):
        records.insert(record)

    with pytest.raises(ValueError, match=r"unknown job columns \['colour'\]"):
        records.apply([(record.id, {"status": "running"}), (record.id, {"colour": "red"})])
    with pytest.raises(ValueError, match=r"\['status'\] cannot be None"):
        records.update(record.id, status=None)
    with pytest.raises(ValueError, match="id cannot change"):
        records.update(record.id, id="other")
    assert records.get(record.id) == record  # nothing of the refused batch was written


def test_status_changes_move_records_between_indexes_atomically(records: RedisJobRecords) -> None:
    rng = random.Random(7)
    ids = [f"job-{i:03d}" for i in range(30)]
    for i in range(30):
        records.insert(make_record(i, rng, status="queued"))
    records.update("job-000", status="running", owner="alice")
    assert "job-000" in index_members(records)["jobs:owner-status:running:alice"]
    assert "job-000" not in index_members(records).get("jobs:status:queued", set())

    # Four writers change statuses and owners of the same records at once: a read-modify-write that was not
    # atomic would leave ids in the index of a status they no longer have.
    def writer(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(150):
            batch = [(local.choice(ids), {"status": local.choice(STATUSES), "owner": local.choice(OWNERS)})]
            records.apply(batch * local.randint(1, 2))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert_indexes_match_records(records)
    listed, total = records.list()
    assert total == 30 and sorted(record.id for record in listed) == ids


def test_retention_drops_old_finished_records_from_hashes_and_indexes(records: RedisJobRecords) -> None:
    now = 1_700_100_000.0
    rng = random.Random(3)
    for i, status in enumerate(STATUSES * 4):  # 20 records: half old, half recent
        age = 7200 if i % 2 == 0 else 60
        records.insert(make_record(i, rng, status=status, submitted_at=now - age - i, owner="alice"))

    deleted = records.expire_finished(max_age_s=3600, now=now, batch=3)  # several pages of 3
    old_finished = [i for i, status in enumerate(STATUSES * 4) if i % 2 == 0 and status not in ("queued", "running")]
    assert deleted == len(old_finished) == 6
    assert all(records.get(f"job-{i:03d}") is None for i in old_finished)
    _, total = records.list()
    assert total == records.count() == 14
    kept_old = {record.status for record in records.list(limit=-1)[0] if record.submitted_at < now - 3600}
    assert kept_old == {"queued", "running"}  # old but unfinished: kept
    assert_indexes_match_records(records)
    assert records.expire_finished(max_age_s=3600, now=now) == 0


def test_retention_names_each_record_it_deleted_with_its_image_bytes(records: RedisJobRecords) -> None:
    now = 1_700_100_000.0
    rng = random.Random(4)
    sizes = {"completed": 1234, "failed": None, "canceled": None, "queued": None, "running": None}
    for i, status in enumerate(STATUSES * 3):  # 15 records, all old: the 9 finished ones go
        records.insert(make_record(i, rng, status=status, submitted_at=now - 7200 - i, image_bytes=sizes[status]))
    records.insert(make_record(99, rng, status="completed", submitted_at=now - 60, image_bytes=5))  # recent: stays
    records._client.delete(records._job_key("job-002"))  # a dangling index entry: dropped, but not reported

    expired = records.expire_finished_ids(max_age_s=3600, now=now, batch=4)
    expected = {
        (f"job-{i:03d}", sizes[status])
        for i, status in enumerate(STATUSES * 3)
        if status not in ("queued", "running") and i != 2
    }
    assert len(expired) == len(expected) == 8 and set(expired) == expected
    assert sum(size or 0 for _, size in expired) == 2 * 1234 and all(records.get(i) is None for i, _ in expired)
    kept, total = records.list(limit=-1)
    assert total == records.count() == 7 and {record.status for record in kept} == {"queued", "running", "completed"}
    assert records.expire_finished_ids(max_age_s=3600, now=now) == []


def test_list_skips_and_cleans_ids_whose_hash_vanished(records: RedisJobRecords) -> None:
    rng = random.Random(5)
    for i in range(8):
        records.insert(make_record(i, rng, status="completed", owner="bob", submitted_at=1000.0 + i))
    # Hashes gone behind the indexes' back (evicted, deleted by hand): newest-first these are the 2nd and 3rd.
    records._client.delete(records._job_key("job-006"), records._job_key("job-005"))

    page, total = records.list(status="completed", limit=3)
    assert [record.id for record in page] == ["job-007", "job-004", "job-003"]  # the page is refilled
    assert total == 6
    members = index_members(records)
    assert not {"job-005", "job-006"} & (members["jobs:status:completed"] | members["jobs:all"])
    assert {"job-005", "job-006"} <= members["jobs:owner:bob"]  # cleaned when that index is read
    assert [record.id for record in records.list(owner="bob", limit=2, offset=1)[0]] == ["job-004", "job-003"]
    assert records.list(owner="bob")[1] == 6
    assert records.expire_finished(max_age_s=10, now=2000.0) == 6
    assert index_members(records) == {"jobs:owner-status:completed:bob": {"job-005", "job-006"}}
    assert records.list(status="completed", owner="bob") == ([], 0)  # and now that one is clean too
    assert index_members(records) == {}


# --- events --------------------------------------------------------------------------------------------------------


def xread_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def test_events_keep_the_job_event_shape_and_order(events: RedisJobEvents) -> None:
    assert events.publish("job-1", "queued", {"position": 0}, at=123.5) == "1-0"
    assert events.publish("job-1", "started", {"worker": 0}) == "2-0"
    assert events.publish("job-2", "queued", {}) == "1-0"  # seqs are per job
    first, second = events.read("job-1")
    assert first == JobEvent(job_id="job-1", seq=1, kind="queued", data={"position": 0}, at=123.5)
    assert (second.seq, second.kind, second.data) == (2, "started", {"worker": 0})
    assert events.read("job-1", after=stream_id(first)) == [second]
    assert events.read("job-1", after="1") == [second]  # an SSE Last-Event-ID as is
    assert events.read("job-1", after="2-0") == [] and events.read("never-published") == []


def test_a_blocked_reader_gets_events_from_another_thread_promptly_without_polling(events: RedisJobEvents) -> None:
    client = events._client
    before = xread_calls(client)
    started = time.monotonic()
    assert events.read("quiet", block_s=1.0) == []
    assert time.monotonic() - started >= 1.0
    assert xread_calls(client) - before == 1  # one XREAD blocked the whole second

    kinds = ["queued", "started", "progress", "progress", "progress", "completed"]
    received: list[tuple[JobEvent, float]] = []
    calls_before = xread_calls(client)
    reader = threading.Thread(
        target=lambda: received.extend((event, time.perf_counter()) for event in events.follow("job-9", block_s=5))
    )
    reader.start()
    sent_at = []
    for step, kind in enumerate(kinds):
        wait_until(lambda: blocked_clients(client) >= 1, timeout=5, interval=0.002, what="the reader to block")
        sent_at.append(time.perf_counter())
        events.publish("job-9", kind, {"step": step})
        wait_until(lambda step=step: len(received) > step, timeout=5, interval=0.002, what=f"event {step}")
    reader.join(timeout=5)
    assert not reader.is_alive()  # follow ended with the terminal event
    assert [(event.seq, event.kind, event.data["step"]) for event, _ in received] == [
        (seq, kind, seq - 1) for seq, kind in enumerate(kinds, start=1)
    ]
    assert xread_calls(client) - calls_before == len(kinds)  # one blocked XREAD per event: no polling
    latencies = [woke - sent for (_, woke), sent in zip(received, sent_at, strict=True)]
    assert max(latencies) < 0.5
    print(f"\nevent latency (publish -> blocked follow yields): median {statistics.median(latencies) * 1000:.2f} ms")


def blocked_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["blocked_clients"])


def test_follow_replays_a_finished_job_and_stops_on_request(events: RedisJobEvents) -> None:
    for kind in ("queued", "started", "failed"):
        events.publish("done", kind, {})
    events.publish("done", "progress", {})  # after the terminal event: never reached
    assert [event.kind for event in events.follow("done", block_s=0.5)] == ["queued", "started", "failed"]

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert list(events.follow("silent", block_s=0.1, stop=stop)) == []
    assert time.monotonic() - started < 1.0


def test_a_finished_stream_gets_its_ttl_and_streams_stay_short(redis_server: RedisServer) -> None:
    events = RedisJobEvents.connect(
        redis_server.url, prefix=unique_prefix(), ttl_s=60, unfinished_ttl_s=3600, max_events=100
    )
    client = events._client
    for step in range(300):
        events.publish("long", "progress", {"step": step})
    assert 3500_000 < int(client.pttl(events.key("long"))) <= 3600_000  # unfinished: the long safety TTL
    assert 100 <= int(client.xlen(events.key("long"))) < 300  # trimmed (approximately) to the cap
    assert events.publish("long", "completed", {}) == "301-0"  # seqs go on past the trimmed ones
    assert 55_000 < int(client.pttl(events.key("long"))) <= 60_000
    assert events.read("long", after="300")[0].kind == "completed"
    events.close()


# --- Redis trouble -------------------------------------------------------------------------------------------------


def test_an_unreachable_redis_is_queue_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    records = RedisJobRecords.connect(url)
    events = RedisJobEvents.connect(url)
    started = time.monotonic()
    calls = [
        records.ping,
        lambda: records.get("x"),
        lambda: records.list(),
        lambda: records.update("x", status="failed"),
        lambda: events.publish("x", "queued", {}),
        lambda: events.read("x", block_s=1.0),
    ]
    for call in calls:
        with pytest.raises(QueueUnavailable, match=r"Redis \(127\.0\.0\.1:\d+\) is unavailable") as raised:
            call()
        assert raised.value.status_code == 503

    assert time.monotonic() - started < 10
