"""What the GPU check (tools/gpu_check.py) and the GPU benchmark (tools/bench_gpu.py) share to measure a GenServe
server of their own from the outside: a clock and log lines, device memory from nvidia-ml (or the server processes'
resident memory on a CPU), one server started, loaded, used and stopped under a peak-memory sampler, text2img jobs
through POST /generate, and the pieces of their reports. Neither imports genserve's worker code to measure: the
numbers are what a client and the machine see.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil
import requests

from _server import LocalServer, ServerError

GIB = 2**30  # every size here is in GiB, as the memory plan and nvidia-smi count
PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"
WARMUP_STEPS = 2  # the client's warm-up job before the timed runs: the timed size, this many steps
STARTED = time.monotonic()


# --- the clock -----------------------------------------------------------------------------------------------------


def clock_start() -> float:
    """The monotonic time this process's log lines count from."""
    return STARTED


def set_started(started: float) -> None:
    """A child process's log lines count from its parent's start (one monotonic clock for the whole machine)."""
    global STARTED
    STARTED = started


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


def time_left(budget_s: float) -> float:
    return budget_s - (time.monotonic() - STARTED)


def skip_reason(needs_gpu: bool, tiny: bool, budget_s: float, min_row_s: float) -> str | None:
    """Why a row of the table is not run: a CUDA-only setting on the CPU rehearsal, or too little budget left."""
    if needs_gpu and tiny:
        return "skipped: needs a CUDA GPU"
    if time_left(budget_s) < min_row_s:
        return f"skipped: the {budget_s:.0f} s budget is spent (--budget-s)"
    return None


# --- memory as seen from outside the server ------------------------------------------------------------------------


def nvml_index(device: str) -> int:
    """nvidia-ml's index of a cuda:N device (CUDA_VISIBLE_DEVICES may renumber them)."""
    ordinal = int(device.partition(":")[2] or 0)
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if visible and all(part.isdigit() for part in visible) and ordinal < len(visible):
        return int(visible[ordinal])
    return ordinal


def device_memory_reader(device: str) -> Callable[[], int]:
    """Bytes used on the whole card, every process and context included (nvidia-ml: no CUDA context of our own)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device))
    return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (the CPU stand-in for device memory)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class PeakSampler:
    """Samples a memory reading on a thread (every 50 ms) and keeps the highest."""

    def __init__(self, read: Callable[[], int], interval_s: float = 0.05) -> None:
        self._read = read
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory-sampler", daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a process vanishing mid-read is not an error
                self.peak = max(self.peak, self._read())
            if self._stop.wait(self._interval_s):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_released(device_memory: Callable[[], int], baseline_gib: float, timeout_s: float = 60) -> bool:
    """Until the card is back (within 0.5 GiB) at what it used before the server started."""
    deadline = time.monotonic() + timeout_s
    while device_memory() / GIB > baseline_gib + 0.5:
        if time.monotonic() > deadline:
            say(f"  the device still holds {device_memory() / GIB:.1f} GiB {timeout_s:.0f} s after the stop")
            return False
        time.sleep(0.5)
    return True


# --- jobs ----------------------------------------------------------------------------------------------------------


@dataclass
class JobOutcome:
    kind: str  # warm-up, text2img, fill, controlnet
    ok: bool
    seconds: float  # end to end, as the client sees it
    pipeline_s: float | None  # the worker's own figure (timings.pipeline_s): the diffusers call, decode included
    error: str | None
    encode_s: float | None = None  # the worker's PNG encoding (timings.encode_s): part of end to end, not pipeline


def text2img_fields(size: int, steps: int, timeout_s: float) -> dict[str, Any]:
    """The native request body of one size x size text2img job (the other modes add their images to it)."""
    return {
        "prompt": PROMPT,
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": 42,
        "timeout": timeout_s,
    }


def run_job(server: LocalServer, kind: str, fields: dict[str, Any], timeout_s: float) -> JobOutcome:
    """POST /generate, timed from the client's side: from sending the request to the whole answer received (the
    client's own JSON decoding of the answer is not counted)."""
    began = time.perf_counter()
    try:
        response = requests.post(server.url + "/generate", json=fields, timeout=timeout_s + 30)
        seconds = time.perf_counter() - began
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        return JobOutcome(kind, False, time.perf_counter() - began, None, f"{type(exc).__name__}: {exc}")
    ok = response.status_code == 200 and bool(body.get("success"))
    error = None if ok else f"HTTP {response.status_code} {body.get('error_type')}: {body.get('error')}"
    timings = body.get("timings") or {}
    outcome = JobOutcome(kind, ok, round(seconds, 3), timings.get("pipeline_s"), error, timings.get("encode_s"))
    pipeline_s = outcome.pipeline_s
    pipeline = f" (pipeline {pipeline_s:.2f} s)" if ok and pipeline_s is not None else ""
    say(f"  {kind:<10} {'ok' if ok else 'FAILED'} in {seconds:6.2f} s{pipeline}" + (f": {error}" if error else ""))
    return outcome


