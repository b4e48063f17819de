"""Fault injection: a worker whose pipeline misbehaves on request — the one place a fake pipeline is allowed.

Tests start the server through ``python -m tests.fault_server``; its workers run the real worker loop with the
real pipelines, except that a job whose prompt carries a marker fails the way a real GPU job can:
- ``[oom]``: raises MemoryError after its first step (what torch raises on CPU; CUDA's OutOfMemoryError is handled
  by the same path);
- ``[hang]``: finishes one step, then blocks forever in the main thread (heartbeats go on: only the stall shows);
- ``[slow]``: every step takes SLOW_STEP_S, then the real pipeline produces the image (a slow step is no hang);
- ``[crash]``: the process exits at once.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any

from genserve.messages import JobRequest, WorkerSpec

SLOW_STEP_S = 1.5


def run_faulty_worker(spec: WorkerSpec, conn: Connection) -> None:
    from workers import main, pipelines

    real_run = pipelines.PipelineSet.run

    def faulty_run(self: Any, job: JobRequest, on_step: Any) -> Any:
        total = job.num_inference_steps
        if "[oom]" in job.prompt:
            on_step(1, total)
            raise MemoryError("injected: out of memory allocating the attention buffer")
        if "[hang]" in job.prompt:
            on_step(1, total)
            while True:
                time.sleep(3600)
        if "[slow]" in job.prompt:
            for step in range(1, total + 1):
                time.sleep(SLOW_STEP_S)
                on_step(step, total)
            return real_run(self, job, lambda step, total: None)
        if "[crash]" in job.prompt:
            os._exit(3)
        return real_run(self, job, on_step)

    pipelines.PipelineSet.run = faulty_run  # type: ignore[method-assign]
    main.run_worker(spec, conn)
