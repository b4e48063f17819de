"""Job records and job events of a GenServe cluster, in Redis: what every node reads and writes about a job.

``RedisJobRecords`` is the record half of ``genserve.store.ResultStore`` (insert, update, apply, delete, get, list,
count, with the same arguments and answers), so the wiring swaps it in for SQLite when ``cluster.backend`` is
``redis``. ``RedisJobEvents`` carries a job's events (queued, started, progress, completed …) between nodes on a
Redis stream per job: the node that decides a change publishes (genserve.cluster.ledger), and each API node's
event follower (genserve.cluster.mirror) reads the streams of the jobs it mirrors, for /jobs/{id}/events, sync
waits and webhooks. Both live in every node and talk to one Redis through redis-py (the synchronous client is
thread-safe).

Key layout (every key under ``prefix``, default ``genserve:``, the prefix of the queue in ``redis_queue``):

    job:<id>                        HASH  one job's columns, as strings (params and webhook as JSON, as the
                                          store does); a column that is None is absent from the hash
    jobs:all                        ZSET  every job id -> -submitted_at
    jobs:finished                   ZSET  ids whose status is neither queued nor running -> -submitted_at
    jobs:status:<status>            ZSET  ids with that status -> -submitted_at
    jobs:owner:<owner>              ZSET  ids that key owns -> -submitted_at
    jobs:owner-status:<status>:<owner>  ZSET  both at once (``list(status=…, owner=…)`` pages and counts on it)
    events:<id>                     STREAM  the job's events; entry ids are ``<seq>-0``: seq 1, 2, 3 … as on one
                                          machine, so an SSE ``Last-Event-ID`` means the same on every node

Order: index scores are *minus* the submission time, so an ascending ZRANGE is newest first and Redis breaks ties
by id, ascending — exactly the store's ``ORDER BY submitted_at DESC, id``. Scores are written with ``%.17g`` in
Lua (Lua's own conversion keeps 14 digits), which round-trips every double.

Consistency: each write is one Lua script that first takes the record out of the indexes its current status and
owner put it in, changes the hash, and puts it back in the indexes of its new values — so a status change moves a
record between indexes atomically, even with every node writing at once. The scripts build the per-job keys from
the prefix (they cannot be listed in KEYS ahead of time), so they need a single Redis (or Sentinel), not a Redis
Cluster.

Retention: ``expire_finished_ids`` deletes finished records older than a cutoff and says which (with their
image_bytes, so the caller deletes their images), from their hash and every index in the same script, oldest first
in pages of ``batch``; every node's retention thread may call it at once. Records get no Redis TTL: a key that
expires on its own leaves its id behind in four indexes, so totals would be wrong and every page would have to
repair them until someone swept — while the retention thread already runs on every node and deletes hash and index
entries together. An index can still point at a vanished hash (a key evicted under ``maxmemory``, a manual DEL, a
script Redis aborted half-way): ``list`` skips such ids, removes them from the index it reads (and from
``jobs:all`` and ``jobs:finished``), and fills the page from the next ones; ``expire_finished_ids`` drops those it
meets. Set ``maxmemory-policy noeviction`` for Redis anyway: the queue's keys must not be evicted either.

Events: ``publish`` appends with ``MAXLEN ~`` (a few more than the cap may stay: trimming is by whole nodes); a
terminal event (completed, failed, canceled) sets the stream's TTL to ``ttl_s`` (results retention: a client may
still ask for a finished job's events), any other event to ``unfinished_ttl_s`` so that a job nobody finished
(every node that knew it gone) cannot leave its stream behind for ever. Readers block in XREAD (no polling), in
slices of at most ``max_block_s`` so the client's socket timeout never fires and a ``stop`` is seen.

Not here: ``fail_interrupted``. On one machine it fails the jobs a dead API process left queued or running; in a
cluster nodes come and go while the jobs stay in the Redis queue, and a job whose node died is found by its
expired lease and re-queued or failed by ``RedisJobQueue.reap_expired``. Image files and job inputs stay with the
results backend (a shared folder or Redis), not here.

Redis that cannot be reached raises ``QueueUnavailable`` (HTTP 503), the queue's own error, re-exported here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import fields
from typing import Any, cast

import redis
import redis.exceptions
from redis.retry import Retry

from genserve.cluster.redis_queue import (
    QueueUnavailable,
    client_options,
    redis_errors,
    redis_where,
    retry_backoff,
)
from genserve.jobs import JobEvent
from genserve.store import JSON_COLUMNS, JobRecord

__all__ = ["QueueUnavailable", "RedisJobEvents", "RedisJobRecords", "stream_id"]

log = logging.getLogger(__name__)

TERMINAL_KINDS = frozenset({"completed", "failed", "canceled"})
UNFINISHED = ("queued", "running")  # every other status is finished, as in the store's retention
RETENTION_BATCH = 500  # records one expire_finished script deletes: Redis serves nobody else while it runs
DEFAULT_TTL_S = 168 * 3600.0  # results.max_age_hours' default: a finished job's events live as long as its record
DEFAULT_UNFINISHED_TTL_S = 30 * 86400.0  # a stream whose job never ended goes after a month without an event
DEFAULT_MAX_EVENTS = 1000  # entries a job's stream keeps (approximately); a 50-step job makes about 55


# (id, image_bytes) of each record retention deleted; a type of its own because ``list`` is a method's name inside
# RedisJobRecords.
ExpiredRecords = list[tuple[str, int | None]]


# --- columns -------------------------------------------------------------------------------------------------------


def _column_kinds() -> dict[str, str]:
    """Each JobRecord column's kind (str, int, float or json), from its annotation: a column added to JobRecord
    is stored here too, and one of a type this module cannot store stops the import instead of losing data."""
    kinds = {}
    for column in fields(JobRecord):
        base = str(column.type).split(" | ")[0]
        kind = "json" if column.name in JSON_COLUMNS else base
        if kind not in ("str", "int", "float", "json"):
            raise TypeError(f"JobRecord.{column.name}: {column.type} cannot be stored in Redis")
        kinds[column.name] = kind
    return kinds


_KINDS = _column_kinds()
_REQUIRED = frozenset(column.name for column in fields(JobRecord) if "None" not in str(column.type))


def _encode(name: str, value: Any) -> str:
    """A column's value as the hash holds it. Floats keep every digit (repr round-trips); like SQLite's column
    affinity, an int given for a float column comes back as a float."""
    kind = _KINDS[name]
    if kind == "json":
        return json.dumps(value)
    if kind == "float":
        return repr(float(value))
    if kind == "int":
        return str(int(value))
    return str(value)


def _decode(name: str, raw: bytes) -> Any:
    text = raw.decode()
    kind = _KINDS[name]
    if kind == "json":
        return json.loads(text)
    if kind == "float":
        return float(text)
    if kind == "int":
        return int(text)
    return text


def _record(flat: Sequence[bytes]) -> JobRecord:
    """A record from HGETALL's flat [field, value, …] reply."""
    values = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
    return JobRecord(**{name: _decode(name, raw) for name, raw in values.items() if name in _KINDS})


