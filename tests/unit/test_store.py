"""The result store on its own: records, restart marking, retention by age and by size, images being served."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from genserve.store import SCHEMA, JobRecord, ResultStore


def record(job_id: str, submitted_at: float, status: str = "completed", image_bytes: int | None = 100) -> JobRecord:
    return JobRecord(
        id=job_id,
        status=status,
        mode="text2img",
        model_id="flux1-dev",
        priority=0,
        params={"prompt": f"p {job_id}", "images": []},
        submitted_at=submitted_at,
        image_bytes=image_bytes,
    )


def add(store: ResultStore, job_id: str, submitted_at: float, status: str = "completed", size: int = 100) -> Path:
    store.insert(record(job_id, submitted_at, status, size if status == "completed" else None))
    path = store.image_path(job_id)
    if status == "completed":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    return path


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "results")


def test_insert_update_get_and_list_newest_first(store: ResultStore) -> None:
    for index in range(5):
        add(store, f"job{index}", submitted_at=1000 + index, status="completed" if index % 2 else "failed")
    store.update("job1", error_type="x", error_message="boom")
    got = store.get("job1")
    assert got is not None and got.error_message == "boom" and got.params["prompt"] == "p job1"
    records, total = store.list(limit=2)
    assert total == 5 and [r.id for r in records] == ["job4", "job3"]
    records, total = store.list(status="completed", limit=10, offset=1)
    assert total == 2 and [r.id for r in records] == ["job1"]
    assert store.get("missing") is None
    with pytest.raises(ValueError):
        store.update("job1", no_such_column=1)


def test_records_survive_reopening_and_unfinished_jobs_are_marked_failed(tmp_path: Path) -> None:
    first = ResultStore(tmp_path / "r")
    add(first, "done", 1.0)
    add(first, "waiting", 2.0, status="queued")
    add(first, "busy", 3.0, status="running")
    first.close()
    second = ResultStore(tmp_path / "r")
    assert second.fail_interrupted() == 2
    assert second.get("done").status == "completed"  # type: ignore[union-attr]
    for job_id in ("waiting", "busy"):
        marked = second.get(job_id)
        assert marked is not None and marked.status == "failed"
        assert (marked.error_type, marked.error_message) == ("service_restarted", "service restarted")
        assert marked.finished_at is not None


def test_owner_and_request_id_survive_reopening_and_lists_filter_by_owner(tmp_path: Path) -> None:
    first = ResultStore(tmp_path / "results")
    for index, owner in enumerate(["alice", "bob", "alice", None]):
        first.insert(replace(record(f"job{index}", 100.0 + index), owner=owner, request_id=f"req-{index}"))
    first.close()
    reopened = ResultStore(tmp_path / "results")
    got = reopened.get("job2")
    assert got is not None and (got.owner, got.request_id) == ("alice", "req-2")
    alice, total = reopened.list(owner="alice")
    assert [job.id for job in alice] == ["job2", "job0"] and total == 2
    assert reopened.list(status="completed", owner="bob")[1] == 1
    assert reopened.list()[1] == 4  # no owner given: every job (admin keys, or keys off)


def test_a_store_from_before_ownership_gains_the_new_columns(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    old = sqlite3.connect(folder / "jobs.sqlite3")
    old_schema = re.sub(r",\s*owner TEXT,\s*request_id TEXT,\s*webhook TEXT", "", SCHEMA)
    assert "owner" not in old_schema
    old.executescript(old_schema)
    old.execute(
        "INSERT INTO jobs (id, status, mode, model_id, priority, params, submitted_at) "
        "VALUES ('old', 'completed', 'text2img', 'flux1-dev', 0, '{}', 1.0)"
    )
    old.commit()
    old.close()
    store = ResultStore(folder)
    kept = store.get("old")
    assert kept is not None and kept.owner is None and kept.webhook is None
    store.insert(replace(record("new", 2.0), owner="alice", webhook={"url": "http://example.test/hook"}))
    new = store.get("new")
    assert new is not None and new.owner == "alice" and new.webhook == {"url": "http://example.test/hook"}
    assert [job.id for job in store.list(owner="alice")[0]] == ["new"]


def test_cleanup_by_age_keeps_recent_and_unfinished_jobs(store: ResultStore) -> None:
    old = add(store, "old", submitted_at=100.0)
    new = add(store, "new", submitted_at=950.0)
    add(store, "old-running", submitted_at=100.0, status="running")
    report = store.cleanup(max_age_s=500, max_total_bytes=10**9, now=1000.0)
    assert report.deleted_jobs == 1 and report.deleted_bytes == 100
    assert store.get("old") is None and not old.exists()
    assert store.get("new") is not None and new.exists()
    assert store.get("old-running") is not None  # a job still in flight is never retention's to delete


def test_cleanup_by_size_deletes_oldest_images_first(store: ResultStore) -> None:
    paths = [add(store, f"j{index}", submitted_at=float(index), size=400) for index in range(5)]
    report = store.cleanup(max_age_s=10**9, max_total_bytes=1000, now=10.0)
    assert report.deleted_jobs == 3
    assert [path.exists() for path in paths] == [False, False, False, True, True]


def test_an_image_being_served_is_not_deleted_until_released(store: ResultStore) -> None:
    path = add(store, "served", submitted_at=0.0)
    held = store.acquire("served")
    assert held == path
    report = store.cleanup(max_age_s=1, max_total_bytes=0, now=1000.0)
    assert report.deleted_jobs == 0 and report.kept_busy == 1 and path.exists()
    store.release("served")
    assert store.cleanup(max_age_s=1, max_total_bytes=0, now=1000.0).deleted_jobs == 1
    assert not path.exists()


def test_cleanup_walks_many_pages_and_skips_a_served_image_in_the_middle(store: ResultStore) -> None:
    from genserve.store import RETENTION_BATCH

    count = RETENTION_BATCH * 2 + 7
    for index in range(count):
        store.insert(record(f"j{index:05d}", submitted_at=float(index), image_bytes=None))
    served = add(store, "served", submitted_at=float(RETENTION_BATCH))  # sorts inside the second page
    store.acquire("served")
    report = store.cleanup(max_age_s=10, max_total_bytes=10**9, now=10.0 + count)
    assert (report.deleted_jobs, report.kept_busy) == (count, 1)
    assert store.count() == 1 and served.exists()


def test_cleanup_by_size_stops_as_soon_as_the_total_fits_across_pages(store: ResultStore) -> None:
    from genserve.store import RETENTION_BATCH

    count = RETENTION_BATCH + 50
    for index in range(count):
        add(store, f"i{index:05d}", submitted_at=float(index), size=10)
    report = store.cleanup(max_age_s=10**9, max_total_bytes=10 * 20, now=float(count))
    assert report.deleted_jobs == count - 20
    records, total = store.list(limit=100)
    assert total == 20 and {r.id for r in records} == {f"i{index:05d}" for index in range(count - 20, count)}
