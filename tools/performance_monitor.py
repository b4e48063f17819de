#!/usr/bin/env python3
"""Watch a running GenServe and the machine it runs on: one sample, a continuous log, trend plots.

Each sample holds:

- the machine: system CPU % and memory (psutil), and per NVIDIA GPU its memory and utilisation (NVML, through
  ``pynvml``; without the library, the driver or a device the sample says "no NVIDIA GPU" and goes on);
- the service, from ``GET /status``: status, alive and dead workers, total restarts, queue size, each worker's state;
- the server's own processes: the workers, found by the pids that ``/status`` lists, and the API process, found as
  the workers' parent and confirmed by its listening socket on the URL's port. Their CPU % and RSS (and GPU memory,
  where NVML reports it per process) are read with psutil. This needs the server on this machine; for another host
  the sample says why it has no process figures. Nothing is found by matching command lines.

Modes:

- ``--once`` (the default): one sample as tables.
- ``--continuous [INTERVAL [PLOT_INTERVAL]]``: a sample every INTERVAL seconds (default 30), one summary line each
  on stdout, and a PNG of the trends every PLOT_INTERVAL seconds (default 300) and at exit, until Ctrl-C or SIGTERM.
- ``--plot``: draw the PNG from the samples recorded with ``--out`` and exit.

CPU % covers the time since the previous sample (the first sample measures over half a second). A process's CPU %
is relative to one core, so a busy multi-threaded process can show more than 100; system CPU % is relative to all
cores.

This is a client tool: it speaks HTTP to the server and never imports genserve or the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import signal
import socket
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

import psutil
import requests
from rich import box
from rich.table import Table
from rich.text import Text

from _cli import ToolError, add_connection_arguments, console, error_console, fail, make_session, request_json
from _procs import api_process_of, listens_on

Sample = dict[str, Any]

DEFAULT_INTERVAL_S = 30
DEFAULT_PLOT_INTERVAL_S = 300
DEFAULT_PLOT_FILE = "genserve_performance.png"
CPU_WINDOW_S = 0.5  # measuring window of a first CPU reading (system or a newly seen process)
MIN_CONTINUOUS_TIMEOUT_S = 5.0  # in continuous mode a /status request waits min(--timeout, max(this, INTERVAL))
HISTORY_LIMIT = 100_000  # samples kept in memory for the plot in continuous mode (about 35 days at 30 s)
GIB = 1024**3
MIB = 1024**2
WORKER_FIELDS = ("slot", "pid", "device", "state", "restarts", "current_job", "jobs_done", "last_heartbeat_s")

EPILOG = f"""\
examples:
  %(prog)s                               # one sample of localhost:12411 and this machine
  %(prog)s --url http://gpu-box:12411 --out samples.jsonl   # another server; append the sample to a file
  %(prog)s --continuous                  # every {DEFAULT_INTERVAL_S} s; plot every {DEFAULT_PLOT_INTERVAL_S} s, at exit
  %(prog)s --continuous 30 600           # every 30 s; plot every 10 minutes
  %(prog)s --continuous 5 60 --out run.jsonl --plot-file run.png
  %(prog)s --continuous 1 0 --samples 10 # ten samples a second apart; plot only at the end
  %(prog)s --plot --out run.jsonl --plot-file run.png   # redraw the plot from recorded samples

output:
  --once prints tables. --continuous prints one line per sample on stdout (time, CPU, memory, GPU memory per
  device or "no GPU", queue, alive/dead workers, restarts, service status); notices go to stderr.
  --out appends every sample as one JSON object per line; the plot shows GPU memory per device, system memory,
  CPU and GPU utilisation, queue size, workers and total restarts over time.
  Process figures (CPU %%, RSS) need the server on this machine; CPU %% covers the time since the previous sample.
  In --continuous mode a /status request waits at most min(--timeout, max({MIN_CONTINUOUS_TIMEOUT_S:g}, INTERVAL)) \
seconds.

when the server cannot be reached:
  --once fails at once. --continuous keeps sampling the machine, prints the sample's line with "service
  unreachable: <reason>" and goes on, so a server restart or a late start is simply a gap in the log; at the end
  it exits 1 if no sample ever reached the server (a wrong --url does not pass unnoticed).

exit status:
  0  sampled (or plotted); a degraded or down service is reported, not an error
  1  the server could not be reached or answered /status with an error (--once), no sample of a --continuous run
     reached it, --plot found no samples, or a file could not be written
  2  bad command line
  130 interrupted (--once, --plot); Ctrl-C and SIGTERM end --continuous normally, with the final plot