def _changes_args(job_id: str, changes: Mapping[str, Any]) -> list[str]:
    """One update as the apply script reads it: id, how many fields to set, how many to delete, then those."""
    unknown = set(changes) - set(_KINDS)
    if unknown:
        raise ValueError(f"unknown job columns {sorted(unknown)}")
    if "id" in changes:
        raise ValueError("a job's id cannot change (it names the job's hash)")
    emptied = sorted(name for name, value in changes.items() if value is None and name in _REQUIRED)
    if emptied:
        raise ValueError(f"job columns {emptied} cannot be None")
    setting = [(name, _encode(name, value)) for name, value in changes.items() if value is not None]
    deleting = [name for name, value in changes.items() if value is None]
    return [job_id, str(len(setting)), str(len(deleting)), *(part for pair in setting for part in pair), *deleting]


# --- Lua -----------------------------------------------------------------------------------------------------------
# Every records script gets the prefix as ARGV[1] and starts with this prelude.

_RECORDS_PRELUDE = f"""
local P = ARGV[1]
local UNFINISHED = {{['{UNFINISHED[0]}'] = true, ['{UNFINISHED[1]}'] = true}}
"""

_RECORDS_PRELUDE += """
local function job_key(id) return P .. 'job:' .. id end

-- The indexes a record with this status and owner belongs to.
local function index_keys(status, owner)
  local keys = {P .. 'jobs:all', P .. 'jobs:status:' .. status}
  if not UNFINISHED[status] then keys[#keys + 1] = P .. 'jobs:finished' end
  if owner then
    keys[#keys + 1] = P .. 'jobs:owner:' .. owner
    keys[#keys + 1] = P .. 'jobs:owner-status:' .. status .. ':' .. owner
  end
  return keys
end

-- Take the record out of the indexes its stored status and owner put it in. False: there is no record.
local function unindex(id)
  local f = redis.call('HMGET', job_key(id), 'status', 'owner')
  if not f[1] then return false end
  for _, key in ipairs(index_keys(f[1], f[2])) do redis.call('ZREM', key, id) end
  return true
end

-- Put the record in the indexes of its stored status and owner, scored by minus its submission time.
local function index(id)
  local f = redis.call('HMGET', job_key(id), 'status', 'owner', 'submitted_at')
  local score = string.format('%.17g', -tonumber(f[3]))
  for _, key in ipairs(index_keys(f[1], f[2])) do redis.call('ZADD', key, score, id) end
end
"""

