"""A supervisor with real worker processes running the scripted pipeline (tests/scripted_worker.py): the helpers
and the ``pool`` fixture of the supervisor tests (tests/unit/test_supervisor.py, tests/unit/test_batching.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genserve.config import Config
from genserve.jobs import Job, JobState
from genserve.messages import JobRequest
from genserve.supervisor import Supervisor
from tests.scripted_worker import run_scripted_worker
from tests.server import wait_until

WAIT_S = 30  # generous bound for anything a test waits for; passing runs take a fraction of it


def make_config(
    model_dir: Path,
    overlap_encoding: bool = True,
    max_batch: int = 4,
    batch_pixels: int = 1024 * 1024,
    limits: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    **workers: Any,
) -> Config:
    settings: dict[str, Any] = {
        "heartbeat_interval_s": 0.1,
        "restart_backoff_s": 0.05,
        "restart_backoff_max_s": 0.4,
        "shutdown_timeout_s": 5,
        "parallel_loads": 0,
    }
    settings.update(workers)
    return Config.model_validate(
        {
            "model": {"path": str(model_dir), "modes": ["text2img"]},
            "workers": settings,
            "performance": {"overlap_encoding": overlap_encoding, "max_batch": max_batch, "batch_pixels": batch_pixels},
            "limits": limits or {},
            "defaults": defaults or {},
        }
    )


def make_job(
    out: Path,
    prompt: str = "a cat",
    priority: int = 0,
    steps: int = 2,
    timeout_s: float = 60,
    seed: int = 7,
    group: str | None = None,
) -> Job:
    job_id = uuid.uuid4().hex
    request = JobRequest(
        job_id=job_id,
        mode="text2img",
        prompt=prompt,
        width=16,
        height=16,
        num_inference_steps=steps,
        guidance_scale=3.5,
        seed=seed,
        strength=0.8,
        input_image=None,
        mask_image=None,
        control_image=None,
        control_mode=None,
        controlnet_conditioning_scale=0.7,
        output_path=str(out / f"{job_id}.png"),
    )
    return Job.create(request, priority, timeout_s, group=group)


PoolFactory = Callable[..., Supervisor]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


@pytest.fixture
def pool(tmp_path: Path, model_dir: Path) -> Iterator[PoolFactory]:
    started: list[Supervisor] = []

    def start(workers: int = 1, on_fatal: Callable[[str], None] | None = None, **settings: Any) -> Supervisor:
        config = make_config(model_dir, **settings)
        supervisor = Supervisor(
            config, ["cpu"] * workers, ("text2img",), worker_target=run_scripted_worker, on_fatal=on_fatal
        )
        started.append(supervisor)
        supervisor.start()
        return supervisor

    yield start
    for supervisor in started:
        supervisor.shutdown()


def worker(supervisor: Supervisor, slot: int = 0) -> dict[str, Any]:
    state: dict[str, Any] = supervisor.status()["workers"][slot]
    return state


def wait_ready(supervisor: Supervisor, count: int | None = None) -> None:
    count = supervisor.total_workers() if count is None else count
    wait_until(lambda: supervisor.ready_count() >= count, WAIT_S, 0.01, f"{count} ready worker(s)")


def wait_busy(supervisor: Supervisor, job: Job) -> None:
    wait_until(lambda: job.state is JobState.RUNNING and job.started_at, WAIT_S, 0.01, f"job {job.id} to start")


def encoding(supervisor: Supervisor, slot: int = 0) -> list[str]:
    jobs: list[str] = worker(supervisor, slot)["encoding_jobs"]
    return jobs


def wait_encoding(supervisor: Supervisor, jobs: list[Job]) -> None:
    ids = [job.id for job in jobs]
    wait_until(lambda: encoding(supervisor) == ids, WAIT_S, 0.01, f"{ids} to be encoding")


def red_of(job: Job) -> int:
    with Image.open(job.request.output_path) as image:
        red: int = image.getpixel((0, 0))[0]
    return red