"""


# --- command line --------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows --continuous as taking at most two values (argparse would print '[INTERVAL [PLOT_INTERVAL ...]]')."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.dest == "continuous":
            return "[INTERVAL [PLOT_INTERVAL]]"
        return super()._format_args(action, default_metavar)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="performance_monitor.py",
        description="Sample GenServe (GET /status), its processes and this machine's CPU, memory and NVIDIA GPUs.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    add_connection_arguments(parser)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--once", action="store_true", help="take one sample and print it as tables (the default)")
    modes.add_argument(
        "--continuous",
        nargs="*",
        type=int,
        help=f"sample every INTERVAL seconds (default {DEFAULT_INTERVAL_S}) until Ctrl-C or SIGTERM, one line per "
        f"sample; write the plot every PLOT_INTERVAL seconds (default {DEFAULT_PLOT_INTERVAL_S}; 0: only at exit) "
        "and at exit",
    )
    modes.add_argument("--plot", action="store_true", help="draw the plot from the samples in --out FILE and exit")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="append every sample to FILE as a JSON line (--once, --continuous); the samples --plot reads",
    )
    parser.add_argument(
        "--plot-file",
        type=Path,
        metavar="PATH",
        help=f"where --continuous and --plot write the PNG (default {DEFAULT_PLOT_FILE}); replaced atomically",
    )
    parser.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help="with --continuous: stop after N samples (for scripts and tests; default: run until stopped)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.continuous is not None:
        args.interval, args.plot_interval = continuous_values(parser, args.continuous)
    if args.samples is not None and args.continuous is None:
        parser.error("--samples needs --continuous")
    if args.samples is not None and args.samples < 1:
        parser.error(f"--samples must be at least 1, not {args.samples}")
    if args.plot and args.out is None:
        parser.error("--plot needs --out FILE: the samples recorded by --once/--continuous --out FILE")
    if args.plot_file is not None and args.continuous is None and not args.plot:
        parser.error("--once draws no plot; --plot-file goes with --continuous or --plot")
    if args.plot_file is None:
        args.plot_file = Path(DEFAULT_PLOT_FILE)
    args.url = args.url.rstrip("/")
    return args


def continuous_values(parser: argparse.ArgumentParser, values: list[int]) -> tuple[int, int]:
    if len(values) > 2:
        parser.error(f"--continuous takes at most two values, INTERVAL and PLOT_INTERVAL, not {len(values)}")
    interval = values[0] if values else DEFAULT_INTERVAL_S
    plot_interval = values[1] if len(values) > 1 else DEFAULT_PLOT_INTERVAL_S
    if interval < 1:
        parser.error(f"--continuous INTERVAL must be at least 1 second, not {interval}")
    if plot_interval < 0:
        parser.error(f"--continuous PLOT_INTERVAL must be 0 (plot only at exit) or more seconds, not {plot_interval}")
    return interval, plot_interval


# --- the service ---------------------------------------------------------------------------------------------


def fetch_service(session: requests.Session, base: str, timeout: float) -> dict[str, Any]:
    """GET /status → the service part of a sample. Unreachable, an error answer or a foreign body → ToolError."""
    _, body = request_json(session, "GET", f"{base}/status", timeout=timeout)
    return summarize_status(body, f"{base}/status")


def summarize_status(body: Any, where: str) -> dict[str, Any]:
    if not (
        isinstance(body, dict)
        and isinstance(body.get("concurrent_manager"), dict)
        and isinstance(body.get("workers"), list)
    ):
        raise ToolError(f"{where} did not answer with GenServe's status (no concurrent_manager and workers)")
    manager = body["concurrent_manager"]
    queue = body["queue"] if isinstance(body.get("queue"), dict) else {}
    model = body["model"] if isinstance(body.get("model"), dict) else {}
    return {
        "reachable": True,
        "error": None,
        "status": body.get("status"),
        "alive_workers": manager.get("alive_processes"),
        "dead_workers": manager.get("dead_processes"),
        "total_restarts": manager.get("total_restarts"),
        "queue_size": manager.get("global_queue_size", queue.get("size")),
        "queue_max_size": queue.get("max_size"),
        "uptime_s": body.get("uptime_s"),
        "model_id": model.get("model_id"),
        "embedded_test_model": model.get("embedded_test_model"),
        "workers": [{key: w.get(key) for key in WORKER_FIELDS} for w in body["workers"] if isinstance(w, dict)],
    }


def clearer(exc: ToolError) -> str:
    """exc's message, ending in the root cause of a connection failure (say "Connection refused") instead of the head
    of urllib3's long text that request_json keeps."""
    message = str(exc)
    reason = root_strerror(exc.__context__)  # request_json raises `from None`: the requests error is the context
    if not message.startswith("cannot reach ") or reason is None:
        return message
    return f"{message.split(' (', 1)[0]} ({reason})"


