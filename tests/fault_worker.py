"""Fault injection: a worker whose pipeline misbehaves on request — the one place a fake pipeline is allowed.

Tests start the server through ``python -m tests.fault_server``; its workers run the real worker loop with the
real pipelines, except that a job whose prompt carries a marker fails the way a real GPU job can:
- ``[oom]``: raises MemoryError after its first step (what torch raises on CPU; CUDA's OutOfMemoryError is handled
  by the same path);
- ``[hang]``: finishes one step, then blocks forever in the main thread (heartbeats go on: only the stall shows);
- ``[slow]``: every step takes SLOW_STEP_S, then the real pipeline produces the image (a slow step is no hang);
- ``[crash]``: the process exits at once;
- ``[device-error]``: raises torch.AcceleratorError as CUDA does after an illegal memory access (the context is
  poisoned: the worker must fail the job and exit);
- ``[gate:NAME]``: waits before its first step until the file NAME exists in the folder named by the
  FAULT_GATE_DIR environment variable (the test opens the gate by creating it), then runs the real pipeline. A
  cancel stops it while it waits. This is how tests hold a worker busy for exactly as long as they need, on any
  machine, instead of a "blocker" job whose length depends on the CPU.
- ``[encode-gate:NAME]``: runs the real pipeline, then waits inside the worker's encoder (workers.encoder), before
  its PNG is encoded, until the gate NAME opens: the job is denoised and "encoding" for as long as the test needs,
  while the worker takes its next job. Nothing stops it but the gate (a cancel is too late by then). Also honoured
  by tests/scripted_worker.py.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from genserve.messages import JobRequest, JobResult, WorkerSpec

StepCallback = Callable[[int, int], None]

SLOW_STEP_S = 1.5
GATE_ENV = "FAULT_GATE_DIR"
_GATE = re.compile(r"\[gate:([\w.-]+)\]")
_ENCODE_GATE = re.compile(r"\[encode-gate:([\w.-]+)\]")
_GATE_POLL_S = 0.01


def gate_marker(name: str) -> str:
    return f"[gate:{name}]"


def encode_gate_marker(name: str) -> str:
    return f"[encode-gate:{name}]"


def open_gate(gate_dir: Path, name: str) -> None:
    (gate_dir / name).touch()


GateWait = Callable[[Sequence[JobRequest], StepCallback], None]


def _wait_for_file(path: Path) -> None:
    while not path.exists():
        time.sleep(_GATE_POLL_S)


def install_gates() -> GateWait:
    """Patch the worker's cancel board to note cancels and its encoder to honour [encode-gate:NAME]; return the wait
    for a job's [gate:NAME] marker."""
    from workers import encoder, main

    real_encode = encoder.encode

    def gated_encode(done: encoder.Denoised) -> JobResult:
        marker = _ENCODE_GATE.search(done.job.prompt)
        if marker is not None:
            _wait_for_file(Path(os.environ[GATE_ENV]) / marker.group(1))
        return real_encode(done)

    encoder.encode = gated_encode

    canceled: set[str] = set()
    canceled_lock = threading.Lock()
    real_cancel = main._CancelBoard.cancel

    real_cancel_current = main._CancelBoard.cancel_current

    def noting_cancel(board: Any, job_id: str) -> None:
        with canceled_lock:
            canceled.add(job_id)
        real_cancel(board, job_id)

    def noting_cancel_current(board: Any) -> None:  # Shutdown stops the current job this way
        with canceled_lock:
            canceled.update(board._current)
        real_cancel_current(board)

    def wait_for_gate(jobs: Sequence[JobRequest], on_step: StepCallback) -> None:
        marker = _GATE.search(jobs[0].prompt)  # the jobs of a batch share their prompt
        if marker is None:
            return
        gate = Path(os.environ[GATE_ENV]) / marker.group(1)
        answered: set[str] = set()
        while not gate.exists():
            with canceled_lock:
                newly = {job.job_id for job in jobs if job.job_id in canceled} - answered
            if newly:
                answered |= newly
                # The real callback answers the canceled jobs, and raises once no job of the call is left.
                on_step(1, jobs[0].num_inference_steps)
            time.sleep(_GATE_POLL_S)

    main._CancelBoard.cancel = noting_cancel  # type: ignore[method-assign]
    main._CancelBoard.cancel_current = noting_cancel_current  # type: ignore[method-assign]
    return wait_for_gate


def run_faulty_worker(spec: WorkerSpec, conn: Connection) -> None:
    import torch

    from workers import main, pipelines

    real_run = pipelines.PipelineSet.run
    wait_for_gate = install_gates()

    def faulty_run(self: Any, jobs: Sequence[JobRequest], on_step: StepCallback) -> Any:
        prompt, total = jobs[0].prompt, jobs[0].num_inference_steps  # the jobs of a batch share them
        wait_for_gate(jobs, on_step)
        if "[oom]" in prompt:
            on_step(1, total)
            raise MemoryError("injected: out of memory allocating the attention buffer")
        if "[device-error]" in prompt:
            on_step(1, total)
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")
        if "[hang]" in prompt:
            on_step(1, total)
            while True:
                time.sleep(3600)
        if "[slow]" in prompt:
            for step in range(1, total + 1):
                time.sleep(SLOW_STEP_S)
                on_step(step, total)
            return real_run(self, jobs, lambda step, total: None)
        if "[crash]" in prompt:
            os._exit(3)
        return real_run(self, jobs, on_step)

    pipelines.PipelineSet.run = faulty_run  # type: ignore[method-assign]
    main.run_worker(spec, conn)
