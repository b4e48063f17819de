"""The result store: job records in SQLite, output images and job inputs as files, under one folder (API process).

Images are written by the workers straight to ``image_path(job_id)`` and only ever read back from disk here, so
the API process never keeps them in memory. A job's input pixels are written by the API process into
``input_dir(job_id)`` at submission (the worker reads them from there; nothing big rides a pipe) and removed when
the job ends. Records survive a restart of the API process; jobs that were queued or running when it died are
marked failed ("service restarted") when the store opens — never silently dropped.

Threads and locks: every thread gets its own SQLite connection (WAL mode, so readers never wait for a writer and
a writer waits for another only inside SQLite, with a busy timeout). There is no Python lock around SQLite at all:
state changes come from one writer thread (``genserve.persistence``), reads from the HTTP thread pool, retention
from its own thread in short batches. The only lock here guards the in-memory count of images being served, which
retention skips.

The files are ``FileStore``'s and the records ``ResultStore``'s, so that a cluster node
(``genserve.cluster.store.ClusterStore``) keeps the same files and serving rules with its records in Redis.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from genserve.images import RawImage
from genserve.messages import ImageFile

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
    cancel_reason TEXT,
    owner TEXT,
    request_id TEXT,
    webhook TEXT,
    node TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (submitted_at DESC);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, submitted_at DESC);
"""
# Columns added after the first release: a store written by an older GenServe gains them when it opens (NULL in
# old rows: jobs from before keys were owned are visible to admin keys only once keys exist).
ADDED_COLUMNS = {"owner": "TEXT", "request_id": "TEXT", "webhook": "TEXT", "node": "TEXT"}
OWNER_INDEX = "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, submitted_at DESC)"
JSON_COLUMNS = frozenset({"params", "webhook"})


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
    owner: str | None = None  # name of the API key that submitted it (None when keys are off)
    request_id: str | None = None  # X-Request-ID of the submitting request
    webhook: dict[str, Any] | None = None  # url, events, and each delivery's outcome (genserve.webhooks)
    node: str | None = None  # the cluster node that ran it (cluster.backend redis); None on one machine


_COLUMNS = [f.name for f in fields(JobRecord)]


@dataclass
class _Tally:
    deleted_jobs: int = 0
    deleted_bytes: int = 0
    kept_busy: set[str] = field(default_factory=set)  # ids skipped because they were being served


@dataclass(frozen=True)
class CleanupReport:
    deleted_jobs: int
    deleted_bytes: int
    kept_busy: int  # images skipped because they were being served


RETENTION_BATCH = 500  # rows deleted per retention transaction: the writer thread never waits long for SQLite
RETENTION_PAUSE_S = 0.01  # between two retention pages: lets the other threads have the GIL and SQLite's lock
_FINISHED = "status NOT IN ('queued', 'running')"
BUSY_TIMEOUT_MS = 30_000  # how long a connection waits for another's write transaction before it errors


