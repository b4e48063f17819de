"""A worker with a scripted pipeline, for the supervisor's in-process unit tests (fault injection only).

It runs the real worker loop (workers.main: pipes, heartbeats, cancel board, progress, results, exits), but its
"pipelines" load in no time and run no model, so a test can start, kill and restart workers by the dozen in
seconds. What a job does is written in its prompt, as for tests/fault_worker.py:
- ``[gate:NAME]``: hold before the first step until the test opens the gate (FAULT_GATE_DIR/NAME);
- ``[crash]``: the process exits at once; ``[fail]``: the pipeline raises ValueError;
- otherwise: each step is reported, and a small PNG is written to the job's output path.
Startup fails (WorkerStartupFailed, exit 1) while the file FAIL_STARTUP exists in the configured model.path.
"""

from __future__ import annotations

import io
import os
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from PIL import Image

from genserve.messages import JobRequest, Mode, WorkerSpec
from tests.fault_worker import install_gates

FAIL_STARTUP = "FAIL_STARTUP"


def run_scripted_worker(spec: WorkerSpec, conn: Connection) -> None:
    from workers import main, pipelines

    wait_for_gate = install_gates()

    class ScriptedPipelines:
        def __init__(self, device: str, modes: tuple[Mode, ...]) -> None:
            self.device, self.modes, self.embedded = device, modes, False

        @classmethod
        def load(cls, spec: WorkerSpec) -> ScriptedPipelines:
            if spec.model_path and (Path(spec.model_path) / FAIL_STARTUP).exists():
                raise RuntimeError("injected startup failure")
            return cls(spec.device, spec.modes)

        def run(self, job: JobRequest, on_step: Any) -> pipelines.JobOutput:
            wait_for_gate(job, on_step)
            if "[crash]" in job.prompt:
                os._exit(3)
            if "[fail]" in job.prompt:
                raise ValueError("injected pipeline failure")
            for step in range(1, job.num_inference_steps + 1):
                on_step(step, job.num_inference_steps)
            buffer = io.BytesIO()
            Image.new("RGB", (job.width, job.height), (job.seed % 256, 0, 0)).save(buffer, format="PNG")
            pipelines.write_atomically(Path(job.output_path), buffer.getvalue())
            return pipelines.JobOutput(len(buffer.getvalue()), job.width, job.height, 0.0, 0.0)

        def device_memory_mb(self) -> float:
            return 0.0

        def free_memory(self) -> None:
            pass

    pipelines.PipelineSet = ScriptedPipelines  # type: ignore[misc, assignment]
    main.run_worker(spec, conn)
