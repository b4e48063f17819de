"""RedisJobQueue against a real redis-server: order, admission, blocking claims, leases, cancels, Redis restarts."""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from genserve import errors
from genserve.cluster.redis_queue import (
    Claim,
    QueueFull,
    QueueItem,
    QueueUnavailable,
    RedisJobQueue,
)
from tests.redis_server import RedisServer, redis_server
from tests.server import free_port, wait_until

__all__ = ["redis_server"]  # the fixture, imported for pytest


def make_queue(server: RedisServer, **options: Any) -> RedisJobQueue:
    """A queue under a prefix of its own, so the tests of this module share one Redis without seeing each other."""
    return RedisJobQueue.connect(server.url, prefix=f"test:{uuid.uuid4().hex[:8]}:", **options)


@pytest.fixture
def queue(redis_server: RedisServer) -> Iterator[RedisJobQueue]:
    q = make_queue(redis_server, max_size=500)
    yield q
    q.close()


def drain(queue: RedisJobQueue, node: str = "node-a") -> list[Claim]:
    claims = []
    while (claim := queue.claim(node, lease_s=30, timeout_s=0)) is not None:
        claims.append(claim)
    return claims


def tokens(queue: RedisJobQueue) -> int:
    return int(queue._client.llen(queue.prefix + "wake"))


def blocked_clients(queue: RedisJobQueue) -> int:
    return int(queue._client.info("clients")["blocked_clients"])


# --- order and admission -------------------------------------------------------------------------------------------


def test_lower_priority_first_fifo_within_a_priority_negative_ones_included(queue: RedisJobQueue) -> None:
    rng = random.Random(15)
    priorities = [-1000, -7, -1, 0, 3, 1000]
    submitted = [(f"job-{i}", rng.choice(priorities)) for i in range(120)]
    for job_id, priority in submitted:
        queue.submit(job_id, priority, f"payload of {job_id}".encode())

    expected = [job_id for job_id, _ in sorted(submitted, key=lambda item: item[1])]  # stable: FIFO per priority
    assert len(queue) == 120
    assert [queue.position(job_id) for job_id in expected[:5]] == [0, 1, 2, 3, 4]
    assert queue.depth_by_priority() == {p: sum(1 for _, q in submitted if q == p) for p in priorities}

    claims = drain(queue)
    assert [claim.job_id for claim in claims] == expected
    assert all(claim.payload == f"payload of {claim.job_id}".encode() and claim.attempts == 0 for claim in claims)
    assert queue.position("job-0") is None and len(queue) == 0 and tokens(queue) == 0


def test_scores_stay_exact_at_the_ends_of_the_priority_and_sequence_ranges(queue: RedisJobQueue) -> None:
    # The largest scores the encoding makes (priority 1000, the last sequences) are still exact doubles: these
    # three jobs differ by one in the last digits of their scores, and any rounding would swap or merge them.
    queue._client.set(queue.prefix + "seq:tail", 2**39 - 4)
    queue.submit("a", 1000, b"x")
    queue.submit("b", 1000, b"x")
    queue.submit("c", 999, b"x")
    assert queue.depth_by_priority() == {999: 1, 1000: 2}
    with pytest.raises(RuntimeError, match="submit sequences"):  # the next would overflow into priority 1001
        queue.submit("d", -1000, b"x")
    assert len(queue) == 3 and queue.position("d") is None  # refused before any write
    assert [claim.job_id for claim in drain(queue)] == ["c", "a", "b"]


def test_payloads_are_bytes_and_groups_come_back(queue: RedisJobQueue) -> None:
    queue.submit("a", 0, b"\x00\xff binary", group="request-1")
    queue.submit("b", 0, b"")
    first, second = drain(queue)
    assert (first.payload, first.group, first.priority) == (b"\x00\xff binary", "request-1", 0)
    assert (second.payload, second.group) == (b"", None)


def test_priority_outside_the_scored_range_is_a_bad_request(queue: RedisJobQueue) -> None:
    with pytest.raises(errors.BadRequest, match="outside -1000..1000") as raised:
        queue.submit("too-high", 1001, b"x")
    assert raised.value.status_code == 400 and raised.value.param == "priority"
    assert len(queue) == 0