class FileStore:
    """The file half of a store: output images, job inputs, and which images are being served right now.

    ``ResultStore`` adds the SQLite records; a cluster node's ``genserve.cluster.store.ClusterStore`` adds records
    in Redis. ``inputs_root`` replaces ``root / "inputs"``: in a cluster ``root`` may be a folder every node shares,
    and ``remove_all_inputs`` at a node's start must not delete the inputs of jobs other nodes are running."""

    def __init__(self, root: Path, inputs_root: Path | None = None) -> None:
        self.root = root
        self.images = root / "images"
        self.inputs = inputs_root if inputs_root is not None else root / "inputs"
        self.images.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(parents=True, exist_ok=True)
        self._serving: Counter[str] = Counter()
        self._serving_lock = threading.Lock()

    # --- paths ---------------------------------------------------------------------------------------------------

    def image_path(self, job_id: str) -> Path:
        # Two-character fan-out keeps folders small on a busy server.
        return self.images / job_id[:2] / f"{job_id}.png"

    def input_dir(self, job_id: str) -> Path:
        return self.inputs / job_id

    # --- job inputs ----------------------------------------------------------------------------------------------

    def write_inputs(self, job_id: str, images: Mapping[str, RawImage]) -> dict[str, ImageFile]:
        """Write a job's decoded input pixels for its worker; returns the file reference per field."""
        if not images:
            return {}
        folder = self.input_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, ImageFile] = {}
        for name, raw in images.items():
            path = folder / f"{name}.raw"
            path.write_bytes(raw.data)
            files[name] = ImageFile(path=str(path), width=raw.width, height=raw.height, mode=raw.mode)
        return files

    def remove_inputs(self, job_id: str) -> None:
        shutil.rmtree(self.input_dir(job_id), ignore_errors=True)

    def remove_all_inputs(self) -> None:
        """At start: inputs of jobs a previous process never finished (they are marked failed)."""
        shutil.rmtree(self.inputs, ignore_errors=True)
        self.inputs.mkdir(parents=True, exist_ok=True)

    # --- serving -------------------------------------------------------------------------------------------------

    def acquire(self, job_id: str) -> Path:
        """Hold an image while it is sent (retention leaves it alone); pair with release()."""
        with self._serving_lock:
            self._serving[job_id] += 1
        return self.image_path(job_id)

    def release(self, job_id: str) -> None:
        with self._serving_lock:
            self._serving[job_id] -= 1
            if self._serving[job_id] <= 0:
                del self._serving[job_id]

    def _is_served(self, job_id: str) -> bool:
        with self._serving_lock:
            return job_id in self._serving

    def _remove_stale_temporaries(self, now: float) -> None:
        for temporary in self.images.glob("*/.*.tmp"):
            try:
                if now - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                    temporary.unlink()
            except OSError:
                pass


class JobStore(Protocol):
    """What the job manager, the routes and retention use of a store: ``ResultStore`` on one machine,
    ``genserve.cluster.store.ClusterStore`` on a cluster node (records in Redis)."""

    def image_path(self, job_id: str) -> Path: ...

    def write_inputs(self, job_id: str, images: Mapping[str, RawImage]) -> dict[str, ImageFile]: ...

    def remove_inputs(self, job_id: str) -> None: ...

    def insert(self, record: JobRecord) -> None: ...

    def apply(self, updates: Sequence[tuple[str, Mapping[str, Any]]]) -> None: ...

    def delete(self, job_id: str) -> None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def list(
        self, status: str | None = None, limit: int = 50, offset: int = 0, owner: str | None = None
    ) -> tuple[list[JobRecord], int]: ...

    def acquire(self, job_id: str) -> Path: ...

    def release(self, job_id: str) -> None: ...

    def cleanup(self, max_age_s: float, max_total_bytes: int, now: float | None = None) -> CleanupReport: ...

    def close(self) -> None: ...


