"""A worker with a scripted pipeline, for the supervisor's in-process unit tests (fault injection only).

It runs the real worker loop (workers.main: pipes, heartbeats, cancel board, progress, results, exits), but its
"pipelines" load in no time and run no model, so a test can start, kill and restart workers by the dozen in
seconds. What a job does is written in its prompt, as for tests/fault_worker.py:
- ``[gate:NAME]``: hold before the first step until the test opens the gate (FAULT_GATE_DIR/NAME);
- ``[encode-gate:NAME]``: hold in the worker's encoder, denoised, until the test opens the gate;
- ``[crash]``: the process exits at once; ``[fail]``: the pipeline raises ValueError;
- otherwise: each step is reported, and a small image goes to the real encoder (workers.encoder), which writes the
  PNG to the job's output path.
Startup fails (WorkerStartupFailed, exit 1) while the file FAIL_STARTUP exists in the configured model.path; with
REFUSE_PLAN there instead, the worker makes a real memory plan for the FLUX.1-dev family on a 1 GB card, reports it
and refuses to load, as a worker whose models do not fit does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from PIL import Image

from genserve.messages import JobRequest, MemoryPlan, Mode, WorkerSpec
from tests.fault_worker import install_gates
from workers.speed import CompileStats

FAIL_STARTUP = "FAIL_STARTUP"
REFUSE_PLAN = "REFUSE_PLAN"


def _plan_for_a_tiny_card(spec: WorkerSpec) -> MemoryPlan:
    from genserve import memory_plan

    shapes = memory_plan.shapes_from_family(memory_plan.enabled_components(spec.modes))
    return memory_plan.plan_memory(spec.memory, shapes, memory_plan.card_device_info(1), "bf16")


def run_scripted_worker(spec: WorkerSpec, conn: Connection) -> None:
    from workers import main, pipelines

    wait_for_gate = install_gates()

    class ScriptedPipelines:
        def __init__(self, device: str, modes: tuple[Mode, ...]) -> None:
            self.device, self.modes, self.embedded = device, modes, False
            self.attention = "native"
            self.compile_stats = CompileStats(warmup_s=0.0, cache_hits=0, cache_misses=0)

        @classmethod
        def load(cls, spec: WorkerSpec, on_plan: Callable[[MemoryPlan], None], **_: Any) -> ScriptedPipelines:
            if spec.model_path and (Path(spec.model_path) / FAIL_STARTUP).exists():
                raise RuntimeError("injected startup failure")
            if spec.model_path and (Path(spec.model_path) / REFUSE_PLAN).exists():
                plan = _plan_for_a_tiny_card(spec)
                on_plan(plan)
                raise pipelines.MemoryPlanRefusedError(plan)
            return cls(spec.device, spec.modes)

        def run(self, jobs: Sequence[JobRequest], on_step: Any) -> list[pipelines.JobOutput]:
            wait_for_gate(jobs, on_step)
            first = jobs[0]
            if "[crash]" in first.prompt:
                os._exit(3)
            if "[fail]" in first.prompt:
                raise ValueError("injected pipeline failure")
            for step in range(1, first.num_inference_steps + 1):
                on_step(step, first.num_inference_steps)
            pictures = [Image.new("RGB", (job.width, job.height), (job.seed % 256, 0, 0)) for job in jobs]
            return [pipelines.JobOutput(image=picture, pipeline_s=0.0) for picture in pictures]

        def device_memory_mb(self) -> float:
            return 0.0

        def free_memory(self) -> None:
            pass

    pipelines.PipelineSet = ScriptedPipelines  # type: ignore[misc, assignment]
    main.run_worker(spec, conn)