# ARGV: prefix, id, field, value, field, value … Returns 0 when the job already exists (nothing written).
_INSERT = """
local id = ARGV[2]
if redis.call('EXISTS', job_key(id)) == 1 then return 0 end
redis.call('HSET', job_key(id), unpack(ARGV, 3))
index(id)
return 1
"""

# ARGV: prefix, then per update: id, n_set, n_delete, n_set field/value pairs, n_delete fields. A job that does
# not exist is left alone (an UPDATE that matches no row).
_APPLY = """
local i = 2
while i <= #ARGV do
  local id, n_set, n_delete = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if unindex(id) then
    if n_set > 0 then redis.call('HSET', job_key(id), unpack(ARGV, i, i + 2 * n_set - 1)) end
    if n_delete > 0 then redis.call('HDEL', job_key(id), unpack(ARGV, i + 2 * n_set, i + 2 * n_set + n_delete - 1)) end
    index(id)
  end
  i = i + 2 * n_set + n_delete
end
return 0
"""

# ARGV: prefix, id.
_DELETE = """
unindex(ARGV[2])
redis.call('DEL', job_key(ARGV[2]))
return 0
"""

# ARGV: prefix, index name (after the prefix), offset, limit (negative: all). Returns {total, hash, hash, …}.
# Ids whose hash is gone are dropped from this index (and the two every record is in) and the page is refilled
# from the ids after them; their other indexes are cleaned when those are listed.
_LIST = """
local INDEX = P .. ARGV[2]
local offset, limit = math.max(0, tonumber(ARGV[3])), tonumber(ARGV[4])
local stop = -1
if limit >= 0 then stop = offset + limit - 1 end
local out = {0}
while limit < 0 or #out - 1 < limit do
  local ids = redis.call('ZRANGE', INDEX, offset + #out - 1, stop)
  if #ids == 0 then break end
  local gone = 0
  for _, id in ipairs(ids) do
    local record = redis.call('HGETALL', job_key(id))
    if #record == 0 then
      for _, key in ipairs({INDEX, P .. 'jobs:all', P .. 'jobs:finished'}) do redis.call('ZREM', key, id) end
      gone = gone + 1
    else
      out[#out + 1] = record
    end
  end
  if gone == 0 then break end
end
out[1] = redis.call('ZCARD', INDEX)
return out
"""