class ResultStore(FileStore):
    """Job records in SQLite (see the module docstring) on top of the files of ``FileStore``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._path = root / "jobs.sqlite3"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()  # guards the list above (closing at shutdown)
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        conn.executescript(SCHEMA)
        _add_missing_columns(conn)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last commits, not corrupt
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock upgrading a read later
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # --- records -------------------------------------------------------------------------------------------------

    def insert(self, record: JobRecord) -> None:
        values = [_column_value(name, getattr(record, name)) for name in _COLUMNS]
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._conn().execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)

    def update(self, job_id: str, **changes: Any) -> None:
        self.apply([(job_id, changes)])

    def apply(self, updates: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """Several record updates in one transaction (the persistence writer's batch)."""
        with self._transaction() as conn:
            for job_id, changes in updates:
                unknown = set(changes) - set(_COLUMNS)
                if unknown:
                    raise ValueError(f"unknown job columns {sorted(unknown)}")
                assignments = ", ".join(f"{name} = ?" for name in changes)
                values = [_column_value(name, value) for name, value in changes.items()]
                conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job_id])

    def delete(self, job_id: str) -> None:
        self._conn().execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list(
        self, status: str | None = None, limit: int = 50, offset: int = 0, owner: str | None = None
    ) -> tuple[list[JobRecord], int]:
        """Newest first; also the total count matching ``status``. With ``owner``, only the jobs that key owns."""
        conditions, args = [], []
        if status:
            conditions.append("status = ?")
            args.append(status)
        if owner is not None:
            conditions.append("owner = ?")
            args.append(owner)
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        conn = self._conn()
        total = conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
        rows = conn.execute(
            f"SELECT * FROM jobs {where} ORDER BY submitted_at DESC, id LIMIT ? OFFSET ?", [*args, limit, offset]
        ).fetchall()
        return [_record(row) for row in rows], int(total)

    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def fail_interrupted(self, reason: str = "service restarted") -> int:
        """Jobs left queued or running by a previous process: they will never finish, so say so."""
        cursor = self._conn().execute(
            "UPDATE jobs SET status = 'failed', error_type = 'service_restarted', error_message = ?, "
            "finished_at = ? WHERE status IN ('queued', 'running')",
            (reason, time.time()),
        )
        return cursor.rowcount

    # --- retention -----------------------------------------------------------------------------------------------

    def cleanup(self, max_age_s: float, max_total_bytes: int, now: float | None = None) -> CleanupReport:
        """Delete finished jobs older than max_age_s, then the oldest images while the total is over the cap.

        Runs in a thread of its own and holds nothing anyone else waits for. It never reads the whole table: it
        walks the finished jobs oldest first in pages of RETENTION_BATCH rows (keyset pagination on the time
        index), deletes each page in its own short transaction, and pauses between pages — so the persistence
        writer gets SQLite's write lock between batches, HTTP readers (WAL) never wait, and the event loop gets
        the GIL back (a long run of SQLite calls would otherwise starve it)."""
        now = time.time() if now is None else now
        report = _Tally()
        self._delete_pages(report, "submitted_at < ?", (now - max_age_s,), stop_below_bytes=None)
        total = self._conn().execute(f"SELECT COALESCE(SUM(image_bytes), 0) FROM jobs WHERE {_FINISHED}").fetchone()
        if total[0] > max_total_bytes:
            self._delete_pages(report, "image_bytes > 0", (), stop_below_bytes=(int(total[0]), max_total_bytes))
        self._remove_stale_temporaries(now)
        if report.deleted_jobs:
            log.info("retention deleted %d job(s), %d bytes of images", report.deleted_jobs, report.deleted_bytes)
        return CleanupReport(report.deleted_jobs, report.deleted_bytes, len(report.kept_busy))

    def _delete_pages(
        self, report: _Tally, condition: str, args: tuple[Any, ...], stop_below_bytes: tuple[int, int] | None
    ) -> None:
        """Delete finished jobs matching ``condition``, oldest first, page by page. With ``stop_below_bytes``
        (total, cap), only until the images left add up to no more than the cap."""
        total, cap = stop_below_bytes or (0, 0)
        after: tuple[float, str] = (float("-inf"), "")
        while True:
            rows = (
                self._conn()
                .execute(
                    f"SELECT id, submitted_at, image_bytes FROM jobs WHERE {_FINISHED} AND {condition} "
                    "AND (submitted_at, id) > (?, ?) ORDER BY submitted_at, id LIMIT ?",
                    (*args, *after, RETENTION_BATCH),
                )
                .fetchall()
            )
            if not rows:
                return
            after = (rows[-1]["submitted_at"], rows[-1]["id"])
            doomed: list[tuple[str, int]] = []
            for row in rows:
                if stop_below_bytes is not None and total <= cap:
                    break
                if self._is_served(row["id"]):
                    report.kept_busy.add(row["id"])
                    continue
                size = row["image_bytes"] or 0
                doomed.append((row["id"], size))
                total -= size
            self._delete(doomed, report)
            if stop_below_bytes is not None and total <= cap:
                return
            time.sleep(RETENTION_PAUSE_S)

    def _delete(self, doomed: Sequence[tuple[str, int]], report: _Tally) -> None:
        if not doomed:
            return
        with self._transaction() as conn:
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id, _ in doomed])
        for job_id, size in doomed:
            if size:
                self.image_path(job_id).unlink(missing_ok=True)
            report.deleted_jobs += 1
            report.deleted_bytes += size


STALE_TEMPORARY_S = 3600.0  # a worker killed mid-write leaves ".<id>.png.<pid>.tmp" behind


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    present = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
    for name, kind in ADDED_COLUMNS.items():
        if name not in present:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
    conn.execute(OWNER_INDEX)


def _column_value(name: str, value: Any) -> Any:
    """A field as SQLite stores it: the JSON columns as text."""
    if name in JSON_COLUMNS and value is not None:
        return json.dumps(value)
    return value


def _record(row: sqlite3.Row) -> JobRecord:
    values = {name: row[name] for name in _COLUMNS}
    for name in JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return JobRecord(**values)