def test_submit_all_is_all_or_none_at_the_cap(redis_server: RedisServer) -> None:
    queue = make_queue(redis_server, max_size=5)
    queue.submit_all([QueueItem(f"first-{i}", 0, b"x") for i in range(3)])

    with pytest.raises(QueueFull, match="holds 3 of at most 5") as raised:
        queue.submit_all([QueueItem(f"second-{i}", 0, b"x") for i in range(3)])
    assert raised.value.status_code == 429
    assert len(queue) == 3 and all(queue.position(f"second-{i}") is None for i in range(3))

    queue.submit_all([QueueItem(f"second-{i}", 0, b"x") for i in range(2)])
    assert len(queue) == 5 and tokens(queue) == 5
    with pytest.raises(QueueFull):
        queue.submit("one-more", -5, b"x")

    # A retried submit (same id and payload) is admitted once and takes no room; another payload is a bug.
    queue.submit("first-0", 0, b"x")
    assert len(queue) == 5
    with pytest.raises(ValueError, match="another payload"):
        queue.submit("first-0", 0, b"y")
    queue.close()


# --- claims: blocking, waking, exclusivity ---------------------------------------------------------------------------


def test_an_idle_claimer_blocks_without_polling_and_wakes_within_milliseconds(queue: RedisJobQueue) -> None:
    def blpop_calls() -> int:
        stats = queue._client.info("commandstats")
        return int(stats.get("cmdstat_blpop", {}).get("calls", 0))

    # On an empty queue one claim of 1 s is one BLPOP, not a loop of polls.
    before = blpop_calls()
    started = time.monotonic()
    assert queue.claim("node-a", lease_s=30, timeout_s=1.0) is None
    assert time.monotonic() - started >= 1.0
    assert blpop_calls() - before == 1

    latencies = []
    for round_ in range(20):
        got: list[tuple[Claim | None, float]] = []
        claimer = threading.Thread(target=claim_and_note_when, args=(queue, got))
        claimer.start()
        wait_until(lambda: blocked_clients(queue) >= 1, timeout=5, interval=0.005, what="the claimer to block")
        submitted_at = time.perf_counter()
        queue.submit(f"job-{round_}", 0, b"x")
        claimer.join(timeout=5)
        claim, woke_at = got[0]
        assert claim is not None and claim.job_id == f"job-{round_}"
        latencies.append(woke_at - submitted_at)
        assert queue.finish(claim.job_id, "node-a")

    assert max(latencies) < 2.0  # a sanity bound only; the figures are printed (pytest -s) for the docs
    print(
        f"\nclaim latency (submit -> claim returns, idle claimer, 20 rounds): "
        f"median {statistics.median(latencies) * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms"
    )


def claim_and_note_when(queue: RedisJobQueue, got: list[tuple[Claim | None, float]]) -> None:
    claim = queue.claim("node-a", lease_s=30, timeout_s=5)
    got.append((claim, time.perf_counter()))