# ARGV: prefix, minus the cutoff time (ids scored above it were submitted before it), batch.
# Returns {ids looked at, id, image_bytes, id, image_bytes …} with one pair per record deleted (image_bytes false,
# a nil in the reply, when the job stored no image): fewer ids looked at than the batch means this was the last page.
_EXPIRE = """
local FINISHED = P .. 'jobs:finished'
local ids = redis.call('ZREVRANGEBYSCORE', FINISHED, '+inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {#ids}
for _, id in ipairs(ids) do
  local image_bytes = redis.call('HGET', job_key(id), 'image_bytes')
  if unindex(id) then
    out[#out + 1] = id
    out[#out + 1] = image_bytes
  end
  redis.call('ZREM', FINISHED, id)  -- a dangling id (its hash gone): unindex could not find its indexes
  redis.call('ZREM', P .. 'jobs:all', id)
  redis.call('DEL', job_key(id))
end
return out
"""

# KEYS: the job's stream. ARGV: kind, data (JSON), at, max entries, TTL in ms. Returns the new entry's id.
# The entry id is "<seq>-0" with seq one more than the last entry's: dense per job, like JobEvent.seq.
_PUBLISH = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local seq = 1
if #last > 0 then seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], string.format('%d-0', seq),
  'kind', ARGV[1], 'data', ARGV[2], 'at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return id
