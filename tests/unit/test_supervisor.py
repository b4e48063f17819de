"""The supervisor in-process, through its ``worker_target`` seam: real worker processes (forked from the real
forkserver, running the real worker loop) with a scripted pipeline (tests/scripted_worker.py), so dispatch order,
recovery, backoff, the restart budget and shutdown are tested in seconds and mean the same on any machine: every
job that must stay busy waits on a gate the test opens.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from genserve.errors import ShuttingDown
from genserve.jobs import JobState
from genserve.messages import CancelReason
from genserve.supervisor import WorkerState
from tests.conftest import Gates
from tests.pool import (
    WAIT_S,
    PoolFactory,
    encoding,
    make_job,
    red_of,
    wait_busy,
    wait_encoding,
    wait_ready,
    worker,
)
from tests.scripted_worker import FAIL_STARTUP, REFUSE_PLAN
from tests.server import wait_until


def test_dispatch_is_lowest_priority_value_first_then_fifo(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    blocker = supervisor.submit(make_job(tmp_path, gates.marker(gate)))
    wait_busy(supervisor, blocker)
    arrivals = [("p5", 5), ("p1-first", 1), ("p3", 3), ("p1-second", 1), ("p-2", -2)]
    jobs = {name: supervisor.submit(make_job(tmp_path, name, priority)) for name, priority in arrivals}
    assert [supervisor.queue_position(jobs[name]) for name in ("p-2", "p1-first", "p1-second", "p3", "p5")] == [
        0,
        1,
        2,
        3,
        4,
    ]
    gates.open(gate)
    for job in [blocker, *jobs.values()]:
        assert job.wait_done(WAIT_S) and job.state is JobState.COMPLETED, job.error
    started = sorted(jobs, key=lambda name: jobs[name].started_at or 0)
    assert started == ["p-2", "p1-first", "p1-second", "p3", "p5"]
    assert all(job.started_at and blocker.started_at and job.started_at > blocker.started_at for job in jobs.values())


def test_a_job_whose_worker_dies_is_requeued_once_then_fails(pool: PoolFactory, tmp_path: Path) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    job = supervisor.submit(make_job(tmp_path, "[crash] poison"))
    assert job.wait_done(WAIT_S)
    assert job.state is JobState.FAILED and job.error is not None
    assert job.error.error_type == "worker_died" and "twice" in job.error.message
    assert job.schedule.attempts == 2
    # Two deaths, two respawns; the slot is back (the snapshot is published right after the job ends).
    wait_until(lambda: worker(supervisor)["restarts"] == 2 and supervisor.ready_count(), WAIT_S, 0.01, "respawn")
    # The pool serves on.
    after = supervisor.submit(make_job(tmp_path, "after the storm"))
    assert after.wait_done(WAIT_S) and after.state is JobState.COMPLETED


def test_a_requeued_job_goes_to_the_head_of_its_priority(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool(workers=2)
    wait_ready(supervisor)
    gate = gates.new()
    holder = supervisor.submit(make_job(tmp_path, gates.marker(gate)))  # keeps slot 0 busy
    wait_busy(supervisor, holder)
    doomed = supervisor.submit(make_job(tmp_path, "[crash] once"))  # slot 1 runs it and dies
    wait_until(lambda: doomed.schedule.attempts == 1, WAIT_S, 0.01, "the crashing job to be dispatched")
    # While slot 1 respawns, more work of the same priority arrives; the re-queued job must still go first.
    later = [supervisor.submit(make_job(tmp_path, f"later {i}")) for i in range(2)]
    wait_until(lambda: doomed.schedule.attempts == 2 or doomed.done, WAIT_S, 0.01, "the re-queued job to run again")
    assert doomed.wait_done(WAIT_S)
    first_later = min(job.started_at or float("inf") for job in later)
    assert doomed.started_at is None or doomed.started_at <= first_later
    gates.open(gate)
    assert all(job.wait_done(WAIT_S) for job in [holder, *later])


def test_respawn_backoff_doubles_while_a_slot_keeps_failing(pool: PoolFactory, model_dir: Path) -> None:
    (model_dir / FAIL_STARTUP).touch()
    supervisor = pool(restart_backoff_s=0.1, restart_backoff_max_s=10, max_restarts=10)
    wait_until(lambda: worker(supervisor)["restarts"] >= 3, WAIT_S, 0.01, "three respawns")
    slot = supervisor._slots[0]
    times = list(slot.restart_times)
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # Each gap holds the backoff (0.2 s, then 0.4 s …) plus the failed start itself: lower bounds only.
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
    assert "startup failed: RuntimeError: injected startup failure" in (worker(supervisor)["last_error"] or "")


def test_a_spent_budget_keeps_retrying_and_the_pool_recovers_by_itself(
    pool: PoolFactory, model_dir: Path, tmp_path: Path
) -> None:
    supervisor = pool(max_restarts=2, restart_backoff_max_s=0.3, restart_window_s=600)
    wait_ready(supervisor)
    (model_dir / FAIL_STARTUP).touch()  # from now on a start fails: a crash storm
    job = supervisor.submit(make_job(tmp_path, "[crash] start the storm"))
    wait_until(lambda: worker(supervisor)["budget_left"] == 0, WAIT_S, 0.01, "the budget to be spent")
    status = supervisor.status()
    assert status["status"] == "degraded"
    assert "spent their restart budget" in status["reason"] and "retry every 0.3 s" in status["reason"]
    assert worker(supervisor)["budget_spent"] is True
    spent_at = worker(supervisor)["restarts"]
    # Not dead for good: it keeps trying at restart_backoff_max_s.
    wait_until(lambda: worker(supervisor)["restarts"] >= spent_at + 2, WAIT_S, 0.01, "retries after the budget")
    (model_dir / FAIL_STARTUP).unlink()  # the storm ends
    wait_ready(supervisor)
    assert supervisor.status()["status"] in ("running", "degraded")
    # The job waited through the storm (it had been re-queued once) and runs now.
    assert job.wait_done(WAIT_S)
    after = supervisor.submit(make_job(tmp_path, "calm again"))
    assert after.wait_done(WAIT_S) and after.state is JobState.COMPLETED


def test_on_budget_spent_exit_asks_the_service_to_exit(pool: PoolFactory, model_dir: Path) -> None:
    (model_dir / FAIL_STARTUP).touch()
    reasons: list[str] = []
    supervisor = pool(max_restarts=1, on_budget_spent="exit", on_fatal=reasons.append)
    wait_until(lambda: reasons, WAIT_S, 0.01, "the fatal callback")
    assert "spent its restart budget" in reasons[0] and "on_budget_spent is exit" in reasons[0]
    assert supervisor.fatal_reason == reasons[0]
    time.sleep(0.5)  # no further respawn is scheduled
    assert worker(supervisor)["restarts"] == 1 and worker(supervisor)["state"] == WorkerState.DEAD.value


def test_a_refused_memory_plan_fails_the_slot_once_and_is_never_reloaded(pool: PoolFactory, model_dir: Path) -> None:
    (model_dir / REFUSE_PLAN).touch()
    supervisor = pool(max_restarts=10, restart_backoff_s=0.01, restart_backoff_max_s=0.05)
    wait_until(lambda: worker(supervisor)["state"] == WorkerState.FAILED.value, WAIT_S, 0.01, "the refusal")
    time.sleep(0.5)  # at this backoff a reload loop would have respawned it several times by now
    view = worker(supervisor)
    assert view["state"] == WorkerState.FAILED.value and view["restarts"] == 0
    plan = view["memory_plan"]
    assert plan["fits"] is False and plan["device"] == "1 GB card"
    assert {component["name"] for component in plan["components"]} == {
        "text_encoder",
        "text_encoder_2",
        "vae",
        "transformer",
    }
    status = supervisor.status()
    assert status["status"] == "failed"
    assert "cannot load the models" in status["reason"] and "do not fit" in status["reason"]
    assert supervisor.ready_count() == 0


def test_a_refused_plan_under_on_budget_spent_exit_asks_the_service_to_exit(pool: PoolFactory, model_dir: Path) -> None:
    (model_dir / REFUSE_PLAN).touch()
    reasons: list[str] = []
    supervisor = pool(on_budget_spent="exit", on_fatal=reasons.append)
    wait_until(lambda: reasons, WAIT_S, 0.01, "the fatal callback")
    assert reasons[0].startswith("no worker can load the models: worker 0:")
    assert worker(supervisor)["restarts"] == 0


def test_drain_lets_a_running_job_finish_and_refuses_new_work(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    running = supervisor.submit(make_job(tmp_path, gates.marker(gate)))
    wait_busy(supervisor, running)
    queued = supervisor.submit(make_job(tmp_path, "waiting"))
    drain = threading.Thread(target=supervisor.drain, args=(WAIT_S,))
    drain.start()
    assert queued.wait_done(WAIT_S)
    assert queued.state is JobState.FAILED and isinstance(queued.error, ShuttingDown)
    assert queued.cancel_reason is CancelReason.SHUTDOWN
    with pytest.raises(ShuttingDown) as refused:
        supervisor.submit(make_job(tmp_path, "too late"))
    assert int(refused.value.headers["Retry-After"]) >= 1
    gates.open(gate)
    drain.join(WAIT_S)
    assert not drain.is_alive()
    assert running.state is JobState.COMPLETED


def test_shutdown_fails_what_is_left_and_never_respawns(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool(workers=2)
    wait_ready(supervisor)
    running = supervisor.submit(make_job(tmp_path, gates.marker(gates.new())))
    wait_busy(supervisor, running)
    pids = [w["pid"] for w in supervisor.status()["workers"]]
    began = time.monotonic()
    supervisor.drain(0.2)
    assert running.done and running.state is JobState.FAILED
    assert isinstance(running.error, ShuttingDown) and "shutdown_grace_s" in running.error.message
    supervisor.shutdown()
    assert time.monotonic() - began < 0.2 + 5 + 2  # grace + shutdown_timeout_s, with room
    status = supervisor.status()
    assert [w["state"] for w in status["workers"]] == ["dead", "dead"]
    assert status["concurrent_manager"]["total_restarts"] == 0
    assert status["status"] == "stopping"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)


def test_cancel_of_a_running_job_stops_it_at_its_next_step(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    job = supervisor.submit(make_job(tmp_path, gates.marker(gates.new())))
    wait_busy(supervisor, job)
    supervisor.cancel(job, CancelReason.CLIENT)
    assert job.wait_done(WAIT_S)
    assert job.state is JobState.CANCELED and job.error is not None
    assert "canceled by client" in job.error.message
    wait_until(lambda: worker(supervisor)["state"] == "ready", WAIT_S, 0.01, "the worker to be idle again")
    assert worker(supervisor)["restarts"] == 0


def test_a_queued_job_past_its_deadline_leaves_the_queue(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    blocker = supervisor.submit(make_job(tmp_path, gates.marker(gate)))
    wait_busy(supervisor, blocker)
    short = supervisor.submit(make_job(tmp_path, "in a hurry", timeout_s=0.3))
    assert short.wait_done(WAIT_S)
    assert short.state is JobState.FAILED and short.error is not None and short.error.error_type == "timeout"
    assert "in the queue" in short.error.message
    assert supervisor.status()["queue"]["size"] == 0
    gates.open(gate)
    assert blocker.wait_done(WAIT_S) and blocker.state is JobState.COMPLETED


def test_a_pipeline_error_fails_only_that_job(pool: PoolFactory, tmp_path: Path) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    bad = supervisor.submit(make_job(tmp_path, "[fail] bad input"))
    assert bad.wait_done(WAIT_S) and bad.error is not None
    assert bad.error.error_type == "job_failed" and "ValueError: injected pipeline failure" in bad.error.message
    good = supervisor.submit(make_job(tmp_path, "good"))
    assert good.wait_done(WAIT_S) and good.state is JobState.COMPLETED
    assert worker(supervisor)["restarts"] == 0


def test_parallel_loads_bounds_how_many_workers_load_at_once(pool: PoolFactory) -> None:
    supervisor = pool(workers=3, parallel_loads=1)
    seen_loading: list[int] = []

    def all_ready() -> bool:
        states = [w["state"] for w in supervisor.status()["workers"]]
        seen_loading.append(states.count("starting"))
        return states.count("ready") == 3

    wait_until(all_ready, WAIT_S, 0.002, "three ready workers")
    assert max(seen_loading) <= 1


# --- overlapped encoding (performance.overlap_encoding) ------------------------------------------------------------


def test_a_denoised_job_encodes_while_the_next_runs_and_at_most_one_image_waits(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    held = supervisor.submit(make_job(tmp_path, gates.encode_marker(gate)))
    wait_encoding(supervisor, [held])
    assert worker(supervisor)["state"] == "ready" and worker(supervisor)["current_job"] is None
    # The worker takes the next job at once; its image waits behind the held one (results leave in order).
    second = supervisor.submit(make_job(tmp_path, "second", seed=2))
    wait_encoding(supervisor, [held, second])
    assert second.started_at and not second.done and not held.done
    # A third is denoised, but there is no room for its image: the worker's main loop waits, so the slot stays busy
    # with it and a fourth job stays queued. Memory cannot pile up behind a slow encoder.
    third = supervisor.submit(make_job(tmp_path, "third", seed=3))
    fourth = supervisor.submit(make_job(tmp_path, "fourth", seed=4))
    wait_until(lambda: third.step == third.total_steps == 2, WAIT_S, 0.01, "the third job's last step")
    time.sleep(0.3)
    view = worker(supervisor)
    assert (view["state"], view["current_job"], view["encoding_jobs"]) == ("busy", third.id, [held.id, second.id])
    assert supervisor.queue_position(fourth) == 0
    gates.open(gate)
    jobs = [held, second, third, fourth]
    for job in jobs:
        assert job.wait_done(WAIT_S) and job.state is JobState.COMPLETED, job.error
    finished = [job.finished_at or 0 for job in jobs]
    assert finished == sorted(finished)
    assert [red_of(job) for job in jobs] == [7, 2, 3, 4]
    assert all(job.result is not None and job.result.encode_s >= 0 for job in jobs)
    wait_until(lambda: worker(supervisor)["state"] == "ready" and not encoding(supervisor), WAIT_S, 0.01, "idle")
    assert worker(supervisor)["jobs_done"] == 4


def test_a_cancel_after_denoising_is_too_late_while_the_running_job_stops(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    encode_gate = gates.new()
    encoding_job = supervisor.submit(make_job(tmp_path, gates.encode_marker(encode_gate)))
    wait_encoding(supervisor, [encoding_job])
    running = supervisor.submit(make_job(tmp_path, gates.marker(gates.new())))
    wait_busy(supervisor, running)
    supervisor.cancel(encoding_job, CancelReason.CLIENT)
    supervisor.cancel(running, CancelReason.CLIENT)
    assert running.wait_done(WAIT_S) and running.state is JobState.CANCELED
    assert not encoding_job.done  # still held in the encoder: the cancel did not reach it
    gates.open(encode_gate)
    assert encoding_job.wait_done(WAIT_S) and encoding_job.state is JobState.COMPLETED, encoding_job.error
    assert Path(encoding_job.request.output_path).is_file()
    assert worker(supervisor)["restarts"] == 0


def test_a_worker_death_while_encoding_requeues_its_jobs_in_order(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    encode_gate, run_gate = gates.new(), gates.new()
    first = supervisor.submit(make_job(tmp_path, gates.encode_marker(encode_gate)))
    wait_encoding(supervisor, [first])
    second = supervisor.submit(make_job(tmp_path, gates.marker(run_gate)))  # running when the worker dies
    wait_busy(supervisor, second)
    third = supervisor.submit(make_job(tmp_path, "queued behind them"))
    pid = worker(supervisor)["pid"]
    os.kill(pid, signal.SIGKILL)
    # Both jobs the worker held go back to the head of the line, oldest first, ahead of the queued one.
    wait_until(lambda: first.schedule.attempts == 2, WAIT_S, 0.01, "the encoding job to run again")
    wait_encoding(supervisor, [first])  # denoised again on the new process, held again at the same gate
    assert worker(supervisor)["pid"] != pid and worker(supervisor)["restarts"] == 1
    gates.open(encode_gate)
    gates.open(run_gate)
    for job in (first, second, third):
        assert job.wait_done(WAIT_S) and job.state is JobState.COMPLETED, job.error
    assert second.schedule.attempts == 2 and third.schedule.attempts == 1
    started = [job.started_at or 0 for job in (first, second, third)]
    assert started == sorted(started)


def test_hang_detection_leaves_a_slot_alone_while_its_only_job_encodes(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool(first_step_timeout_s=0.2, stall_timeout_s=0.2, stall_pace_factor=1)
    wait_ready(supervisor)
    gate = gates.new()
    job = supervisor.submit(make_job(tmp_path, gates.encode_marker(gate)))
    wait_encoding(supervisor, [job])
    time.sleep(1.0)  # five times the stall and first-step limits
    assert worker(supervisor)["restarts"] == 0 and encoding(supervisor) == [job.id]
    gates.open(gate)
    assert job.wait_done(WAIT_S) and job.state is JobState.COMPLETED, job.error


def test_drain_waits_for_jobs_that_are_still_encoding(pool: PoolFactory, tmp_path: Path, gates: Gates) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    job = supervisor.submit(make_job(tmp_path, gates.encode_marker(gate)))
    wait_encoding(supervisor, [job])
    drain = threading.Thread(target=supervisor.drain, args=(WAIT_S,))
    drain.start()
    time.sleep(0.3)
    assert drain.is_alive() and not job.done  # an encoding job counts as running
    gates.open(gate)
    drain.join(WAIT_S)
    assert not drain.is_alive()
    assert job.state is JobState.COMPLETED, job.error


def test_a_worker_told_to_shut_down_writes_what_it_denoised_before_it_exits(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool()
    wait_ready(supervisor)
    gate = gates.new()
    job = supervisor.submit(make_job(tmp_path, gates.encode_marker(gate)))
    wait_encoding(supervisor, [job])
    supervisor.drain(0.0)  # no grace: the job fails for its client
    assert job.state is JobState.FAILED and isinstance(job.error, ShuttingDown)
    process = supervisor._slots[0].process
    shutdown = threading.Thread(target=supervisor.shutdown)
    shutdown.start()
    time.sleep(0.3)  # the worker has Shutdown by now and waits for its encoder
    assert process.is_alive() and not Path(job.request.output_path).exists()
    gates.open(gate)
    shutdown.join(WAIT_S)
    assert process.exitcode == 0  # it left by itself (shutdown kills with SIGKILL only after shutdown_timeout_s)
    assert red_of(job) == 7


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "inline"])
def test_an_image_that_cannot_be_written_fails_only_its_job(pool: PoolFactory, tmp_path: Path, overlap: bool) -> None:
    supervisor = pool(overlap_encoding=overlap)
    wait_ready(supervisor)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("the output folder is a file")
    bad = supervisor.submit(make_job(not_a_folder, "nowhere to write"))
    assert bad.wait_done(WAIT_S) and bad.state is JobState.FAILED and bad.error is not None
    assert bad.error.error_type == "job_failed" and "could not be encoded or written" in bad.error.message
    good = supervisor.submit(make_job(tmp_path, "somewhere to write"))
    assert good.wait_done(WAIT_S) and good.state is JobState.COMPLETED, good.error
    # /status is a snapshot the monitor publishes at the end of its turn, a moment after the job ends.
    wait_until(lambda: not encoding(supervisor), WAIT_S, 0.01, "no job left encoding")
    assert worker(supervisor)["restarts"] == 0


def test_without_overlap_the_worker_encodes_before_it_takes_the_next_job(
    pool: PoolFactory, tmp_path: Path, gates: Gates
) -> None:
    supervisor = pool(overlap_encoding=False)
    wait_ready(supervisor)
    gate = gates.new()
    held = supervisor.submit(make_job(tmp_path, gates.encode_marker(gate)))
    wait_until(lambda: held.step == 2, WAIT_S, 0.01, "the held job's last step")
    after = supervisor.submit(make_job(tmp_path, "after it", seed=2))
    time.sleep(0.3)
    view = worker(supervisor)
    assert (view["state"], view["current_job"], view["encoding_jobs"]) == ("busy", held.id, [])
    assert supervisor.queue_position(after) == 0
    gates.open(gate)
    for job in (held, after):
        assert job.wait_done(WAIT_S) and job.state is JobState.COMPLETED, job.error
    assert (after.started_at or 0) >= (held.finished_at or 0) - 1  # worker and API clocks are the same here
    assert [red_of(held), red_of(after)] == [7, 2]