def run_jobs(
    server: LocalServer,
    jobs: Iterable[tuple[str, dict[str, Any]]],
    timeout_s: float,
    go_on: Callable[[list[JobOutcome]], bool] = lambda outcomes: True,
) -> list[JobOutcome]:
    """(kind, request body) in order; stops early when the server is gone, or when ``go_on(outcomes so far)`` says
    no more (a budget that is running out)."""
    outcomes: list[JobOutcome] = []
    for kind, fields in jobs:
        if outcomes and not go_on(outcomes):
            break
        outcome = run_job(server, kind, fields, timeout_s)
        outcomes.append(outcome)
        if not outcome.ok and not server_ready(server):
            outcomes.append(JobOutcome("rest", False, 0.0, None, "the server is no longer ready: jobs left out"))
            break
    return outcomes


def server_ready(server: LocalServer) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(f"{server.url}/ready", timeout=5).status_code == 200
    return False


def worker_status(server: LocalServer) -> dict[str, Any]:
    with contextlib.suppress(requests.RequestException, ValueError, IndexError, KeyError):
        return dict(server.status()["workers"][0])
    return {}


def server_pid(server: LocalServer) -> int:
    return server.process.pid if server.process else 0


# --- one server, measured ------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Measured:
    """One row of a report: a server started with one setting, measured while it ran, stopped."""

    key: str  # the row's short name: table, log and folder names
    title: str  # in words
    status: str = "skipped"  # ok | failed | skipped
    error: str | None = None
    plan: dict[str, Any] | None = None  # the worker's memory plan, as /status shows it
    speed: dict[str, Any] | None = None  # the worker's speed path, as /status shows it (attention, warm-up, cache)
    load_s: float | None = None  # spawn -> ready, client side
    worker_load_s: float | None = None  # the worker's own loading time (/status load_time_s), warm-up included
    baseline_gib: float | None = None  # memory in use before the server started
    peak_gib: float | None = None  # the highest reading while it ran
    released: bool | None = None  # the device was back at its baseline after the stop
    jobs: list[JobOutcome] = field(default_factory=list)
    server_log: str | None = None


def measure_server(
    result: Measured,
    config: dict[str, Any],
    out: Path,
    budget_s: float,
    ready_timeout_s: float,
    device_memory: Callable[[], int] | None,
    use: Callable[[LocalServer], list[JobOutcome]],
) -> None:
    """Start a server with ``config`` (in out/runs/KEY/server, log copied to out/server-KEY.log), sample its peak
    memory from spawn to stop, let ``use`` run its jobs, stop it. Fills ``result``; never raises (a failure is the
    result's error, and the next row runs)."""
    # The server's config, log and results sit three folders down; the top of out keeps the report and a copy of
    # each server's log.
    workdir = out / "runs" / result.key / "server"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    server = LocalServer(workdir, config)
    log_copy = out / f"server-{result.key}.log"
    result.server_log = str(log_copy)

    def read_memory() -> int:
        return device_memory() if device_memory else process_tree_rss(server_pid(server))

    result.baseline_gib = round(read_memory() / GIB, 2)
    say(f"{result.key} ({result.title}): starting the server on port {server.port}")
    with PeakSampler(read_memory) as sampler:
        try:
            result.load_s = round(server.start(max(10.0, min(ready_timeout_s, time_left(budget_s) - 30))), 1)
            worker = worker_status(server)
            result.plan, result.worker_load_s = worker.get("memory_plan"), worker.get("load_time_s")
            result.speed = worker.get("speed")
            say(f"  ready in {result.load_s:.1f} s; plan: {describe_plan(result.plan)}; speed: {result.speed}")
            result.jobs = use(server)
            failed = [f"{job.kind}: {job.error}" for job in result.jobs if not job.ok]
            result.status = "failed" if failed else "ok"
            result.error = "; ".join(failed) or None
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the next row runs
            result.status = "failed"
            result.error = str(exc) if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            result.plan = result.plan or worker_status(server).get("memory_plan")
            say(f"  FAILED: {result.error}")
            say(f"  last lines of {log_copy}:\n{indent(server.log_tail())}")
        finally:
            server.stop()
            with contextlib.suppress(OSError):
                shutil.copyfile(server.log_path, log_copy)
    result.peak_gib = round(sampler.peak / GIB, 2)
    if device_memory is not None:
        result.released = wait_released(device_memory, result.baseline_gib)
    say(f"  stopped; peak {result.peak_gib:.2f} GiB")


