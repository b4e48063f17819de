"""Cancel latency: how long from a cancel request to the job ending and its worker being free again.

A client-only benchmark (HTTP). Each trial submits a long job through POST /jobs, waits until it is running past
its second denoising step, cancels it (POST /jobs/{id}/cancel, which answers once the job has stopped) and then
polls /status until the worker is ready again. A running job stops at its next step, so the latency is bounded
by one denoising step: the step time is printed alongside.

Usage:
    python tools/bench_cancel.py                        # localhost:12411, 5 trials, 512x512, 100 steps
    python tools/bench_cancel.py --url http://127.0.0.1:12488 --trials 10 --size 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ToolError, add_connection_arguments, console, fail, make_session, request_json  # noqa: E402


@dataclass(frozen=True)
class Trial:
    job_ended_s: float  # cancel request sent → cancel response (job ended)
    worker_free_s: float  # cancel request sent → /status shows the worker ready
    step_s: float  # the job's seconds per step before the cancel (includes prompt encoding: an upper bound)


def _poll(session: requests.Session, url: str, timeout: float, what: str, check: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = request_json(session, "GET", url, timeout=10)
        found = check(body)
        if found:
            return found
        time.sleep(0.002)
    raise ToolError(f"timed out waiting for {what}")


def run_trial(session: requests.Session, base: str, size: int, steps: int, timeout: float) -> Trial:
    payload = {"prompt": "cancel benchmark", "width": size, "height": size, "num_inference_steps": steps}
    _, accepted = request_json(session, "POST", f"{base}/jobs", json=payload, timeout=timeout)
    task_id = accepted["task_id"]

    def running_past_step_two(view: dict[str, Any]) -> dict[str, Any] | None:
        if view["status"] in ("completed", "failed", "canceled"):
            raise ToolError(f"job ended ({view['status']}) before it could be cancelled; use more --steps")
        progress = view.get("progress") or {}
        return view if view["status"] == "running" and progress.get("step", 0) >= 2 else None

    view = _poll(session, f"{base}/jobs/{task_id}", timeout, "the job to run", running_past_step_two)
    worker = view["worker"]
    began = time.perf_counter()
    _, ended = request_json(session, "POST", f"{base}/jobs/{task_id}/cancel", timeout=timeout)
    job_ended = time.perf_counter() - began
    if ended["status"] != "canceled":
        raise ToolError(f"cancel answered with status {ended['status']!r}")

    def worker_ready(status: dict[str, Any]) -> bool:
        return bool(status["workers"][worker]["state"] == "ready")

    _poll(session, f"{base}/status", timeout, "the worker to be free", worker_ready)
    worker_free = time.perf_counter() - began
    progress = view["progress"]
    step_s = (progress["eta_s"] or 0) / max(1, progress["total_steps"] - progress["step"])
    return Trial(job_ended_s=job_ended, worker_free_s=worker_free, step_s=step_s)


def _summary(name: str, values: list[float]) -> str:
    return f"{name:<38} {statistics.median(values) * 1000:>9.1f} {max(values) * 1000:>9.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure cancel latency (cancel request → job ended → worker free) on a live GenServe.",
        epilog="Example: python tools/bench_cancel.py --url http://127.0.0.1:12411 --trials 10",
    )
    add_connection_arguments(parser)
    parser.add_argument("--trials", type=int, default=5, help="cancelled jobs to time (default 5)")
    parser.add_argument("--size", type=int, default=512, help="image width and height (default 512)")
    parser.add_argument("--steps", type=int, default=100, help="denoising steps of each job (default 100)")
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")
    session = make_session(args.api_key)
    try:
        _, status = request_json(session, "GET", f"{base}/status", timeout=10)
        devices = ", ".join(worker["device"] for worker in status["workers"])
        console.print(f"cancel latency against {base} (workers: {devices}); {args.size}² × {args.steps} steps")
        trials = [run_trial(session, base, args.size, args.steps, args.timeout) for _ in range(args.trials)]
    except ToolError as exc:
        fail(str(exc))
    console.print(f"{'metric (ms)':<38} {'p50':>9} {'max':>9}")
    console.print(_summary("cancel → job ended (response)", [t.job_ended_s for t in trials]))
    console.print(_summary("cancel → worker free (/status ready)", [t.worker_free_s for t in trials]))
    console.print(_summary("one denoising step (for scale)", [t.step_s for t in trials]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