"""


# --- records -------------------------------------------------------------------------------------------------------


class RedisJobRecords:
    """The cluster's job records (see the module docstring). Thread-safe; every method may raise
    QueueUnavailable. Same methods and answers as the record half of ``ResultStore``."""

    def __init__(self, client: redis.Redis, *, prefix: str = "genserve:") -> None:
        """``client`` must not decode responses (records are decoded column by column here)."""
        self._client = client
        self.prefix = prefix
        self._where = redis_where(client)
        self._insert = client.register_script(_RECORDS_PRELUDE + _INSERT)
        self._apply = client.register_script(_RECORDS_PRELUDE + _APPLY)
        self._delete = client.register_script(_RECORDS_PRELUDE + _DELETE)
        self._list = client.register_script(_RECORDS_PRELUDE + _LIST)
        self._expire = client.register_script(_RECORDS_PRELUDE + _EXPIRE)

    @classmethod
    def connect(cls, url: str, *, socket_timeout_s: float = 5.0, prefix: str = "genserve:") -> RedisJobRecords:
        client = redis.Redis.from_url(url, retry=Retry(retry_backoff(), retries=2), **client_options(socket_timeout_s))
        return cls(client, prefix=prefix)

    def insert(self, record: JobRecord) -> None:
        """Raises ValueError when a job with this id exists (the store's primary key refuses it too)."""
        pairs = [(name, _encode(name, getattr(record, name))) for name in _KINDS if getattr(record, name) is not None]
        with self._errors():
            inserted = self._insert(args=[self.prefix, record.id, *(part for pair in pairs for part in pair)])
        if not inserted:
            raise ValueError(f"job {record.id} already exists")

    def update(self, job_id: str, **changes: Any) -> None:
        self.apply([(job_id, changes)])

    def apply(self, updates: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """Several records' changes in one script: all or, when a column is unknown, none (ValueError before
        anything is sent). Jobs that do not exist are skipped. A job's id cannot change."""
        args = [self.prefix]
        for job_id, changes in updates:
            args += _changes_args(job_id, changes)
        if len(args) == 1:
            return
        with self._errors():
            self._apply(args=args)

    def delete(self, job_id: str) -> None:
        with self._errors():
            self._delete(args=[self.prefix, job_id])

    def get(self, job_id: str) -> JobRecord | None:
        with self._errors():
            flat = cast(dict[bytes, bytes], self._client.hgetall(self._job_key(job_id)))
        if not flat:
            return None
        return _record([part for pair in flat.items() for part in pair])

    def list(
        self, status: str | None = None, limit: int = 50, offset: int = 0, owner: str | None = None
    ) -> tuple[list[JobRecord], int]:
        """Newest first; also the total count matching ``status``. With ``owner``, only the jobs that key owns.
        A negative limit means no limit (as SQLite's LIMIT -1)."""
        with self._errors():
            total, *records = self._list(args=[self.prefix, _index_name(status, owner), offset, limit])
        return [_record(flat) for flat in records], int(total)

    def count(self) -> int:
        with self._errors():
            return int(self._client.zcard(self.prefix + "jobs:all"))

    def expire_finished(self, max_age_s: float, now: float | None = None, batch: int = RETENTION_BATCH) -> int:
        """Delete the finished records submitted more than ``max_age_s`` ago; returns how many went (see
        ``expire_finished_ids``)."""
        return len(self.expire_finished_ids(max_age_s, now, batch))

    def expire_finished_ids(
        self, max_age_s: float, now: float | None = None, batch: int = RETENTION_BATCH
    ) -> ExpiredRecords:
        """Delete the finished records submitted more than ``max_age_s`` ago (the store's retention rule), oldest
        first, ``batch`` per script; queued and running ones stay whatever their age. Returns the id and
        image_bytes of each record this call deleted, so the caller can delete their images (the results
        backend's, not this module's). Any number of nodes may run it at once: each record goes to exactly one."""
        now = time.time() if now is None else now
        minus_cutoff = repr(-(now - max_age_s))
        deleted: ExpiredRecords = []
        while True:
            with self._errors():
                looked_at, *pairs = self._expire(args=[self.prefix, minus_cutoff, batch])
            deleted += _expired_pairs(pairs)
            if int(looked_at) < batch:
                break
        if deleted:
            log.info("retention deleted %d job record(s) from Redis", len(deleted))
        return deleted

    def ping(self) -> None:
        """Raises QueueUnavailable unless Redis answers (for readiness checks)."""
        with self._errors():
            self._client.ping()

    def close(self) -> None:
        self._client.close()

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _errors(self) -> AbstractContextManager[None]:
        return redis_errors("job records'", self._where)


def _expired_pairs(flat: Sequence[bytes | None]) -> ExpiredRecords:
    """The expire script's flat [id, image_bytes, …] reply as (id, image_bytes) pairs."""
    return [
        (cast(bytes, flat[i]).decode(), None if flat[i + 1] is None else int(cast(bytes, flat[i + 1])))
        for i in range(0, len(flat), 2)
    ]


def _index_name(status: str | None, owner: str | None) -> str:
    """The index ``list`` pages through. An empty status means no filter, as in the store."""
    if status and owner is not None:
        return f"jobs:owner-status:{status}:{owner}"
    if status:
        return f"jobs:status:{status}"
    if owner is not None:
        return f"jobs:owner:{owner}"
    return "jobs:all"


# --- events --------------------------------------------------------------------------------------------------------


def stream_id(event: JobEvent) -> str:
    """The stream entry id of an event: ``read(after=stream_id(event))`` returns the events after it. A bare seq
    (an SSE Last-Event-ID such as "3") works as ``after`` too."""
    return f"{event.seq}-0"


class _EventStreams:
    """The stream layout, the publish arguments and the parsing of entries (the event follower parses too)."""

    def __init__(
        self,
        *,
        prefix: str = "genserve:",
        ttl_s: float = DEFAULT_TTL_S,
        unfinished_ttl_s: float = DEFAULT_UNFINISHED_TTL_S,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_block_s: float = 2.0,
    ) -> None:
        """``max_block_s``: the longest one XREAD blocks; keep it under the client's socket timeout."""
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.unfinished_ttl_s = unfinished_ttl_s
        self.max_events = max_events
        self.max_block_s = max_block_s

    def key(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def _publish_args(self, kind: str, data: Mapping[str, Any], at: float | None) -> list[str | int]:
        ttl_s = self.ttl_s if kind in TERMINAL_KINDS else self.unfinished_ttl_s
        at = time.time() if at is None else at
        return [kind, json.dumps(data), repr(at), self.max_events, max(1, round(ttl_s * 1000))]

    def _slice_ms(self, deadline: float) -> int | None:
        """How long the next XREAD may block (ms, at least 1: 0 would mean for ever), or None when it is time to
        stop waiting."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        return max(1, round(min(remaining, self.max_block_s) * 1000))

    @staticmethod
    def parse(job_id: str, reply: Any) -> list[JobEvent]:
        """XREAD's reply ([[stream, [(id, {field: value}), …]]], or nothing) as JobEvents."""
        events = []
        for _stream, entries in reply or []:
            for entry_id, entry in entries:
                events.append(
                    JobEvent(
                        job_id=job_id,
                        seq=int(entry_id.split(b"-")[0]),
                        kind=entry[b"kind"].decode(),
                        data=json.loads(entry[b"data"]),
                        at=float(entry[b"at"]),
                    )
                )
        return events


class RedisJobEvents(_EventStreams):
    """Job events on Redis streams, for threads (worker nodes publish; webhooks and blocking waits read).
    Thread-safe: a blocked ``read`` holds one pooled connection while it waits."""

    def __init__(self, client: redis.Redis, **settings: Any) -> None:
        """``settings``: prefix, ttl_s, unfinished_ttl_s, max_events, max_block_s (see _EventStreams)."""
        super().__init__(**settings)
        self._client = client
        self._where = redis_where(client)
        self._publish = client.register_script(_PUBLISH)

    @classmethod
    def connect(cls, url: str, *, socket_timeout_s: float = 5.0, **options: Any) -> RedisJobEvents:
        client = redis.Redis.from_url(url, retry=Retry(retry_backoff(), retries=2), **client_options(socket_timeout_s))
        options.setdefault("max_block_s", max(0.05, socket_timeout_s - 1.0))
        return cls(client, **options)

    def publish(self, job_id: str, kind: str, data: Mapping[str, Any], at: float | None = None) -> str:
        """Append an event; returns its stream id ("<seq>-0"). ``at``: when it happened (default: now).

        The client's brief retry may re-send a publish whose reply was lost: the event is then appended twice (the
        same kind again, with the next seq)."""
        with self._errors():
            entry_id = self._publish(keys=[self.key(job_id)], args=self._publish_args(kind, data, at))
        return cast(bytes, entry_id).decode()

    def read(self, job_id: str, after: str = "0", block_s: float | None = None) -> list[JobEvent]:
        """The job's events after stream id ``after``, oldest first. With ``block_s``, wait up to that long for
        one when there is none yet (blocked in XREAD, no polling); an empty list when none came."""
        key = self.key(job_id)
        if block_s is None:
            with self._errors():
                return self.parse(job_id, self._client.xread({key: after}))
        deadline = time.monotonic() + block_s
        while (block_ms := self._slice_ms(deadline)) is not None:
            with self._errors():
                events = self.parse(job_id, self._client.xread({key: after}, block=block_ms))
            if events:
                return events
        return []

    def follow(
        self, job_id: str, after: str = "0", block_s: float = 1.0, stop: threading.Event | None = None
    ) -> Iterator[JobEvent]:
        """The job's events as they come, until a terminal one (yielded last) or until ``stop`` is set, which is
        seen within ``block_s``. A job whose stream is gone (expired, never published) yields nothing: check its
        record first."""
        while stop is None or not stop.is_set():
            for event in self.read(job_id, after, block_s=block_s):
                yield event
                if event.kind in TERMINAL_KINDS:
                    return
                after = stream_id(event)

    def close(self) -> None:
        self._client.close()

    def _errors(self) -> AbstractContextManager[None]:
        return redis_errors("job events'", self._where)
