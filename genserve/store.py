"""The result store: job records in SQLite and output images as files, under one folder (API process).

Images are written by the workers straight to ``image_path(job_id)`` and only ever read back from disk here, so
the API process never keeps them in memory. Records survive a restart of the API process; jobs that were queued
or running when it died are marked failed ("service restarted") when the store opens — never silently dropped.

Thread-safety: one SQLite connection in autocommit mode, guarded by a lock; the monitor thread writes state
changes, route handlers read through the thread pool. Retention skips images that are being served right now.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    mode TEXT NOT NULL,
    model_id TEXT NOT NULL,
    priority INTEGER NOT NULL,
    params TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker_slot INTEGER,
    device TEXT,
    seed INTEGER,
    width INTEGER,
    height INTEGER,
    image_bytes INTEGER,
    error_type TEXT,
    error_message TEXT,
    cancel_reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (submitted_at DESC);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, submitted_at DESC);
"""


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: parameters (no image bytes), lifecycle times, owner worker, result or error."""

    id: str
    status: str  # queued | running | completed | failed | canceled
    mode: str
    model_id: str
    priority: int
    params: dict[str, Any]
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker_slot: int | None = None
    device: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    image_bytes: int | None = None  # set when an image was stored
    error_type: str | None = None
    error_message: str | None = None
    cancel_reason: str | None = None


_COLUMNS = [f.name for f in fields(JobRecord)]


@dataclass(frozen=True)
class CleanupReport:
    deleted_jobs: int
    deleted_bytes: int
    kept_busy: int  # images skipped because they were being served


class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._serving: Counter[str] = Counter()
        self._conn = sqlite3.connect(root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            self._conn.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last commits, not corrupt
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- paths ---------------------------------------------------------------------------------------------------

    def image_path(self, job_id: str) -> Path:
        # Two-character fan-out keeps folders small on a busy server.
        return self.images / job_id[:2] / f"{job_id}.png"

    # --- records -------------------------------------------------------------------------------------------------

    def insert(self, record: JobRecord) -> None:
        values = [json.dumps(record.params) if name == "params" else getattr(record, name) for name in _COLUMNS]
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self._lock:
            self._conn.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)

    def update(self, job_id: str, **changes: Any) -> None:
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._lock:
            self._conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*changes.values(), job_id])

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobRecord], int]:
        """Newest first; also the total count matching ``status``."""
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        with self._lock:
            total = self._conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = self._conn.execute(
                f"SELECT * FROM jobs {where} ORDER BY submitted_at DESC, id LIMIT ? OFFSET ?", [*args, limit, offset]
            ).fetchall()
        return [_record(row) for row in rows], int(total)

    def fail_interrupted(self, reason: str = "service restarted") -> int:
        """Jobs left queued or running by a previous process: they will never finish, so say so."""
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE jobs SET status = 'failed', error_type = 'service_restarted', error_message = ?, "
                "finished_at = ? WHERE status IN ('queued', 'running')",
                (reason, time.time()),
            )
        return cursor.rowcount

    # --- serving and retention -----------------------------------------------------------------------------------

    def acquire(self, job_id: str) -> Path:
        """Hold an image while it is sent (retention leaves it alone); pair with release()."""
        with self._lock:
            self._serving[job_id] += 1
        return self.image_path(job_id)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._serving[job_id] -= 1
            if self._serving[job_id] <= 0:
                del self._serving[job_id]

    def cleanup(self, max_age_s: float, max_total_bytes: int, now: float | None = None) -> CleanupReport:
        """Delete finished jobs older than max_age_s, then the oldest images while the total is over the cap."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, submitted_at, image_bytes FROM jobs "
                "WHERE status NOT IN ('queued', 'running') ORDER BY submitted_at ASC"
            ).fetchall()
            total = sum(row["image_bytes"] or 0 for row in rows)
            doomed: list[tuple[str, int]] = []
            kept_busy = 0
            for row in rows:
                too_old = now - row["submitted_at"] > max_age_s
                too_big = total > max_total_bytes and (row["image_bytes"] or 0) > 0
                if not (too_old or too_big):
                    continue
                if row["id"] in self._serving:
                    kept_busy += 1
                    continue
                doomed.append((row["id"], row["image_bytes"] or 0))
                total -= row["image_bytes"] or 0
            self._conn.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id, _ in doomed])
        deleted_bytes = 0
        for job_id, size in doomed:
            self.image_path(job_id).unlink(missing_ok=True)
            deleted_bytes += size
        self._remove_stale_temporaries(now)
        if doomed:
            log.info("retention deleted %d job(s), %d bytes of images", len(doomed), deleted_bytes)
        return CleanupReport(deleted_jobs=len(doomed), deleted_bytes=deleted_bytes, kept_busy=kept_busy)

    def _remove_stale_temporaries(self, now: float) -> None:
        for temporary in self.images.glob("*/.*.tmp"):
            try:
                if now - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                    temporary.unlink()
            except OSError:
                pass


STALE_TEMPORARY_S = 3600.0  # a worker killed mid-write leaves ".<id>.png.<pid>.tmp" behind


def _record(row: sqlite3.Row) -> JobRecord:
    values = {name: row[name] for name in _COLUMNS}
    values["params"] = json.loads(values["params"])
    return JobRecord(**values)
