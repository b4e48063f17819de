"""The persistence writer: one thread that keeps job records in step with job events (API process).

Job events are emitted by whichever thread moves a job (usually the supervisor's monitor) while that thread holds
the job's lock and often the supervisor's. So the listener here does no I/O: it puts a small operation on a queue
and returns. The ``genserve-persistence`` thread takes operations off the queue in batches and writes each batch in
one SQLite transaction; work that must follow the write (forgetting a finished job in memory, deleting its input
files) runs after the commit, so a reader never sees a finished job fall back to an older stored state.

A batch that fails is written again one update at a time, so a bad update loses only itself (logged; the job's
in-memory state stays right); the thread never dies of it. ``flush()`` waits until everything queued so far is
written (shutdown, tests).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from genserve.store import JobStore

log = logging.getLogger(__name__)

MAX_BATCH = 256  # operations per transaction: bounds how long one commit holds SQLite's write lock


@dataclass(frozen=True)
class _Write:
    job_id: str
    columns: Mapping[str, Any]
    after_commit: Callable[[], None] | None = None  # runs in the writer thread once the write is durable


@dataclass(frozen=True)
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class PersistenceWriter:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[_Write | _Flush | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="genserve-persistence", daemon=True)
        self._started = False
        self._stopped = False

    def start(self) -> None:
        self._thread.start()
        self._started = True

    def write(self, job_id: str, columns: Mapping[str, Any], after_commit: Callable[[], None] | None = None) -> None:
        """Queue an update of job_id's record; never blocks, never touches the disk in the caller's thread."""
        self._queue.put(_Write(job_id, dict(columns), after_commit))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write queued before this call is committed; False on timeout."""
        if not self._started or self._stopped:
            return True
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread."""
        if not self._started or self._stopped:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._stopped = True

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            self._write_batch([item for item in batch if isinstance(item, _Write)])
            for item in batch:
                if isinstance(item, _Flush):
                    item.done.set()
            if stop:
                return

    def _write_batch(self, writes: list[_Write]) -> None:
        if not writes:
            return
        try:
            self.store.apply([(write.job_id, write.columns) for write in writes])
        except Exception:
            # One bad update must not cost the others: write them one by one, and log only what still fails.
            log.warning("a batch of %d job record update(s) failed; writing them one by one", len(writes))
            for write in writes:
                try:
                    self.store.apply([(write.job_id, write.columns)])
                except Exception:
                    log.exception("writing job %s's record failed; it may be stale", write.job_id)
        for write in writes:
            if write.after_commit is None:
                continue
            try:
                write.after_commit()
            except Exception:
                log.exception("after-commit step for job %s failed", write.job_id)
