"""Batched images of one request (n / num_images > 1), through the supervisor and real worker processes with the
scripted pipeline (tests/scripted_worker.py): how a group is split between idle workers and batched, and that each
image of a batch is still reported, canceled and recovered on its own. Gated jobs hold a batch as long as a test
needs, on any machine. That batched images equal the ones their seeds give alone is tested on the real embedded
model, in tests/e2e/test_generate.py.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from genserve.jobs import Job, JobState
from genserve.messages import CancelReason
from genserve.supervisor import Supervisor
from tests.conftest import Gates
from tests.pool import WAIT_S, PoolFactory, make_job, red_of, wait_ready, worker
from tests.server import wait_until


def request_for(out: Path, count: int, prompt: str = "several") -> list[Job]:
    """The jobs of one request for ``count`` images: one group, consecutive seeds (as genserve.prepare makes them)."""
    group = uuid.uuid4().hex
    return [make_job(out, prompt, seed=10 + index, group=group) for index in range(count)]


def finish_all(jobs: list[Job]) -> None:
    for job in jobs:
        assert job.wait_done(WAIT_S) and job.state is JobState.COMPLETED, job.error


def batch_sizes(jobs: list[Job]) -> list[int]:
    return [job.result.batch_size if job.result else 0 for job in jobs]


def test_a_request_for_three_images_on_one_idle_worker_runs_as_one_batch(pool: PoolFactory, tmp_path: Path) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    jobs = supervisor.submit_all(request_for(tmp_path, 3))
    finish_all(jobs)
    assert batch_sizes(jobs) == [3, 3, 3]
    assert [red_of(job) for job in jobs] == [10, 11, 12]  # each image from its own seed, in order
    assert len({job.result.started_at for job in jobs if job.result}) == 1  # one pipeline call
    # The snapshot is published at the end of the monitor's turn, a moment after the jobs ended.
    wait_until(lambda: worker(supervisor)["jobs_done"] == 3, WAIT_S, 0.01, "three jobs counted done")


@pytest.mark.parametrize(
    ("images", "expected"),
    [(2, [1, 1]), (4, [2, 2, 2, 2]), (3, [2, 2, 1])],
    ids=["spread-one-each", "two-each", "uneven"],
)
def test_images_spread_over_idle_workers_first_and_the_rest_batch_evenly(
    pool: PoolFactory, tmp_path: Path, images: int, expected: list[int]
) -> None:
    supervisor = pool(workers=2)
    wait_ready(supervisor)
    jobs = supervisor.submit_all(request_for(tmp_path, images))
    finish_all(jobs)
    assert batch_sizes(jobs) == expected
    assert {job.worker_slot for job in jobs} == {0, 1}  # both workers took a share


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"max_batch": 1}, [1, 1, 1]),
        ({"max_batch": 2}, [2, 2, 1]),
        ({"batch_pixels": 2 * 16 * 16}, [2, 2, 1]),  # two 16² images in a batch at most
        # The memory plan reserves activations for one limits.max_size² image: 16² holds one 16² image, 32² four
        ({"limits": {"min_size": 16, "max_size": 16}, "defaults": {"width": 16, "height": 16}}, [1, 1, 1]),
        ({"limits": {"min_size": 16, "max_size": 32}, "defaults": {"width": 16, "height": 16}}, [3, 3, 3]),
    ],
    ids=["max-batch-1", "max-batch-2", "batch-pixels", "reserve-fits-one", "reserve-fits-four"],
)
def test_a_batch_is_capped_by_max_batch_and_by_the_largest_image_allowed(
    pool: PoolFactory, tmp_path: Path, settings: dict[str, object], expected: list[int]
) -> None:
    supervisor = pool(**settings)
    wait_ready(supervisor)
    jobs = supervisor.submit_all(request_for(tmp_path, 3))
    finish_all(jobs)
    assert batch_sizes(jobs) == expected


def test_jobs_of_different_requests_are_never_batched(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    holder = supervisor.submit(make_job(tmp_path, gates.marker(gate)))
    singles = [supervisor.submit(make_job(tmp_path, "alone", seed=20 + index)) for index in range(3)]
    gates.open(gate)
    finish_all([holder, *singles])
    assert batch_sizes(singles) == [1, 1, 1]


def running(jobs: list[Job]) -> bool:
    return all(job.state is JobState.RUNNING and job.started_at for job in jobs)


def test_one_image_of_a_batch_is_canceled_on_its_own_while_the_others_finish(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    first, second, third = supervisor.submit_all(request_for(tmp_path, 3, gates.marker(gate)))
    wait_until(lambda: running([first, second, third]), WAIT_S, 0.01, "the batch to start")
    wait_until(lambda: worker(supervisor)["current_jobs"] == [first.id, second.id, third.id], WAIT_S, 0.01, "batch")
    supervisor.cancel(second, CancelReason.CLIENT)
    assert second.wait_done(WAIT_S) and second.state is JobState.CANCELED
    assert not first.done and not third.done
    # The snapshot is published at the end of the monitor's turn, a moment after the job ended.
    wait_until(lambda: worker(supervisor)["current_jobs"] == [first.id, third.id], WAIT_S, 0.01, "two jobs left")
    assert worker(supervisor)["state"] == "busy"
    gates.open(gate)
    finish_all([first, third])
    assert batch_sizes([first, third]) == [3, 3]
    assert not Path(second.request.output_path).exists()  # its image was computed but nobody gets it
    assert worker(supervisor)["restarts"] == 0


def test_canceling_every_image_of_a_batch_stops_the_call(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    jobs = supervisor.submit_all(request_for(tmp_path, 2, gates.marker(gates.new())))  # the gate never opens
    wait_until(lambda: running(jobs), WAIT_S, 0.01, "the batch to start")
    for job in jobs:
        supervisor.cancel(job, CancelReason.CLIENT)
    for job in jobs:
        assert job.wait_done(WAIT_S) and job.state is JobState.CANCELED
    after = supervisor.submit(make_job(tmp_path, "next", seed=5))
    finish_all([after])
    assert red_of(after) == 5 and worker(supervisor)["restarts"] == 0


def test_a_worker_death_mid_batch_requeues_every_image_and_they_run_again(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    jobs = supervisor.submit_all(request_for(tmp_path, 2, gates.marker(gate)))
    wait_until(lambda: running(jobs), WAIT_S, 0.01, "the batch to start")
    os.kill(worker(supervisor)["pid"], signal.SIGKILL)
    wait_until(lambda: worker(supervisor)["restarts"] == 1 and running(jobs), WAIT_S, 0.01, "the batch to run again")
    gates.open(gate)
    finish_all(jobs)
    assert batch_sizes(jobs) == [2, 2]  # still together: the group went back to the queue whole
    assert [job.schedule.attempts for job in jobs] == [2, 2]
    assert [red_of(job) for job in jobs] == [10, 11]


def test_a_failed_batch_fails_each_of_its_images(pool: PoolFactory, tmp_path: Path) -> None:
    supervisor: Supervisor = pool()
    wait_ready(supervisor)
    jobs = supervisor.submit_all(request_for(tmp_path, 2, "[fail] bad"))
    for job in jobs:
        assert job.wait_done(WAIT_S) and job.state is JobState.FAILED
        assert job.error is not None and "injected pipeline failure" in str(job.error)
    wait_until(lambda: worker(supervisor)["current_jobs"] == [], WAIT_S, 0.01, "the worker to let go of the batch")
    assert worker(supervisor)["state"] == "ready"