def test_concurrent_claimers_get_every_job_exactly_once(queue: RedisJobQueue) -> None:
    claimed: list[str] = []
    lock = threading.Lock()
    submitting_done = threading.Event()

    def claimer(node: str) -> None:
        while True:
            claim = queue.claim(node, lease_s=30, timeout_s=0.3)
            if claim is None:
                if submitting_done.is_set():
                    return
                continue
            with lock:
                claimed.append(claim.job_id)
            assert queue.finish(claim.job_id, node)

    threads = [threading.Thread(target=claimer, args=(f"node-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    submitted = [f"job-{i}" for i in range(300)]
    for start in range(0, len(submitted), 10):  # submits race the claimers: singles and batches
        batch = submitted[start : start + 10]
        if start % 20:
            queue.submit_all([QueueItem(job_id, start % 3, b"x") for job_id in batch])
        else:
            for job_id in batch:
                queue.submit(job_id, 0, b"x")
    submitting_done.set()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(claimed) == sorted(submitted)  # none lost, none twice
    assert len(queue) == 0 and tokens(queue) == 0 and queue.running() == []


def test_a_wake_token_lost_by_a_dead_claimer_strands_no_job(redis_server: RedisServer) -> None:
    queue = make_queue(redis_server, max_block_s=0.3)
    raw = redis.Redis.from_url(redis_server.url)
    wake = queue.prefix + "wake"
    baseline = blocked_clients(queue)

    # A claimer blocks first and "dies" with the token of the next job (Redis serves blocked clients in order).
    stolen: list[object] = []
    dead = threading.Thread(target=lambda: stolen.append(raw.blpop([wake], timeout=5)))
    dead.start()
    wait_until(lambda: blocked_clients(queue) == baseline + 1, timeout=5, interval=0.005, what="the dead claimer")
    got: list[Claim | None] = []
    waiting = threading.Thread(target=lambda: got.append(queue.claim("node-b", lease_s=30, timeout_s=5)))
    waiting.start()
    wait_until(lambda: blocked_clients(queue) == baseline + 2, timeout=5, interval=0.005, what="the live claimer")

    started = time.monotonic()
    queue.submit("orphan", 0, b"x")
    dead.join(timeout=5)
    waiting.join(timeout=5)
    # The live claimer re-checks at the end of its BLPOP slice (max_block_s), token or not.
    assert stolen and stolen[0] is not None  # the dead claimer took the only token
    assert got and got[0] is not None and got[0].job_id == "orphan"
    assert time.monotonic() - started < 2.0

    # And any script restores a lost token: reap_expired, which every node runs periodically, included.
    queue.submit("second", 0, b"x")
    assert raw.lpop(wake) is not None and tokens(queue) == 0
    queue.reap_expired()
    assert tokens(queue) == 1
    raw.close()
    queue.close()


# --- leases ----------------------------------------------------------------------------------------------------------


def test_an_expired_lease_requeues_at_the_head_once_then_fails(queue: RedisJobQueue) -> None:
    queue.submit("urgent", -1, b"u")
    queue.submit("lost", 0, b"l")
    queue.submit("later", 0, b"x")
    assert queue.claim("node-a", lease_s=30, timeout_s=0).job_id == "urgent"  # type: ignore[union-attr]
    claim = queue.claim("node-a", lease_s=0.2, timeout_s=0)
    assert claim is not None and claim.job_id == "lost"

    (first, second) = sorted(queue.running(), key=lambda job: job.job_id)
    assert (first.job_id, first.node_id) == ("lost", "node-a")
    assert 0 < first.lease_deadline - queue.server_time() <= 0.2
    assert second.lease_deadline - queue.server_time() > 29

    assert not queue.renew("lost", "node-b", lease_s=0.2)  # not its lease
    assert queue.renew("lost", "node-a", lease_s=0.2)
    assert not queue.reap_expired()  # nothing expired yet: an empty, falsy answer
    time.sleep(0.3)
    reaped = queue.reap_expired()
    assert reaped.requeued == ("lost",) and reaped.failed == () and reaped.canceled == ()
    assert queue.position("lost") == 0 and queue.position("later") == 1  # the head of its priority
    assert not queue.renew("lost", "node-a", lease_s=30)  # node-a lost it: it must stop the job
    assert not queue.finish("lost", "node-a")

    again = queue.claim("node-b", lease_s=0.2, timeout_s=0)
    assert again is not None and (again.job_id, again.attempts, again.payload) == ("lost", 1, b"l")
    time.sleep(0.3)
    reaped = queue.reap_expired()
    assert reaped.failed == ("lost",) and reaped.requeued == ()
    assert queue.cancel("lost") == "unknown"  # removed, payload freed
    assert [job.job_id for job in queue.running()] == ["urgent"]
    assert queue.finish("urgent", "node-a") and queue.running() == []


def test_reaping_from_many_nodes_at_once_handles_each_lease_once(queue: RedisJobQueue) -> None:
    for i in range(40):
        queue.submit(f"job-{i}", 0, b"x")
    assert len(drain_with_lease(queue, lease_s=0.1)) == 40
    time.sleep(0.2)
    results: list[tuple[str, ...]] = []
    reapers = [threading.Thread(target=lambda: results.append(queue.reap_expired(batch=7).requeued)) for _ in range(4)]
    for reaper in reapers:
        reaper.start()
    for reaper in reapers:
        reaper.join(timeout=10)
    requeued = [job_id for result in results for job_id in result]
    assert sorted(requeued) == sorted(f"job-{i}" for i in range(40))
    assert len(queue) == 40 and tokens(queue) == 40


def drain_with_lease(queue: RedisJobQueue, lease_s: float) -> list[Claim]:
    claims = []
    while (claim := queue.claim("node-a", lease_s=lease_s, timeout_s=0)) is not None:
        claims.append(claim)
    return claims


# --- cancellation ----------------------------------------------------------------------------------------------------


def test_cancel_dequeues_a_waiting_job_and_flags_and_notifies_a_running_one(queue: RedisJobQueue) -> None:
    queue.submit("waiting", 0, b"w")
    queue.submit("running", 0, b"r")
    queue.submit("expiring", 0, b"e")
    assert queue.cancel("waiting") == "dequeued"
    assert queue.position("waiting") is None and len(queue) == 2 and tokens(queue) == 2

    with queue.subscribe_cancels("node-a") as notices:
        assert queue.claim("node-a", lease_s=30, timeout_s=0).job_id == "running"  # type: ignore[union-attr]
        assert not queue.is_canceled("running")
        received: list[str] = []
        listener = threading.Thread(target=lambda: received.append(next(iter(notices))))
        listener.start()
        assert queue.cancel("running", queued_only=True) == "running"  # left alone: nothing flagged or sent
        assert not queue.is_canceled("running")
        assert queue.cancel("running", "timeout") == "running"
        listener.join(timeout=5)
        assert received == ["running timeout"]
    assert queue.is_canceled("running")
    assert queue.finish("running", "node-a")
    assert not queue.is_canceled("running") and queue.cancel("running") == "unknown"

    # A canceled job whose node died is reaped as canceled, not re-queued.
    assert queue.claim("node-a", lease_s=0.1, timeout_s=0).job_id == "expiring"  # type: ignore[union-attr]
    assert queue.cancel("expiring") == "running"
    time.sleep(0.2)
    assert queue.reap_expired().canceled == ("expiring",)
    assert len(queue) == 0 and queue.running() == []
    assert queue.cancel("never-submitted") == "unknown"


def test_release_puts_a_job_back_at_the_head_without_spending_an_attempt(queue: RedisJobQueue) -> None:
    for job_id in ("first", "second", "third"):
        queue.submit(job_id, 0, job_id.encode())
    claim = queue.claim("node-a", lease_s=30, timeout_s=0)
    assert claim is not None and claim.job_id == "first"
    assert queue.positions(["second", "third", "first"]) == [0, 1, None]
    assert queue.release("first", "node-b") == "not_held"  # only the holder gives it back
    assert queue.release("first", "node-a") == "requeued"
    assert queue.queued_ids() == ["first", "second", "third"] and queue.running() == []
    again = queue.claim("node-b", lease_s=30, timeout_s=0)
    assert again is not None and again.job_id == "first" and again.attempts == 0 and again.payload == b"first"
    # A job with a pending cancel is not put back: it ends.
    assert queue.cancel("first") == "running"
    assert queue.release("first", "node-b") == "canceled"
    assert queue.queued_ids(limit=1) == ["second"] and tokens(queue) == 2


def test_an_attempt_counted_by_the_holding_node_makes_the_next_lost_lease_fail_the_job(queue: RedisJobQueue) -> None:
    queue.submit("twice", 0, b"t")
    claim = queue.claim("node-a", lease_s=0.1, timeout_s=0)
    assert claim is not None and claim.attempts == 0
    assert queue.count_attempt("twice", "node-b") is None  # only the holder counts
    assert queue.count_attempt("twice", "node-a") == 1  # its worker died; the node runs it again
    time.sleep(0.2)  # then the node itself is lost
    assert queue.reap_expired().failed == ("twice",)
    assert len(queue) == 0 and queue.running() == []


# --- Redis trouble ---------------------------------------------------------------------------------------------------


def test_queued_jobs_survive_a_redis_restart_and_the_client_reconnects() -> None:
    server = RedisServer(appendonly=True).start()
    try:
        queue = make_queue(server)
        queue.submit("low", 5, b"l")
        queue.submit("high", -5, b"h")
        queue.submit("middle", 0, b"m")
        assert queue.claim("node-a", lease_s=30, timeout_s=0).job_id == "high"  # type: ignore[union-attr]

        server.stop()
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="unavailable") as raised:
            queue.size()
        assert raised.value.status_code == 503 and time.monotonic() - started < 3
        with pytest.raises(QueueUnavailable):
            queue.submit("during-outage", 0, b"x")

        server.start()
        assert len(queue) == 2 and queue.position("middle") == 0  # same client: it reconnected
        assert [job.job_id for job in queue.running()] == ["high"]
        assert queue.renew("high", "node-a", lease_s=30)
        assert [claim.job_id for claim in drain(queue)] == ["middle", "low"]
        queue.close()
    finally:
        server.close()


def test_an_unreachable_redis_is_queue_unavailable() -> None:
    queue = RedisJobQueue.connect(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    for call in (queue.ping, lambda: queue.claim("node-a", lease_s=1, timeout_s=1), queue.reap_expired):
        with pytest.raises(QueueUnavailable, match=r"127\.0\.0\.1:\d+\) is unavailable"):
            call()
    assert time.monotonic() - started < 5
