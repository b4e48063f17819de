"""The persistence writer: writes land in the store, in order, off the caller's thread, and survive bad batches."""

from __future__ import annotations

import threading
from pathlib import Path

from genserve.persistence import PersistenceWriter
from genserve.store import JobRecord, ResultStore


def record(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id,
        status="queued",
        mode="text2img",
        model_id="flux1-dev",
        priority=0,
        params={},
        submitted_at=1.0,
    )


def test_writes_are_applied_in_order_and_after_commit_sees_them(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    writer = PersistenceWriter(store)
    writer.start()
    store.insert(record("a"))
    seen: list[tuple[str, str | None]] = []
    threads: list[str] = []

    def after() -> None:
        threads.append(threading.current_thread().name)
        got = store.get("a")
        seen.append((got.status, got.error_type) if got else ("missing", None))

    writer.write("a", {"status": "running"})
    writer.write("a", {"status": "failed", "error_type": "boom"}, after_commit=after)
    assert writer.flush(10)
    assert seen == [("failed", "boom")]
    assert threads == ["genserve-persistence"]
    writer.stop()


def test_a_bad_write_costs_only_itself_and_the_writer_goes_on(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    writer = PersistenceWriter(store)
    for job_id in ("b", "c"):
        store.insert(record(job_id))
    # Queued before the thread starts, so all three land in one batch.
    writer.write("b", {"status": "running"})
    writer.write("b", {"no_such_column": 1})
    writer.write("c", {"status": "completed"})
    writer.start()
    assert writer.flush(10)
    got_b, got_c = store.get("b"), store.get("c")
    assert got_b is not None and got_b.status == "running"
    assert got_c is not None and got_c.status == "completed"
    writer.write("b", {"status": "completed"})
    assert writer.flush(10)
    got_b = store.get("b")
    assert got_b is not None and got_b.status == "completed"
    writer.stop()


def test_stop_writes_what_is_queued(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    writer = PersistenceWriter(store)
    writer.start()
    for index in range(1000):
        store.insert(record(f"j{index}"))
        writer.write(f"j{index}", {"status": "canceled"})
    writer.stop()
    _, total = store.list(status="canceled")
    assert total == 1000