class Row(Protocol):
    """A setting a table has a row for (a memory strategy, a speed variant)."""

    @property
    def needs_gpu(self) -> bool: ...


R = TypeVar("R", bound=Row)
M = TypeVar("M", bound=Measured)


def measure_rows(
    rows: Sequence[R],
    results: list[M],
    run: Callable[[R], M],
    report: Callable[[], object],
    *,
    tiny: bool,
    budget_s: float,
    min_row_s: float,
) -> None:
    """Each row in turn: skipped (CUDA-only on the CPU rehearsal, or too little budget left: the result says why) or
    run; the report is rewritten after each, so a run cut short keeps what it finished."""
    for index, row in enumerate(rows):
        skipped = skip_reason(row.needs_gpu, tiny, budget_s, min_row_s)
        if skipped:
            results[index].error = skipped
        else:
            results[index] = run(row)
        report()


def give_up(results: Sequence[Measured], reason: str, report: Callable[[str], str]) -> int:
    """Nothing can be measured (no nvidia-ml, no family): every row says why, and the report is written all the
    same (``report(note)`` returns the table). Returns the exit code, 2."""
    say(reason)
    for result in results:
        result.error = f"not run: {reason}"
    print(report(reason), flush=True)
    return 2


def finish(out: Path, stem: str, table: str, results: Sequence[Measured]) -> int:
    """The closing lines and the exit code: 0 when every row that ran went well (and one did), else 1."""
    say(f"done; report in {out / (stem + '.md')} and {out / (stem + '.json')}")
    print("\n" + table, flush=True)
    ran = [result for result in results if result.status != "skipped"]
    return 0 if ran and all(result.status == "ok" for result in ran) else 1


def describe_plan(plan: dict[str, Any] | None) -> str:
    if not plan:
        return "none reported"
    return f"{plan.get('setting')}, {cell(planned_gib(plan), 2)} GiB of {plan.get('device_available_gib')} GiB"


def planned_gib(plan: dict[str, Any] | None) -> float | None:
    """The plan's device memory in GiB (MemoryPlan.as_dict gave GB, 1e9 bytes, before it moved to GiB)."""
    if not plan:
        return None
    if plan.get("device_gib") is not None:
        return float(plan["device_gib"])
    return float(plan["device_gb"]) * 1e9 / GIB if plan.get("device_gb") is not None else None


# --- the report ----------------------------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The options both tools take: the CPU rehearsal, where things go, the family's reuse and the time budget."""
    parser.add_argument("--tiny", action="store_true", help=f"a small family on the CPU: the rehearsal of this {what}")
    parser.add_argument("--out", type=Path, default=None, help="report, logs and server files (default: by profile)")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the family is built (default: by profile)")
    parser.add_argument("--rebuild", action="store_true", help="build the family even if a complete one is there")
    parser.add_argument(
        "--budget-s", type=float, default=None, help=f"seconds for the whole {what} (default: by profile)"
    )


def pick_rows(names: str, default: Iterable[str], known: Iterable[str], what: str) -> list[str]:
    """The keys a comma-separated --strategies / --variants names (the default when empty); unknown keys exit."""
    keys = [key.strip() for key in names.split(",") if key.strip()] or list(default)
    choices = list(known)
    unknown = [key for key in keys if key not in choices]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(choices)}")
    return keys


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in ("torch", "diffusers", "transformers", "accelerate", "torchao", "bitsandbytes", "fastapi"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def machine(gpu_device: str | None) -> dict[str, Any]:
    """CPUs and RAM; the card's name, memory and driver when ``gpu_device`` (cuda:N) is given."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1)}
    if gpu_device is not None:
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(gpu_device))
            info["gpu"] = pynvml.nvmlDeviceGetName(handle)
            info["gpu_memory_gib"] = round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 1)
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    return info


def report_heading(title: str, host: dict[str, Any]) -> list[str]:
    """The report's first lines: what ran where, with which versions."""
    what = f"{host['gpu']}, {host.get('gpu_memory_gib')} GiB" if "gpu" in host else f"{host['cpus']} CPUs"
    return [f"# {title}: {what}", "", f"versions: {', '.join(f'{k} {v}' for k, v in versions().items() if v)}", ""]


def write_outputs(out: Path, stem: str, markdown: str, payload: dict[str, Any]) -> None:
    """stem.md and stem.json in out (rewritten after each row, so a run cut short keeps what it finished)."""
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def markdown_rows(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def error_cell(error: str | None) -> str:
    return (error or "").replace("|", "/").replace("\n", " ")[:300] or "—"


def cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def indent(text: str) -> str:
    return "\n".join(f"    | {line}" for line in text.splitlines())
