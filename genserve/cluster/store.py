"""The result store of a cluster node: what ``genserve.store.ResultStore`` is on one machine, spread over Redis and
folders so that any node can answer for any job.

Where things live, and why:

- Job records (and events, ``redis_records``) are in Redis: a client may ask any API node about a job that a
  worker node on another machine ran, and SQLite cannot be shared between machines.
- Finished images are in ``results.dir`` when ``results.backend`` is ``local`` — a folder every node mounts at the
  same path, so the file a worker node writes is the file any API node serves — or in Redis when it is ``redis``
  (``RedisImages``: no shared filesystem needed). Then each node keeps the images it served or produced in its own
  ``results.dir`` as a cache: a FileResponse wants a file, and an image asked for twice is fetched once.
- Job inputs stay on the node that received them, in a folder of the node's own (``inputs_root``): they are read
  by that node's workers only, and ``remove_all_inputs`` at a node's start must not delete another node's inputs
  from a shared ``results.dir``.

What ``ResultStore`` does and this does not: ``fail_interrupted`` (a job whose node died is found by its expired
lease, ``RedisJobQueue.reap_expired``, not by the next start of some node) and the ``results.max_total_gb`` cap
(see ``ClusterStore.cleanup``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import redis
from redis.retry import Retry

from genserve.cluster.redis_queue import QueueUnavailable, client_options, redis_errors, redis_where, retry_backoff
from genserve.cluster.redis_records import ExpiredRecords, RedisJobRecords
from genserve.store import CleanupReport, FileStore, JobRecord

__all__ = ["ClusterStore", "QueueUnavailable", "RedisImages"]

log = logging.getLogger(__name__)


class RedisImages:
    """Finished images in Redis (``results.backend: redis``): one string key per job, ``<prefix>image:<id>``,
    holding the PNG bytes. Each expires ``ttl_s`` after it was stored (results.max_age_hours), so Redis lets go of
    an image even when no node's retention ever names it. Thread-safe; every method may raise QueueUnavailable."""

    def __init__(self, client: redis.Redis, *, prefix: str = "genserve:", ttl_s: float) -> None:
        """``client`` must not decode responses (the values are PNG bytes)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, not {ttl_s}")
        self._client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._where = redis_where(client)

    @classmethod
    def connect(
        cls, url: str, *, socket_timeout_s: float = 5.0, prefix: str = "genserve:", ttl_s: float
    ) -> RedisImages:
        client = redis.Redis.from_url(url, retry=Retry(retry_backoff(), retries=2), **client_options(socket_timeout_s))
        return cls(client, prefix=prefix, ttl_s=ttl_s)

    def key(self, job_id: str) -> str:
        return f"{self.prefix}image:{job_id}"

    def put(self, job_id: str, data: bytes) -> None:
        with self._errors():
            self._client.set(self.key(job_id), data, px=max(1, round(self.ttl_s * 1000)))

    def get(self, job_id: str) -> bytes | None:
        with self._errors():
            return cast(bytes | None, self._client.get(self.key(job_id)))

    def delete(self, job_id: str) -> None:
        self.delete_many([job_id])

    def delete_many(self, job_ids: Iterable[str]) -> None:
        """One round trip for a page of retention's deletions (one DEL per key: no multi-key command, so a
        hash-tagless prefix works on a Redis Cluster too)."""
        pipeline = self._client.pipeline(transaction=False)
        for job_id in job_ids:
            pipeline.delete(self.key(job_id))
        with self._errors():
            pipeline.execute()

    def exists(self, job_id: str) -> bool:
        with self._errors():
            return bool(self._client.exists(self.key(job_id)))

    def close(self) -> None:
        self._client.close()

    def _errors(self) -> AbstractContextManager[None]:
        return redis_errors("result images'", self._where)


class ClusterStore(FileStore):
    """A node's result store (see the module docstring): records in Redis through ``records``, images in
    ``root / "images"`` (a shared folder, or this node's cache of ``images``), inputs under ``inputs_root``.
    The record methods take and answer what ``ResultStore``'s do; they may raise QueueUnavailable."""

    def __init__(self, root: Path, records: RedisJobRecords, images: RedisImages | None, inputs_root: Path) -> None:
        """``images``: None when the images live in ``root`` itself (results.backend local, a shared folder)."""
        super().__init__(root, inputs_root)
        self.records = records
        self.redis_images = images

    def close(self) -> None:
        self.records.close()
        if self.redis_images is not None:
            self.redis_images.close()

    # --- records -------------------------------------------------------------------------------------------------

    def insert(self, record: JobRecord) -> None:
        self.records.insert(record)

    def update(self, job_id: str, **changes: Any) -> None:
        self.records.update(job_id, **changes)

    def apply(self, updates: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        self.records.apply(updates)

    def delete(self, job_id: str) -> None:
        self.records.delete(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        return self.records.get(job_id)

    def list(
        self, status: str | None = None, limit: int = 50, offset: int = 0, owner: str | None = None
    ) -> tuple[list[JobRecord], int]:
        return self.records.list(status, limit, offset, owner)

    def count(self) -> int:
        return self.records.count()

    def fail_interrupted(self, reason: str = "service restarted") -> int:
        """Nothing to do, so 0: a queued job belongs to the cluster, not to the node that starts, and a running one
        whose node died is re-queued or failed when its lease expires (``RedisJobQueue.reap_expired``)."""
        return 0

    # --- images --------------------------------------------------------------------------------------------------

    def acquire(self, job_id: str) -> Path:
        """Hold an image while it is sent; pair with release(). With images in Redis, an image this node does not
        have yet is fetched into its cache first (network I/O: call it from a thread, not the event loop). The path
        is returned whether or not the image exists: the caller answers 404 for a missing file, as on one machine."""
        super().acquire(job_id)
        try:
            return self.local_image(job_id)
        except BaseException:
            self.release(job_id)  # the caller gets no path, so it will not release it
            raise

    def local_image(self, job_id: str) -> Path:
        """Where this node reads the job's image: with images in Redis, fetched into the cache when it is not
        there yet (network I/O). The path is returned whether or not the image exists."""
        path = self.image_path(job_id)
        if self.redis_images is None or path.is_file():
            return path
        data = self.redis_images.get(job_id)
        if data is not None:
            _write_atomically(path, data)
        return path

    def store_image(self, job_id: str) -> None:
        """After a job completed on this node: copy its image from ``image_path`` to Redis, where every node finds
        it (the file stays as this node's cache). Nothing to do when the images live in a shared folder."""
        if self.redis_images is not None:
            self.redis_images.put(job_id, self.image_path(job_id).read_bytes())

    # --- retention -----------------------------------------------------------------------------------------------

    def cleanup(self, max_age_s: float, max_total_bytes: int, now: float | None = None) -> CleanupReport:
        """Delete finished jobs submitted more than max_age_s ago with their images, then the image files older
        than max_age_s that no record named, and stale temporaries. Every node runs it; each expired record is
        deleted (and reported) by exactly one of them.

        ``max_total_bytes`` is not enforced (kept for ResultStore's signature): images in Redis are bounded by
        Redis's maxmemory and their TTL, a shared folder by age — a size cap would need a cluster-wide sum of every
        image, kept exactly across nodes, for a limit the age already gives.

        An image this node is serving keeps its file (its record goes: the record is not this node's alone to
        keep); the age sweep of a later run removes it. The sweep also removes this node's cached copies of Redis
        images (other nodes' retention deleted their records) and, in a shared folder, the images of records whose
        node died between deleting the records and their files. It skips only what *this* node is serving."""
        now = time.time() if now is None else now
        expired = self.records.expire_finished_ids(max_age_s, now)
        kept_busy = self._delete_images(expired)
        swept = self._remove_images_older_than(now - max_age_s)
        self._remove_stale_temporaries(now)
        deleted_bytes = sum(size or 0 for _, size in expired)
        if expired or swept:
            log.info(
                "retention deleted %d job(s), %d bytes of images; %d older image file(s) without a record",
                len(expired),
                deleted_bytes,
                swept,
            )
        return CleanupReport(deleted_jobs=len(expired), deleted_bytes=deleted_bytes, kept_busy=kept_busy)

    def _delete_images(self, expired: ExpiredRecords) -> int:
        """The images of jobs whose records retention deleted; returns how many files were kept (being served)."""
        with_image = [job_id for job_id, size in expired if size]
        kept_busy = 0
        for job_id in with_image:
            if self._is_served(job_id):
                kept_busy += 1
            else:
                self.image_path(job_id).unlink(missing_ok=True)
        if self.redis_images is not None and with_image:
            self.redis_images.delete_many(with_image)
        return kept_busy

    def _remove_images_older_than(self, cutoff: float) -> int:
        """Image files last written before ``cutoff`` (no temporaries, none being served); returns how many went.
        An image is written when its job finishes, after it was submitted, so every one this removes belongs to a
        record that retention deletes (or deleted) anyway."""
        removed = 0
        for entry in _image_files(self.images):
            job_id = entry.name.removesuffix(".png")
            try:
                if entry.stat().st_mtime >= cutoff or self._is_served(job_id):
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:  # another node's sweep of the shared folder was first
                continue
            removed += 1
        return removed


def _image_files(images: Path) -> Iterator[os.DirEntry[str]]:
    """The finished images under the fan-out folders (not the hidden temporaries of writes in progress)."""
    try:
        with os.scandir(images) as entries:
            folders = [entry for entry in entries if entry.is_dir()]
    except FileNotFoundError:
        return
    for folder in folders:
        try:
            with os.scandir(folder.path) as entries:
                yield from (e for e in entries if e.name.endswith(".png") and not e.name.startswith("."))
        except FileNotFoundError:
            continue


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the whole file or none. The temporary's name matches what ``_remove_stale_temporaries`` sweeps
    and holds the thread too: two threads fetching the same image write two temporaries, not one interleaved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
