"""ClusterStore and RedisImages against a real redis-server: records answer as the SQLite store does, images come
from Redis into a node's cache, retention deletes old records with their images, inputs stay with their node."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from genserve.cluster.redis_records import QueueUnavailable, RedisJobRecords
from genserve.cluster.store import ClusterStore, RedisImages
from genserve.images import RawImage
from genserve.store import JobRecord, ResultStore
from tests.redis_server import RedisServer, redis_server
from tests.server import free_port

__all__ = ["redis_server"]  # the fixture, imported for pytest

TTL_S = 600.0
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # bytes of every value: nothing may be decoded on the way


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


def make_store(server: RedisServer, root: Path, inputs_root: Path, prefix: str, redis_images: bool) -> ClusterStore:
    records = RedisJobRecords.connect(server.url, prefix=prefix)
    images = RedisImages.connect(server.url, prefix=prefix, ttl_s=TTL_S) if redis_images else None
    return ClusterStore(root, records, images, inputs_root)


@pytest.fixture
def store(redis_server: RedisServer, tmp_path: Path) -> Iterator[ClusterStore]:
    """A node with its images in Redis."""
    node = make_store(redis_server, tmp_path / "results", tmp_path / "inputs-a", unique_prefix(), redis_images=True)
    yield node
    node.close()


@pytest.fixture
def shared_store(redis_server: RedisServer, tmp_path: Path) -> Iterator[ClusterStore]:
    """A node with its images in a shared folder."""
    node = make_store(redis_server, tmp_path / "shared", tmp_path / "inputs-a", unique_prefix(), redis_images=False)
    yield node
    node.close()


def redis_images(store: ClusterStore) -> RedisImages:
    assert store.redis_images is not None
    return store.redis_images


def record(job_id: str, submitted_at: float, status: str = "completed", owner: str | None = None) -> JobRecord:
    return JobRecord(
        id=job_id,
        status=status,
        mode="text2img",
        model_id="flux1-dev",
        priority=0,
        params={"prompt": f"p {job_id}", "images": []},
        submitted_at=submitted_at,
        finished_at=None if status in ("queued", "running") else submitted_at + 2.0,
        image_bytes=len(PNG) if status == "completed" else None,
        owner=owner,
    )


def add(store: ClusterStore, job_id: str, submitted_at: float, status: str = "completed") -> Path:
    """A job as a worker node leaves it: its record and, when it completed, its image file (written at
    ``submitted_at + 2``) stored in Redis too when the images live there."""
    store.insert(record(job_id, submitted_at, status))
    path = store.image_path(job_id)
    if status == "completed":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG)
        os.utime(path, (submitted_at + 2.0, submitted_at + 2.0))
        store.store_image(job_id)
    return path


# --- records -------------------------------------------------------------------------------------------------------


def test_records_round_trip_as_in_the_sqlite_store(store: ClusterStore, tmp_path: Path) -> None:
    reference = ResultStore(tmp_path / "reference")
    try:
        for target in (store, reference):
            for index, (status, owner) in enumerate(
                [("completed", "alice"), ("failed", "bob"), ("queued", "alice"), ("running", None), ("completed", None)]
            ):
                target.insert(replace(record(f"job{index}", 1000.0 + index, status), owner=owner, request_id="r"))
            target.update("job1", error_type="boom", error_message="it broke")
            target.apply([("job2", {"status": "running", "started_at": 1010.5}), ("job3", {"status": "canceled"})])
            target.delete("job4")
        assert store.count() == reference.count() == 4
        assert store.get("job1") == reference.get("job1") and store.get("missing") is None
        for query in [{}, {"status": "running"}, {"owner": "alice"}, {"status": "failed", "owner": "bob"}]:
            assert store.list(**query) == reference.list(**query), query  # type: ignore[arg-type]
        assert store.list(limit=2, offset=1) == reference.list(limit=2, offset=1)
        with pytest.raises(ValueError):
            store.update("job1", no_such_column=1)
    finally:
        reference.close()


def test_fail_interrupted_leaves_queued_and_running_jobs_to_the_cluster(store: ClusterStore) -> None:
    add(store, "waiting", 1.0, status="queued")
    add(store, "busy", 2.0, status="running")
    assert store.fail_interrupted() == 0
    assert [(job.id, job.status, job.error_type) for job in store.list()[0]] == [
        ("busy", "running", None),
        ("waiting", "queued", None),
    ]


# --- images --------------------------------------------------------------------------------------------------------


def test_a_stored_image_gets_the_ttl_and_comes_back_byte_for_byte(store: ClusterStore) -> None:
    images = redis_images(store)
    add(store, "done", time.time())
    assert images.exists("done") and images.get("done") == PNG
    ttl = images._client.ttl(images.key("done"))
    assert 0 < ttl <= TTL_S
    assert images.key("done") == images.prefix + "image:done"
    images.delete("done")
    assert not images.exists("done") and images.get("done") is None


def test_acquire_fetches_an_image_only_redis_has_into_the_cache(store: ClusterStore) -> None:
    redis_images(store).put("remote", PNG)  # stored by another node's worker
    path = store.image_path("remote")
    assert not path.exists()

    assert store.acquire("remote") == path
    assert path.read_bytes() == PNG and store._is_served("remote")
    assert list(path.parent.glob(".*")) == []  # no temporary left behind
    store.release("remote")

    redis_images(store).delete("remote")
    assert store.acquire("remote") == path and path.read_bytes() == PNG  # from the cache: Redis is not asked
    store.release("remote")
    assert not store._is_served("remote")


def test_acquire_of_an_unknown_image_returns_a_missing_path(store: ClusterStore, shared_store: ClusterStore) -> None:
    for node in (store, shared_store):
        path = node.acquire("nobody")
        assert path == node.image_path("nobody") and not path.exists()
        node.release("nobody")
        assert not node._is_served("nobody")


def test_acquire_with_redis_down_is_unavailable_and_holds_nothing(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    records = RedisJobRecords.connect(url, socket_timeout_s=0.5)
    node = ClusterStore(tmp_path / "r", records, RedisImages.connect(url, socket_timeout_s=0.5, ttl_s=60), tmp_path)
    try:
        with pytest.raises(QueueUnavailable, match="result images'"):
            node.acquire("job")
        assert not node._is_served("job")  # the caller got no path to release
    finally:
        node.close()


def test_with_a_shared_folder_images_stay_files(shared_store: ClusterStore, redis_server: RedisServer) -> None:
    path = add(shared_store, "done", time.time())  # store_image has nothing to do
    assert shared_store.redis_images is None
    assert shared_store.acquire("done") == path and path.read_bytes() == PNG
    shared_store.release("done")
    client = shared_store.records._client
    assert list(client.scan_iter(match=shared_store.records.prefix + "image:*")) == []


# --- retention -----------------------------------------------------------------------------------------------------


def test_cleanup_deletes_old_finished_jobs_with_their_images(store: ClusterStore) -> None:
    now = time.time()
    old, old_served, recent = (
        add(store, "old", now - 7200),
        add(store, "old-served", now - 7200),
        add(store, "new", now),
    )
    add(store, "old-failed", now - 7200, status="failed")
    add(store, "old-queued", now - 7200, status="queued")
    add(store, "old-running", now - 7200, status="running")
    store.acquire("old-served")

    report = store.cleanup(max_age_s=3600, max_total_bytes=0, now=now)  # no size cap in a cluster

    assert (report.deleted_jobs, report.deleted_bytes, report.kept_busy) == (3, 2 * len(PNG), 1)
    assert {job.id for job in store.list()[0]} == {"new", "old-queued", "old-running"}
    assert not old.exists() and not redis_images(store).exists("old")
    assert old_served.read_bytes() == PNG  # being sent: the file stays while it is
    assert recent.exists() and redis_images(store).exists("new")

    store.release("old-served")
    again = store.cleanup(max_age_s=3600, max_total_bytes=0, now=now)
    assert (again.deleted_jobs, again.kept_busy) == (0, 0) and not old_served.exists()  # by its age, now


def test_cleanup_sweeps_old_cache_files_and_stale_temporaries(store: ClusterStore) -> None:
    now = time.time()
    stray = store.image_path("fetched-long-ago")  # a cached image whose record another node's retention deleted
    stray.parent.mkdir(parents=True)
    stray.write_bytes(PNG)
    os.utime(stray, (now - 7200, now - 7200))
    fresh = store.image_path("fetched-now")
    fresh.parent.mkdir(parents=True, exist_ok=True)
    fresh.write_bytes(PNG)
    stale = stray.with_name(f".{stray.name}.123.tmp")  # a write that died
    stale.write_bytes(b"half")
    os.utime(stale, (now - 7200, now - 7200))
    writing = fresh.with_name(f".{fresh.name}.456.tmp")  # a write in progress
    writing.write_bytes(b"half")

    report = store.cleanup(max_age_s=3600, max_total_bytes=0, now=now)
    assert report.deleted_jobs == 0
    assert not stray.exists() and fresh.exists() and not stale.exists() and writing.exists()


def test_cleanup_in_a_shared_folder_deletes_the_files_of_expired_jobs(shared_store: ClusterStore) -> None:
    now = time.time()
    old, recent = add(shared_store, "old", now - 7200), add(shared_store, "new", now)
    os.utime(old, (now, now))  # written recently (a slow job): deleted because its record expired, not by age
    report = shared_store.cleanup(max_age_s=3600, max_total_bytes=0, now=now)
    assert (report.deleted_jobs, report.deleted_bytes) == (1, len(PNG))
    assert not old.exists() and recent.exists() and shared_store.get("old") is None


# --- inputs --------------------------------------------------------------------------------------------------------


def test_remove_all_inputs_only_touches_this_nodes_inputs(redis_server: RedisServer, tmp_path: Path) -> None:
    prefix, shared = unique_prefix(), tmp_path / "shared"
    first = make_store(redis_server, shared, tmp_path / "node-a", prefix, redis_images=False)
    second = make_store(redis_server, shared, tmp_path / "node-b", prefix, redis_images=False)
    try:
        mask = {"mask": RawImage(width=2, height=2, mode="L", data=b"\x00\xff\xff\x00")}
        mine = first.write_inputs("job-a", mask)
        theirs = second.write_inputs("job-b", mask)
        assert Path(mine["mask"].path).parent == tmp_path / "node-a" / "job-a"

        second.remove_all_inputs()  # node b restarts

        assert Path(mine["mask"].path).read_bytes() == b"\x00\xff\xff\x00"
        assert not Path(theirs["mask"].path).exists() and (tmp_path / "node-b").is_dir()
        assert not (shared / "inputs").exists()  # nothing of a node's own in the shared folder
        first.remove_inputs("job-a")
        assert not (tmp_path / "node-a" / "job-a").exists()
    finally:
        first.close()
        second.close()