def root_strerror(error: BaseException | None) -> str | None:
    """The strerror of the OS error at the bottom of a requests/urllib3 exception, found through causes and args."""
    for _ in range(10):
        if error is None:
            return None
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        nested = next((arg for arg in error.args if isinstance(arg, BaseException)), None)
        reason = getattr(error, "reason", None)
        error = error.__cause__ or nested or (reason if isinstance(reason, BaseException) else None)
    return None


def unreachable_service(error: str) -> dict[str, Any]:
    return {"reachable": False, "error": error, "workers": []}


# --- NVIDIA GPUs ---------------------------------------------------------------------------------------------


class GpuProbe:
    """NVML, initialised once. Any failure (no library, no driver, no device) becomes a note, never an exception."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.note: str | None = None
        self._start()

    def _start(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.note = "no NVIDIA GPU (nvidia-ml-py is not installed)"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, OSError, ...
            self.note = f"no NVIDIA GPU (NVML: {exc})"
            return
        try:
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:
            count, self.note = 0, f"no NVIDIA GPU (NVML: {exc})"
        if count == 0:
            self.note = self.note or "no NVIDIA GPU (NVML sees no device)"
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            return
        self._nvml = pynvml

    def sample(self) -> tuple[list[dict[str, Any]], dict[int, int]]:
        """Per device: memory and utilisation; and GPU memory per pid, summed over the devices."""
        if self._nvml is None:
            return [], {}
        gpus: list[dict[str, Any]] = []
        by_pid: dict[int, int] = {}
        try:
            count = self._nvml.nvmlDeviceGetCount()
        except Exception as exc:
            return [{"index": None, "error": f"NVML: {exc}"}], {}
        for index in range(count):
            gpus.append(self._device(index, by_pid))
        return gpus, by_pid

    def _device(self, index: int, by_pid: dict[int, int]) -> dict[str, Any]:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:
            return {"index": index, "error": f"NVML: {exc}"}
        try:
            utilization: float | None = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # not supported (MIG instances, some boards)
            utilization = None
        with contextlib.suppress(Exception):
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.usedGpuMemory is not None:
                    by_pid[proc.pid] = by_pid.get(proc.pid, 0) + int(proc.usedGpuMemory)
        return {
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_used_bytes": int(memory.used),
            "memory_total_bytes": int(memory.total),
            "utilization_percent": utilization,
        }

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


# --- the server's processes ----------------------------------------------------------------------------------


def is_local_host(host: str) -> bool:
    """Whether host names this machine (a loopback address or one of its interfaces' addresses)."""
    try:
        addresses = {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    local = {addr.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for addr in addrs}
    for address in addresses:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(address).is_loopback or address in local:
                return True
    return False


Tracked = tuple[str, int | None, psutil.Process]  # role ("api" or "worker"), worker slot, process


class ProcessFinder:
    """Finds the server's processes by the worker pids in /status and keeps them between samples."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._local: bool | None = None
        self._cache: dict[int, psutil.Process] = {}
        self._tracked: list[Tracked] = []

    def find(self, service: dict[str, Any]) -> tuple[list[Tracked], str | None]:
        """The processes to measure, and a note when some or all could not be found."""
        if self._local is None:
            self._local = is_local_host(self._host)
        if not self._local:
            return [], f"server host {self._host} is not this machine: no process figures"
        if not service["reachable"]:  # keep measuring what is left of the last known processes
            self._tracked = [t for t in self._tracked if t[2].is_running()]
            return self._tracked, None
        workers, missing = self._workers(service["workers"])
        api, note, foreign = self._api([proc for _, _, proc in workers])
        if foreign:
            self._tracked = []
            return [], note
        self._tracked = ([("api", None, api)] if api is not None else []) + workers
        self._cache = {proc.pid: proc for _, _, proc in self._tracked}  # forget the processes of past workers
        if missing:
            note = "; ".join(filter(None, [note, f"worker pid(s) {', '.join(map(str, missing))} not found here"]))
        return self._tracked, note

    def _workers(self, workers: list[dict[str, Any]]) -> tuple[list[Tracked], list[int]]:
        found: list[Tracked] = []
        missing: list[int] = []
        for worker in workers:
            pid = worker.get("pid")
            if not isinstance(pid, int):
                continue
            proc = self._process(pid)
            if proc is None:
                missing.append(pid)
            else:
                found.append(("worker", worker.get("slot"), proc))
        return found, missing

    def _api(self, workers: list[psutil.Process]) -> tuple[psutil.Process | None, str | None, bool]:
        """(the workers' API process, a note, whether the pids turned out not to be this server's).

        The parent counts as the API process when it listens on the URL's port. When it visibly does not, the pids
        in /status belong to some other process tree here (a server in a container, say) and none is measured.
        """
        parents: set[int] = set()
        for proc in workers:
            api_process = api_process_of(proc)
            if api_process is not None:
                parents.add(api_process.pid)
        if not parents:  # every worker is dead: keep the API process found before, if it still runs
            previous = next((p for role, _, p in self._tracked if role == "api" and p.is_running()), None)
            return previous, None if previous else "no live worker, so the API process was not found", False
        api = self._process(parents.pop()) if len(parents) == 1 else None
        if api is None:
            return None, "the workers have no single parent: API process not found", False
        listening = listens_on(api, self._port)
        if listening is False:
            note = f"the workers' parent (pid {api.pid}) does not listen on port {self._port}: the pids in /status "
            return None, note + "are not this server's processes here (a container?), no process figures", True
        if listening is None:
            return api, f"could not confirm that pid {api.pid} listens on port {self._port} (access denied)", False
        return api, None, False

    def _process(self, pid: int) -> psutil.Process | None:
        proc = self._cache.get(pid)
        if proc is not None and proc.is_running():
            return proc
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            self._cache.pop(pid, None)
            return None
        self._cache[pid] = proc
        return proc


# --- sampling ------------------------------------------------------------------------------------------------


class Sampler:
    """Takes samples. Keeps psutil and NVML state between them, so CPU % covers the time since the last one."""

    def __init__(self, session: requests.Session, base: str, timeout: float) -> None:
        self.base = base
        self._session = session
        self._timeout = timeout
        self._gpus = GpuProbe()
        self._finder = ProcessFinder(base)
        self._system_primed = False
        self._primed: set[psutil.Process] = set()

    def take(self, require_service: bool) -> Sample:
        """One sample. require_service: an unreachable server raises ToolError instead of being recorded."""
        now = time.time()
        try:
            service = fetch_service(self._session, self.base, self._timeout)
        except ToolError as exc:
            if require_service:
                raise ToolError(clearer(exc)) from None
            service = unreachable_service(clearer(exc))
        tracked, process_note = self._finder.find(service)
        self._prime_cpu([proc for _, _, proc in tracked])
        memory = psutil.virtual_memory()
        gpus, gpu_by_pid = self._gpus.sample()
        return {
            "timestamp": round(now, 3),
            "time": datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "url": self.base,
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory": {
                "used_bytes": memory.total - memory.available,
                "total_bytes": memory.total,
                "percent": memory.percent,
            },
            "gpus": gpus,
            "gpu_note": self._gpus.note,
            "service": service,
            "processes": measure_processes(tracked, gpu_by_pid),
            "process_note": process_note,
        }

    def _prime_cpu(self, processes: list[psutil.Process]) -> None:
        """First CPU readings mean nothing: start the counters of new processes and wait a short window."""
        fresh = [proc for proc in processes if proc not in self._primed]
        if self._system_primed and not fresh:
            return
        if not self._system_primed:
            psutil.cpu_percent(interval=None)
        for proc in fresh:
            with contextlib.suppress(psutil.Error):
                proc.cpu_percent(interval=None)
        self._system_primed = True
        self._primed = set(processes)
        time.sleep(CPU_WINDOW_S)

    def close(self) -> None:
        self._gpus.close()


def measure_processes(tracked: Iterable[Tracked], gpu_by_pid: dict[int, int]) -> list[dict[str, Any]]:
    rows = []
    for role, slot, proc in tracked:
        try:
            with proc.oneshot():
                cpu: float | None = proc.cpu_percent(interval=None)
                rss: int | None = proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue  # gone since /status listed it
        except psutil.AccessDenied:
            cpu = rss = None
        rows.append(
            {
                "role": role,
                "slot": slot,
                "pid": proc.pid,
                "cpu_percent": cpu,
                "rss_bytes": rss,
                "gpu_memory_bytes": gpu_by_pid.get(proc.pid),
            }
        )
    return rows


# --- text output ---------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = "", unit: str = "", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return f"{value:{spec}}{unit}"


def gib(value: Any) -> str:
    return fmt(value / GIB if isinstance(value, (int, float)) else None, ".1f")


def process_label(row: dict[str, Any]) -> str:
    return "api" if row["role"] == "api" else f"worker {fmt(row.get('slot'))}"


def print_sample(sample: Sample) -> None:
    """--once: the sample as tables."""
    console.print(Text(f"GenServe performance sample  {sample['time']}  {sample['url']}", style="bold"))
    service = sample["service"]
    console.print(service_table(service))
    if service["workers"]:
        console.print(workers_table(service["workers"]))
    console.print(machine_table(sample))
    processes = processes_table(sample["processes"], bool(sample["gpus"])) if sample["processes"] else None
    if processes is not None:
        console.print(processes)
    if sample["process_note"] or processes is None:
        console.print(Text(f"server processes: {sample['process_note'] or 'none found'}", style="yellow"))


def key_value_table(title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    return table


def service_table(service: dict[str, Any]) -> Table:
    table = key_value_table("Service")
    table.add_row("status", fmt(service["status"]))
    model = fmt(service["model_id"]) + (" (embedded test model)" if service["embedded_test_model"] else "")
    table.add_row("model", model)
    table.add_row("uptime", fmt(service["uptime_s"], ".0f", " s"))
    table.add_row("queue size", f"{fmt(service['queue_size'])} (max {fmt(service['queue_max_size'])})")
    table.add_row("workers", f"{fmt(service['alive_workers'])} alive, {fmt(service['dead_workers'])} dead")
    table.add_row("total restarts", fmt(service["total_restarts"]))
    return table


def workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title="Workers", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("slot", "pid", "device", "state", "restarts", "jobs done", "current job", "heartbeat"):
        table.add_column(name, justify="left" if name in ("device", "state", "current job") else "right")
    for w in workers:
        job = w["current_job"]
        table.add_row(
            fmt(w["slot"]),
            fmt(w["pid"]),
            fmt(w["device"]),
            fmt(w["state"]),
            fmt(w["restarts"]),
            fmt(w["jobs_done"]),
            job[:8] if isinstance(job, str) else "-",
            fmt(w["last_heartbeat_s"], ".1f", " s ago"),
        )
    return table


def machine_table(sample: Sample) -> Table:
    table = key_value_table("Machine")
    memory = sample["memory"]
    table.add_row("CPU", f"{sample['cpu_percent']:.1f} %")
    table.add_row(
        "memory", f"{gib(memory['used_bytes'])} / {gib(memory['total_bytes'])} GiB ({memory['percent']:.1f} %)"
    )
    for gpu in sample["gpus"]:
        table.add_row(f"GPU {fmt(gpu.get('index'))}", gpu_text(gpu))
    if not sample["gpus"]:
        table.add_row("GPU", sample["gpu_note"] or "no NVIDIA GPU")
    return table


def gpu_text(gpu: dict[str, Any]) -> str:
    if gpu.get("error"):
        return str(gpu["error"])
    used, total = gpu["memory_used_bytes"], gpu["memory_total_bytes"]
    percent = 100 * used / total if total else math.nan
    utilization = fmt(gpu["utilization_percent"], ".0f", " %")
    return f"{gpu['name']}: {gib(used)} / {gib(total)} GiB ({percent:.1f} %), utilisation {utilization}"


def processes_table(rows: list[dict[str, Any]], with_gpu: bool) -> Table:
    table = Table(title="Server processes", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("process")
    for name in ("pid", "CPU %", "RSS MiB") + (("GPU MiB",) if with_gpu else ()):
        table.add_column(name, justify="right")
    for row in rows:
        cells = [process_label(row), str(row["pid"]), fmt(row["cpu_percent"], ".1f"), mib(row["rss_bytes"])]
        table.add_row(*cells, *([mib(row["gpu_memory_bytes"])] if with_gpu else []))
    return table


def mib(value: Any) -> str:
    return fmt(value / MIB if isinstance(value, (int, float)) else None, ".0f")


def summary_line(sample: Sample) -> Text:
    """--continuous: one line per sample."""
    memory = sample["memory"]
    text = Text(f"{datetime.fromtimestamp(sample['timestamp']):%H:%M:%S}")
    text.append(f"  cpu {sample['cpu_percent']:5.1f}%")
    text.append(f"  mem {gib(memory['used_bytes'])}/{gib(memory['total_bytes'])} GiB ({memory['percent']:.0f}%)")
    for gpu in sample["gpus"]:
        if gpu.get("error"):
            text.append(f"  gpu{fmt(gpu.get('index'))} error", style="yellow")
        else:
            used, total = gib(gpu["memory_used_bytes"]), gib(gpu["memory_total_bytes"])
            text.append(f"  gpu{gpu['index']} {used}/{total} GiB {fmt(gpu['utilization_percent'], '.0f', '%')}")
    if not sample["gpus"]:
        text.append("  no GPU")
    service = sample["service"]
    if not service["reachable"]:
        text.append(f"  | service unreachable: {service['error']}", style="bold yellow")
        return text
    text.append(f"  | queue {fmt(service['queue_size'])}")
    text.append(f"  workers {fmt(service['alive_workers'])} alive/{fmt(service['dead_workers'])} dead")
    text.append(f"  restarts {fmt(service['total_restarts'])}")
    status = fmt(service["status"])
    text.append(f"  {status}", style="green" if status == "running" else "bold yellow")
    return text


def notice(message: str) -> None:
    error_console.print(Text(message, style="dim"), soft_wrap=True)


# --- recording -----------------------------------------------------------------------------------------------


class Recorder:
    """Appends samples to a JSON-lines file (or does nothing without --out)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            try:
                self._file = open(path, "a", encoding="utf-8")  # kept open for the whole run
            except OSError as exc:
                raise ToolError(f"cannot open --out {path}: {exc.strerror or exc}") from None

    def write(self, sample: Sample) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(sample, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:
            raise ToolError(f"cannot write to --out {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def load_samples(path: Path) -> list[Sample]:
    """The samples of a JSON-lines file, oldest first. Lines that are not samples (a torn last line) are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ToolError(f"no samples file {path}: record samples first with --once/--continuous --out {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolError(f"cannot read samples file {path}: {exc}") from None
    samples: list[Sample] = []
    skipped = 0
    for line in filter(str.strip, lines):
        try:
            sample = json.loads(line)
        except ValueError:
            sample = None
        if isinstance(sample, dict) and isinstance(sample.get("timestamp"), (int, float)):
            samples.append(sample)
        else:
            skipped += 1
    if skipped:
        notice(f"skipped {skipped} line(s) of {path} that are not samples")
    if not samples:
        raise ToolError(f"samples file {path} holds no samples")
    return sorted(samples, key=lambda s: s["timestamp"])


# --- the plot ------------------------------------------------------------------------------------------------


def series(samples: Sequence[Sample], get: Any) -> list[float]:
    """One value per sample; NaN where it is missing (the service was unreachable, a device was absent)."""
    values = []
    for sample in samples:
        try:
            value = get(sample)
        except (KeyError, TypeError, IndexError, AttributeError):
            value = None
        values.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return values


def gap_breaks(times: list[float]) -> list[int]:
    """Indexes after which the sampling stopped for a while (separate runs in one file): lines break there."""
    if len(times) < 3:
        return []
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    limit = max(3 * statistics.median(steps), 60.0)
    return [i for i, step in enumerate(steps) if step > limit]


def with_breaks(values: list[Any], breaks: list[int], filler: Any = math.nan) -> list[Any]:
    """values with filler inserted after each break index (NaN breaks a line; x needs a real time there)."""
    out = list(values)
    for i in reversed(breaks):
        out.insert(i + 1, out[i] if filler is None else filler)
    return out


def gpu_devices(samples: Sequence[Sample]) -> dict[int, str]:
    devices: dict[int, str] = {}
    for sample in samples:
        for gpu in sample.get("gpus") or []:
            if isinstance(gpu.get("index"), int) and "memory_total_bytes" in gpu:
                total = gpu["memory_total_bytes"] / GIB
                devices[gpu["index"]] = f"GPU {gpu['index']} {gpu.get('name', '')} ({total:.0f} GiB)"
    return dict(sorted(devices.items()))


def gpu_field(sample: Sample, index: int, key: str) -> Any:
    return next((g.get(key) for g in sample.get("gpus") or [] if g.get("index") == index), None)


def busy_workers(sample: Sample) -> int | None:
    if not service_reached(sample):
        return None
    return sum(w.get("state") == "busy" for w in sample["service"]["workers"])


def write_plot(samples: Sequence[Sample], path: Path) -> None:
    """Draw the trends of samples into a PNG at path, replacing it atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, none used
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 10), dpi=100, layout="constrained")
    ax_gpu, ax_mem, ax_util, ax_queue, ax_workers, ax_restarts = fig.subplots(3, 2, sharex=True).flatten()
    trends = Trends(samples)
    trends.gpu_memory(ax_gpu)
    trends.system_memory(ax_mem)
    trends.utilisation(ax_util)
    trends.counts(ax_queue, "Queue size", "jobs", [("queue_size", "queued jobs", "tab:blue")])
    trends.counts(
        ax_workers,
        "Workers",
        "processes",
        [("alive_workers", "alive", "tab:green"), ("dead_workers", "dead", "tab:red"), ("busy", "busy", "tab:purple")],
    )
    trends.counts(ax_restarts, "Total worker restarts", "restarts", [("total_restarts", "restarts", "tab:orange")])
    trends.finish(fig)
    save_atomically(fig, path)


class Trends:
    """Draws the subplots of one figure from samples, on a common time axis with breaks between separate runs."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples
        self.stamps = [float(s["timestamp"]) for s in samples]
        self.breaks = gap_breaks(self.stamps)
        self.x = with_breaks([datetime.fromtimestamp(t) for t in self.stamps], self.breaks, filler=None)
        self.devices = gpu_devices(samples)

    def line(self, ax: Any, get: Any, label: str, **style: Any) -> list[float]:
        values = series(self.samples, get)
        ax.plot(self.x, with_breaks(values, self.breaks), label=label, marker=".", markersize=4, **style)
        return values

    def gpu_memory(self, ax: Any) -> None:
        ax.set(title="GPU memory used", ylabel="GiB")
        if not self.devices:
            notes = [s.get("gpu_note") for s in self.samples if s.get("gpu_note")]
            ax.text(0.5, 0.5, notes[-1] if notes else "no NVIDIA GPU", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            return
        for index, label in self.devices.items():
            self.line(ax, lambda s, i=index: gpu_field(s, i, "memory_used_bytes") / GIB, label)
        totals = {gpu_field(s, i, "memory_total_bytes") for s in self.samples for i in self.devices} - {None}
        for total in sorted(totals):
            ax.axhline(total / GIB, color="grey", linestyle="--", linewidth=1, label=f"total {total / GIB:.0f} GiB")
        ax.set_ylim(0, max(totals) / GIB * 1.05)
        ax.legend(loc="best", fontsize="small")

    def system_memory(self, ax: Any) -> None:
        self.line(ax, lambda s: s["memory"]["used_bytes"] / GIB, "used")
        total = max(series(self.samples, lambda s: s["memory"]["total_bytes"] / GIB), default=math.nan)
        if not math.isnan(total):
            ax.axhline(total, color="grey", linestyle="--", linewidth=1, label=f"total {total:.1f} GiB")
            ax.set_ylim(0, total * 1.05)
        ax.set(title="System memory used", ylabel="GiB")
        ax.legend(loc="best", fontsize="small")

    def utilisation(self, ax: Any) -> None:
        self.line(ax, lambda s: s["cpu_percent"], "CPU (all cores)")
        for index in self.devices:
            values = series(self.samples, lambda s, i=index: gpu_field(s, i, "utilization_percent"))
            if not all(math.isnan(v) for v in values):  # some boards and MIG instances do not report it
                self.line(ax, lambda s, i=index: gpu_field(s, i, "utilization_percent"), f"GPU {index}")
        ax.set(title="CPU and GPU utilisation", ylabel="%", ylim=(0, 105))
        ax.legend(loc="best", fontsize="small")

    def counts(self, ax: Any, title: str, unit: str, keys: list[tuple[str, str, str]]) -> None:
        """Step lines of service counters (key "busy": workers running a job); red crosses where it was unreachable."""
        from matplotlib.ticker import MaxNLocator

        top = 1.0
        for key, label, color in keys:
            get = busy_workers if key == "busy" else (lambda s, k=key: s["service"][k])
            values = self.line(ax, get, label, drawstyle="steps-post", color=color)
            top = max([top, *(v for v in values if not math.isnan(v))])
        down = [datetime.fromtimestamp(s["timestamp"]) for s in self.samples if not service_reached(s)]
        if down:
            ax.plot(down, [0] * len(down), "x", color="red", label="service unreachable")
        ax.set(title=title, ylabel=unit, ylim=(-0.05 * top * 1.15, top * 1.15))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize="small")

    def finish(self, fig: Any) -> None:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        for ax in fig.axes:
            ax.grid(alpha=0.3)
            locator = AutoDateLocator()
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        first, last = datetime.fromtimestamp(self.stamps[0]), datetime.fromtimestamp(self.stamps[-1])
        urls = ", ".join(sorted({str(s.get("url")) for s in self.samples}))
        span = f"{first:%Y-%m-%d %H:%M:%S} to {last:%Y-%m-%d %H:%M:%S}, {len(self.samples)} samples"
        fig.suptitle(f"GenServe performance: {urls}\n{span}")


def service_reached(sample: Sample) -> bool:
    service = sample.get("service")
    return isinstance(service, dict) and bool(service.get("reachable"))


def save_atomically(fig: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, format="png")
        os.replace(temporary, path)
    except OSError as exc:
        raise ToolError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


# --- modes ---------------------------------------------------------------------------------------------------


def run_once(args: argparse.Namespace) -> int:
    sampler = Sampler(make_session(args.api_key), args.url, args.timeout)
    try:
        sample = sampler.take(require_service=True)
    finally:
        sampler.close()
    recorder = Recorder(args.out)
    try:
        recorder.write(sample)
    finally:
        recorder.close()
    print_sample(sample)
    if args.out is not None:
        notice(f"sample appended to {args.out}")
    return 0


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def run_continuous(args: argparse.Namespace) -> int:
    check_plot_directory(args.plot_file)
    timeout = min(args.timeout, max(MIN_CONTINUOUS_TIMEOUT_S, float(args.interval)))
    recorder = Recorder(args.out)
    sampler = Sampler(make_session(args.api_key), args.url, timeout)
    history: deque[Sample] = deque(maxlen=HISTORY_LIMIT)
    plots = "at exit" if args.plot_interval == 0 else f"every {args.plot_interval} s and at exit"
    notice(
        f"monitoring {args.url} every {args.interval} s; plot to {args.plot_file} {plots}"
        + (f"; samples to {args.out}" if args.out else "")
        + ("" if args.samples is None else f"; stops after {args.samples} sample(s)")
        + "; Ctrl-C stops"
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        try:
            sample_loop(args, sampler, recorder, history)
        except KeyboardInterrupt:
            notice("stopped")
        finally:
            sampler.close()
            recorder.close()
        if history:
            write_plot(history, args.plot_file)
            notice(f"plot of {len(history)} samples written to {args.plot_file}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not any(s["service"]["reachable"] for s in history):
        raise ToolError(f"no sample reached the server at {args.url} ({len(history)} taken)")
    return 0


def sample_loop(args: argparse.Namespace, sampler: Sampler, recorder: Recorder, history: deque[Sample]) -> None:
    """Sample every args.interval seconds on a fixed schedule, into history, the recorder and stdout."""
    taken = 0
    next_sample = next_plot = time.monotonic()
    next_plot += args.plot_interval
    while args.samples is None or taken < args.samples:
        sample = sampler.take(require_service=False)
        taken += 1
        history.append(sample)
        # The line first, flushed, then the record: whoever sees the record (a test, a tail -f) can rely on the
        # line being out too, even if a signal ends the run right after.
        console.print(summary_line(sample), soft_wrap=True)
        sys.stdout.flush()
        recorder.write(sample)
        if args.plot_interval and time.monotonic() >= next_plot:
            write_plot(history, args.plot_file)
            next_plot = time.monotonic() + args.plot_interval
        if args.samples is not None and taken >= args.samples:
            break
        next_sample += args.interval
        delay = next_sample - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:  # a slow sample: start the schedule again from now instead of catching up in a burst
            next_sample = time.monotonic()


def check_plot_directory(path: Path) -> None:
    directory = path.parent
    if not directory.is_dir():
        raise ToolError(f"cannot write the plot to {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ToolError(f"cannot write the plot to {path}: directory {directory} is not writable")


def run_plot(args: argparse.Namespace) -> int:
    samples = load_samples(args.out)
    write_plot(samples, args.plot_file)
    console.print(f"plot of {len(samples)} samples from {args.out} written to {args.plot_file}", highlight=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.plot:
            return run_plot(args)
        if args.continuous is not None:
            return run_continuous(args)
        return run_once(args)
    except ToolError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
