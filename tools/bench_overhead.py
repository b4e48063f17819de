#!/usr/bin/env python3
"""Measure GenServe's service overhead, worker kill recovery and retention's cost, from the outside (HTTP only).

Client-only: this script never imports genserve or the workers. It speaks HTTP to a server with ``requests`` and
reads ``/status``; phase 2 sends SIGKILL to a worker process, so for that phase the server must run on this machine
(as the same user). Phase 3 starts a server of its own (``python -m genserve`` as a subprocess) and writes into
that server's SQLite file directly, as an operator could.

Phase 1 (overhead, against --url): N sequential text2img requests to POST /generate, after some uncounted warm-up
requests. For each one it records the client end-to-end latency (perf_counter around the HTTP call, over one
keep-alive session) and the server's ``timings``: total_s (server-side request time), pipeline_s and encode_s
(measured on the worker) and queue_s (dispatch: submit until the job starts on an idle worker). It prints
p50/p95/mean/max of

    end-to-end latency
    pipeline time, encode time            (the model and the PNG encoder: not overhead)
    service overhead  = end-to-end - pipeline - encode   (HTTP, JSON, base64, queueing, pipes: everything else)
    server overhead   = total_s - pipeline - encode      (the part of it spent inside the API process)
    dispatch          = queue_s

against the targets: service overhead <= 10 ms p50 and dispatch <= 2 ms p50, and a breakdown of where the
overhead goes (dispatch / rest of the server / outside the server). ``--requests 0`` skips it.

Phase 2 (kill recovery, K trials, against --url): take a ready worker's pid from /status, SIGKILL it, poll /status
every ~5 ms and report p50/p95/max of how long until the slot is seen dead (state "dead", or already "starting"
with a new pid) and until it is "ready" again with a new pid. "Seen dead" includes the polling granularity (one
poll interval plus one /status round trip at most). Each trial spends one of the slot's respawns: the supervisor
allows workers.max_restarts (default 10) per restart_window_s (600 s), so repeated runs against one server soon
leave the slot dead. ``--kill-trials 0`` skips it.

Phase 3 (retention, R records, its own server; ``--retention-records 0``, the default, skips it): start
``python -m genserve`` from the repository root with a config in a temporary folder (a free port, the result store
in that folder, results.cleanup_interval_s = --retention-interval, one CPU worker, the embedded test model from
--embedded-cache). Then, twice, for at least --retention-window seconds, run sequential sync POST /generate
requests (128 px, 2 steps) recording timings.queue_s ("dispatch"), while a thread sends GET /health as fast as it
can on a keep-alive session of its own:

    no retention      as is (the store holds a few rows; retention passes find nothing to delete)
    during retention  after inserting R finished jobs submitted 30 days ago (no image files) into
                      <results>/jobs.sqlite3 in one transaction; measuring goes on until the server's next
                      retention pass has deleted them all and the window has passed

It reports p50/p99/max of dispatch and /health for both, and "while deleting": the requests that overlapped the
pass's deletions (the first deletion seen to the last, polling the count of old rows every 50 ms over a SQLite
connection of its own); that span is also the pass duration it reports. The pass starts a little before its first
deletion can be seen (it first reads every finished job), so it also says when the slowest requests were sent,
relative to the first deletion seen. The server is stopped with SIGTERM at the end, whatever happens.

Usage:
    .venv/bin/python tools/bench_overhead.py          # localhost:12411, 50 requests, 512 px, 4 steps, 3 kills
    .venv/bin/python tools/bench_overhead.py --url http://127.0.0.1:12488 --requests 30 --kill-trials 5
    .venv/bin/python tools/bench_overhead.py --size 1024 --steps 28 --kill-trials 0      # overhead only
    .venv/bin/python tools/bench_overhead.py --only-retention --retention-records 100000  # phase 3 alone, no --url
    .venv/bin/python tools/bench_overhead.py --retention-records 100000   # all three phases
    .venv/bin/python tools/bench_overhead.py --json > bench.txt   # figures also as one JSON object at the end

``--only-retention`` is short for ``--requests 0 --kill-trials 0``: no server needs to be running at --url.

Exit status: 0 when the benchmark ran (targets missed or not), 1 when the server is unreachable or not ready, a
request fails, a killed worker does not come back, or phase 3's server does not start or its retention pass does
not come within 3 x --retention-interval + 60 s.
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
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests

from _procs import api_process_of, listens_on
from _server import LocalServer, ServerError, local_server

OVERHEAD_TARGET_MS = 10.0  # service overhead, p50
DISPATCH_TARGET_MS = 2.0  # queue_s, p50
POLL_INTERVAL_S = 0.005  # /status polling during kill trials
PROMPT = "a lighthouse on a cliff at dusk, benchmark request"

RETENTION_SIZE = 128  # phase 3 requests: dispatch is what it measures, not the model
RETENTION_STEPS = 2
RETENTION_AGE_S = 30 * 86400  # seeded jobs were submitted this long ago (the default max_age_hours is 168)
RETENTION_POLL_S = 0.05  # row count polling during the retention pass
SERVER_START_TIMEOUT_S = 600.0  # phase 3's server: until /ready (the first start builds the embedded model)


class BenchError(Exception):
    """A failure that ends the benchmark with a message and exit status 1."""


# --- command line --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Client-side benchmark of GenServe's service overhead, worker kill recovery and retention cost."
    )
    parser.add_argument("--url", default="http://localhost:12411", help="server base URL (default %(default)s)")
    parser.add_argument(
        "--requests", type=int, default=50, metavar="N", help="measured requests, 0 skips phase 1 (default %(default)s)"
    )
    parser.add_argument("--size", type=int, default=512, help="image width and height (default %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted warm-up requests (default %(default)s)")
    parser.add_argument(
        "--kill-trials",
        type=int,
        default=3,
        metavar="K",
        help="worker kill trials, 0 skips (default %(default)s)",
    )
    parser.add_argument(
        "--recovery-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a killed worker may take to be ready again (default %(default)s)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="per-request timeout (default %(default)s)",
    )
    _add_retention_arguments(parser)
    parser.add_argument("--json", action="store_true", help="also print all figures as one JSON object at the end")
    args = parser.parse_args(argv)
    if args.only_retention:
        args.requests = args.kill_trials = 0
    if min(args.requests, args.warmup, args.kill_trials, args.retention_records) < 0:
        parser.error("--requests, --warmup, --kill-trials and --retention-records must not be negative")
    if args.retention_window <= 0 or args.retention_interval <= 0:
        parser.error("--retention-window and --retention-interval must be positive")
    if not (args.requests or args.kill_trials or args.retention_records):
        parser.error("nothing to do: --requests, --kill-trials and --retention-records are all 0")
    args.url = args.url.rstrip("/")
    args.embedded_cache = Path(args.embedded_cache).expanduser()
    return args


def _add_retention_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("phase 3: retention (starts its own server)")
    group.add_argument(
        "--retention-records",
        type=int,
        default=0,
        metavar="R",
        help="old job records to insert for the retention pass, 0 skips the phase (default %(default)s)",
    )
    group.add_argument(
        "--only-retention",
        action="store_true",
        help="run phase 3 alone (same as --requests 0 --kill-trials 0): no server needed at --url",
    )
    group.add_argument(
        "--retention-window",
        type=float,
        default=15.0,
        metavar="S",
        help="least seconds of each measurement, with and without retention (default %(default)s)",
    )
    group.add_argument(
        "--retention-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="the server's results.cleanup_interval_s (default %(default)s)",
    )
    group.add_argument(
        "--embedded-cache",
        default="~/.cache/genserve/embedded",
        metavar="DIR",
        help="the server's model.embedded_cache_dir, so the embedded model is built once (default %(default)s)",
    )


# --- statistics and formatting -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values_s: list[float]) -> dict[str, float]:
    """p50/p95/mean/max in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
    }


def format_table(header: list[str], rows: list[list[str]], groups: list[tuple[str, int]] | None = None) -> str:
    """Plain aligned text: first column left-aligned, the others right-aligned.

    groups: optional labels centred above runs of columns after the first, as (label, number of columns)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    groups = groups or []
    column = 1
    for label, count in groups:  # widen a group's columns evenly until its label fits above them
        missing = len(label) - (sum(widths[column : column + count]) + 2 * (count - 1))
        for i in range(max(0, missing)):
            widths[column + i % count] += 1
        column += count

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(cells) if i]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), rule, *(line(row) for row in rows)]
    if groups:
        labels, column = [" " * widths[0]], 1
        for label, count in groups:
            labels.append(label.center(sum(widths[column : column + count]) + 2 * (count - 1)))
            column += count
        lines.insert(0, "  ".join(labels).rstrip())
    return "\n".join(lines)


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}" if value >= 100 else f"{value:.2f}"


# --- HTTP ----------------------------------------------------------------------------------------------------


def get_json(session: requests.Session, url: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    try:
        response = session.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise BenchError(f"cannot reach {url}: {exc}") from None
    try:
        return response.status_code, response.json()
    except ValueError:
        raise BenchError(f"{url} answered {response.status_code} with a body that is not JSON") from None


def fetch_status(session: requests.Session, base: str) -> dict[str, Any]:
    code, body = get_json(session, f"{base}/status")
    if code != 200:
        raise BenchError(f"GET /status answered {code}: {body}")
    return body


def check_ready(session: requests.Session, base: str) -> None:
    code, body = get_json(session, f"{base}/ready")
    if code != 200:
        raise BenchError(f"server at {base} is not ready ({code}): {body.get('reason') or body}")


@dataclass
class Sample:
    e2e_s: float
    total_s: float
    pipeline_s: float
    encode_s: float
    queue_s: float
    response_bytes: int


def generate(session: requests.Session, base: str, size: int, steps: int, timeout: float) -> Sample:
    """One text2img request; raises BenchError unless it succeeds with timings."""
    payload: dict[str, Any] = {
        "prompt": PROMPT,
        "mode": "text2img",
        "width": size,
        "height": size,
        "num_inference_steps": steps,
    }
    began = time.perf_counter()
    try:
        response = session.post(f"{base}/generate", json=payload, timeout=timeout)
    except requests.RequestException as exc:
        raise BenchError(f"POST /generate failed: {exc}") from None
    e2e = time.perf_counter() - began
    try:
        body = response.json()
    except ValueError:
        raise BenchError(f"POST /generate answered {response.status_code} with a body that is not JSON") from None
    if response.status_code != 200 or not body.get("success"):
        raise BenchError(
            f"POST /generate answered {response.status_code}: "
            f"{body.get('error_type', '?')}: {body.get('error') or body.get('detail') or body}"
        )
    timings = body.get("timings") or {}
    missing = [key for key in ("total_s", "pipeline_s", "encode_s", "queue_s") if key not in timings]
    if missing or not body.get("image_base64"):
        raise BenchError(f"POST /generate succeeded but lacks {', '.join(missing) or 'image_base64'}")
    return Sample(
        e2e_s=e2e,
        total_s=float(timings["total_s"]),
        pipeline_s=float(timings["pipeline_s"]),
        encode_s=float(timings["encode_s"]),
        queue_s=float(timings["queue_s"]),
        response_bytes=len(response.content),
    )


# --- phase 1: overhead ---------------------------------------------------------------------------------------


def run_overhead(session: requests.Session, args: argparse.Namespace) -> list[Sample]:
    for _ in range(args.warmup):
        generate(session, args.url, args.size, args.steps, args.request_timeout)
    samples = []
    for i in range(args.requests):
        samples.append(generate(session, args.url, args.size, args.steps, args.request_timeout))
        if sys.stderr.isatty():
            print(f"\r  request {i + 1}/{args.requests}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return samples


def overhead_figures(samples: list[Sample]) -> dict[str, dict[str, float]]:
    series = {
        "end_to_end": [s.e2e_s for s in samples],
        "pipeline": [s.pipeline_s for s in samples],
        "encode": [s.encode_s for s in samples],
        "service_overhead": [s.e2e_s - s.pipeline_s - s.encode_s for s in samples],
        "server_overhead": [s.total_s - s.pipeline_s - s.encode_s for s in samples],
        "dispatch": [s.queue_s for s in samples],
        # breakdown of service_overhead = dispatch + server_other + outside_server
        "server_other": [s.total_s - s.queue_s - s.pipeline_s - s.encode_s for s in samples],
        "outside_server": [s.e2e_s - s.total_s for s in samples],
    }
    return {name: summarize(values) for name, values in series.items()}


def verdict(value_ms: float, target_ms: float) -> str:
    return "PASS" if value_ms <= target_ms else "MISS"


def print_overhead(figures: dict[str, dict[str, float]], samples: list[Sample]) -> None:
    labels = [
        ("end_to_end", "end-to-end latency", None),
        ("pipeline", "pipeline (worker)", None),
        ("encode", "PNG encode (worker)", None),
        ("service_overhead", "service overhead (e2e - pipe - enc)", OVERHEAD_TARGET_MS),
        ("server_overhead", "server overhead (total_s - pipe - enc)", None),
        ("dispatch", "dispatch (queue_s)", DISPATCH_TARGET_MS),
    ]
    rows = [_figure_row(label, figures[key], target) for key, label, target in labels]
    print(format_table(["metric (ms)", "p50", "p95", "mean", "max", "target p50", "result"], rows))
    print()
    print("where the service overhead goes (service overhead = dispatch + rest of server + outside server):")
    breakdown = [
        ("dispatch", "dispatch: submit -> start on the worker"),
        ("server_other", "rest of server: parse, result over pipe, base64/JSON"),
        ("outside_server", "outside server: HTTP, uvicorn, transfer (e2e - total_s)"),
    ]
    rows = [_figure_row(label, figures[key], None) for key, label in breakdown]
    print(format_table(["component (ms)", "p50", "p95", "mean", "max"], [row[:5] for row in rows]))
    mean_kib = sum(s.response_bytes for s in samples) / len(samples) / 1024
    print(f"mean response body: {mean_kib:.0f} KiB")


def _figure_row(label: str, stats: dict[str, float], target: float | None) -> list[str]:
    row = [label, ms(stats["p50_ms"]), ms(stats["p95_ms"]), ms(stats["mean_ms"]), ms(stats["max_ms"])]
    if target is None:
        return row + ["", ""]
    return row + [f"<= {target:g}", verdict(stats["p50_ms"], target)]


# --- phase 2: kill recovery ----------------------------------------------------------------------------------


@dataclass
class KillTrial:
    slot: int
    old_pid: int
    new_pid: int
    seen_dead_s: float  # kill -> slot reported dead (or already respawning); includes polling granularity
    respawned_s: float  # kill -> slot reported with a new pid (process spawned, still loading)
    ready_s: float  # kill -> slot "ready" with a new pid
    polls: int
    poll_rtt_s: list[float] = field(default_factory=list, repr=False)


def require_local_server(base: str) -> None:
    """SIGKILL by pid only makes sense for a server on this machine: refuse other hosts."""
    host = urlsplit(base).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc}") from None
    local = {addr.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for addr in addrs}
    for address in addresses:
        text = str(address)
        if ipaddress.ip_address(text.split("%")[0]).is_loopback or text in local:
            return
    raise BenchError(
        f"kill recovery needs the server on this machine, but {host} is not a local address; use --kill-trials 0"
    )


def check_is_worker(pid: int, port: int) -> None:
    """Make sure pid is a worker of the server under test before sending SIGKILL to it."""
    try:
        proc = psutil.Process(pid)
        parent = api_process_of(proc)
        own = " ".join(proc.cmdline())
        parent_cmd = " ".join(parent.cmdline()) if parent else ""
    except psutil.NoSuchProcess:
        raise BenchError(f"worker pid {pid} from /status does not exist here; is the server on this machine?") from None
    except psutil.AccessDenied:
        raise BenchError(f"not allowed to inspect worker pid {pid}; run as the server's user") from None
    if parent is None or not ("multiprocessing" in own or "genserve" in own):
        raise BenchError(f"pid {pid} does not look like a GenServe worker ({own[:80]!r}); not killing it")
    if listens_on(parent, port) is False and "genserve" not in parent_cmd:
        raise BenchError(f"pid {pid}'s server process {parent.pid} does not listen on port {port}; not killing it")


def wait_all_ready(session: requests.Session, base: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = fetch_status(session, base)
        workers = status.get("workers", [])
        if workers and all(w["state"] == "ready" for w in workers):
            return status
        if time.monotonic() > deadline:
            states = ", ".join(f"{w['slot']}:{w['state']}" for w in workers)
            raise BenchError(f"workers not all ready within {timeout:g} s ({states})")
        time.sleep(0.05)


def slot_of(status: dict[str, Any], slot: int) -> dict[str, Any]:
    for worker in status.get("workers", []):
        if worker["slot"] == slot:
            return worker
    raise BenchError(f"slot {slot} vanished from /status")


def kill_one(session: requests.Session, base: str, port: int, slot: int, timeout: float) -> KillTrial:
    """SIGKILL the worker in slot, then poll /status until it is seen dead and until it is ready again."""
    worker = slot_of(wait_all_ready(session, base, timeout), slot)
    old_pid = int(worker["pid"])
    check_is_worker(old_pid, port)
    seen_dead = respawned = None
    polls, rtts = 0, []
    began = time.perf_counter()
    os.kill(old_pid, signal.SIGKILL)
    while True:
        poll_start = time.perf_counter()
        current = slot_of(fetch_status(session, base), slot)
        now = time.perf_counter()
        polls += 1
        rtts.append(now - poll_start)
        pid, state = current["pid"], current["state"]
        new_pid = pid is not None and pid != old_pid
        if seen_dead is None and (state == "dead" or new_pid or state == "starting"):
            seen_dead = now - began
        if respawned is None and new_pid:
            respawned = now - began
        if new_pid and state in ("ready", "busy"):
            seen_dead = now - began if seen_dead is None else seen_dead
            respawned = now - began if respawned is None else respawned
            return KillTrial(slot, old_pid, int(pid), seen_dead, respawned, now - began, polls, rtts)
        if current.get("gave_up"):
            raise BenchError(f"slot {slot} gave up respawning: {current.get('last_error')}")
        if now - began > timeout:
            raise BenchError(f"slot {slot} not ready again {timeout:g} s after the kill (state {state}, pid {pid})")
        time.sleep(POLL_INTERVAL_S)


def run_kill_trials(session: requests.Session, args: argparse.Namespace) -> tuple[list[KillTrial], int, int]:
    """K trials on slot 0 (or the lowest slot); returns the trials and total_restarts before and after."""
    port = urlsplit(args.url).port or (443 if args.url.startswith("https") else 80)
    status = wait_all_ready(session, args.url, args.recovery_timeout)
    restarts_before = int(status["concurrent_manager"]["total_restarts"])
    slot = min(w["slot"] for w in status["workers"])
    trials = []
    for i in range(args.kill_trials):
        trial = kill_one(session, args.url, port, slot, args.recovery_timeout)
        trials.append(trial)
        print(f"  trial {i + 1}/{args.kill_trials}: pid {trial.old_pid} -> {trial.new_pid}", file=sys.stderr)
    restarts_after = int(fetch_status(session, args.url)["concurrent_manager"]["total_restarts"])
    return trials, restarts_before, restarts_after


def kill_figures(trials: list[KillTrial]) -> dict[str, dict[str, float]]:
    def p50_p95_max(values_s: list[float]) -> dict[str, float]:
        return {
            "p50_ms": percentile(values_s, 50) * 1000,
            "p95_ms": percentile(values_s, 95) * 1000,
            "max_ms": max(values_s) * 1000,
        }

    rtts = [rtt for trial in trials for rtt in trial.poll_rtt_s]
    return {
        "seen_dead": p50_p95_max([t.seen_dead_s for t in trials]),
        "respawned": p50_p95_max([t.respawned_s for t in trials]),
        "ready_again": p50_p95_max([t.ready_s for t in trials]),
        "status_poll_rtt": p50_p95_max(rtts),
    }


def print_kill(figures: dict[str, dict[str, float]], trials: list[KillTrial], before: int, after: int) -> None:
    labels = [
        ("seen_dead", "(a) seen dead: kill -> slot dead/respawning"),
        ("respawned", "    respawned: kill -> new pid (loading)"),
        ("ready_again", "(b) ready again: kill -> ready, new pid"),
        ("status_poll_rtt", "    /status poll round trip"),
    ]
    rows = [[label, *(ms(figures[key][stat]) for stat in ("p50_ms", "p95_ms", "max_ms"))] for key, label in labels]
    print(format_table(["kill recovery (ms)", "p50", "p95", "max"], rows))
    print(f"{len(trials)} trials: p95 is interpolated between the two slowest when there are fewer than 20.")
    polls = sum(t.polls for t in trials)
    print(
        f"note: (a) includes the polling granularity: up to one {POLL_INTERVAL_S * 1000:g} ms poll interval plus one "
        f"/status round trip ({polls} polls over {len(trials)} trials)."
    )
    print("      (b) includes the supervisor's respawn backoff and the new worker's pipeline load.")
    expected = before + len(trials)
    mark = "ok" if after == expected else f"UNEXPECTED, expected {expected}"
    print(f"concurrent_manager.total_restarts: {before} -> {after} ({mark})")


# --- phase 3: retention --------------------------------------------------------------------------------------


def server_config(args: argparse.Namespace) -> dict[str, Any]:
    """The phase 3 server's config: only what differs from the defaults (tools/_server.py adds host and port)."""
    return {
        "server": {"shutdown_grace_s": 10},
        "model": {"embedded_cache_dir": str(args.embedded_cache)},
        # A worker that cannot start ends the server (and so the phase) at once, instead of retrying for ever.
        "workers": {"cpu_workers": 1, "max_restarts": 2, "on_budget_spent": "exit"},
        "defaults": {"width": RETENTION_SIZE, "height": RETENTION_SIZE, "num_inference_steps": RETENTION_STEPS},
        "results": {"cleanup_interval_s": args.retention_interval},
    }


@contextmanager
def own_server(args: argparse.Namespace) -> Iterator[LocalServer]:
    """A server of the bench's own in a temporary folder, stopped (and the folder removed) whatever happens."""
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as folder:
        config = server_config(args)
        config["results"]["dir"] = str(Path(folder) / "results")
        try:
            with local_server(config, SERVER_START_TIMEOUT_S, Path(folder)) as server:
                yield server
        except ServerError as exc:
            raise BenchError(f"own server: {exc}") from None


def database_of(server: LocalServer) -> Path:
    return Path(server.config["results"]["dir"]) / "jobs.sqlite3"


JOB_COLUMNS = (
    "id, status, mode, model_id, priority, params, submitted_at, started_at, finished_at, worker_slot, device, "
    "seed, width, height, image_bytes, error_type, error_message, cancel_reason"
)
OLD_PARAMS = json.dumps({"prompt": PROMPT, "width": RETENTION_SIZE, "height": RETENTION_SIZE, "seed": 42})


def old_job(index: int, now: float) -> tuple[Any, ...]:
    """A finished job submitted RETENTION_AGE_S ago (a little earlier per index), with no image file."""
    submitted = now - RETENTION_AGE_S - index * 0.01
    failed = index % 10 == 9
    return (
        uuid.uuid4().hex,
        "failed" if failed else "completed",
        "text2img",
        "flux1-dev",
        0,
        OLD_PARAMS,
        submitted,
        submitted + 0.001,
        submitted + 0.5,
        0,
        "cpu",
        index,
        RETENTION_SIZE,
        RETENTION_SIZE,
        None,  # image_bytes: no image stored
        "generation_failed" if failed else None,
        "seeded by bench_overhead" if failed else None,
        None,
    )


def seed_old_jobs(database: Path, count: int) -> float:
    """Insert count old finished jobs in one transaction; returns the seconds it took."""
    rows = [old_job(i, time.time()) for i in range(count)]
    placeholders = ", ".join("?" * len(rows[0]))
    began = time.perf_counter()
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as conn, conn:  # commits at the end
        conn.executemany(f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({placeholders})", rows)
    return time.perf_counter() - began


def count_rows(conn: sqlite3.Connection, older_than: float | None = None) -> int:
    if older_than is None:
        return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE submitted_at < ?", (older_than,)).fetchone()[0])


@dataclass(slots=True)
class Timed:
    start: float  # perf_counter when the request was sent
    end: float  # perf_counter when its answer was in
    value_s: float  # what was measured: the round trip, or the server's queue_s


class HealthProbe(threading.Thread):
    """GET /health back to back on a keep-alive session of its own, until stopped."""

    def __init__(self, base: str) -> None:
        super().__init__(name="health-probe", daemon=True)
        self.url = f"{base}/health"
        self.samples: list[Timed] = []
        self.errors = 0  # failed requests and non-200 answers
        self._halt = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        while not self._halt.is_set():
            began = time.perf_counter()
            try:
                ok = session.get(self.url, timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            ended = time.perf_counter()
            if ok:
                self.samples.append(Timed(began, ended, ended - began))
            else:
                self.errors += 1
                self._halt.wait(0.01)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class PassWatch(threading.Thread):
    """Polls the number of old rows over a SQLite connection of its own: when the pass starts and ends."""

    def __init__(self, database: Path, older_than: float, seeded_total: int, floor: int) -> None:
        super().__init__(name="retention-watch", daemon=True)
        self.database = database
        self.older_than = older_than
        self.seeded_total = seeded_total  # old rows right after seeding
        self.floor = floor  # old rows before seeding: the pass is over when the count is back there
        self.remaining = seeded_total
        self.first_drop: float | None = None  # perf_counter of the first poll that saw fewer old rows
        self.done: float | None = None  # perf_counter of the first poll that saw them back at the floor
        self.error: sqlite3.Error | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with contextlib.closing(sqlite3.connect(self.database, timeout=30)) as conn:
                while not self._halt.is_set() and self.done is None:
                    self._poll(conn)
                    self._halt.wait(RETENTION_POLL_S)
        except sqlite3.Error as exc:
            self.error = exc

    def _poll(self, conn: sqlite3.Connection) -> None:
        self.remaining = count_rows(conn, self.older_than)
        now = time.perf_counter()
        if self.first_drop is None and self.remaining < self.seeded_total:
            self.first_drop = now
        if self.remaining <= self.floor:
            self.done = now

    def check(self, deadline: float) -> None:
        """Raise BenchError when polling failed, or the pass is not over by deadline (a perf_counter time)."""
        if self.error is not None:
            raise BenchError(f"polling {self.database} failed: {self.error}")
        if self.done is None and time.perf_counter() > deadline:
            raise BenchError(
                f"the retention pass has not deleted the seeded rows in time (3 x cleanup interval + 60 s): "
                f"{self.remaining - self.floor} of {self.seeded_total - self.floor} left"
            )

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class Window:
    dispatch: list[Timed]  # value_s = timings.queue_s
    generate: list[Timed]  # value_s = the client's round trip of the same requests (a stalled submit shows here)
    health: list[Timed]  # value_s = round trip
    health_errors: int
    seconds: float


def measure(base: str, args: argparse.Namespace, watch: PassWatch | None = None) -> Window:
    """Sequential POST /generate plus the /health probe, for at least the window and, with a watch, until the
    retention pass is over (BenchError if it is not over within 3 x cleanup interval + 60 s)."""
    session = requests.Session()
    probe = HealthProbe(base)
    began = time.perf_counter()
    deadline = began + 3 * args.retention_interval + 60
    dispatch: list[Timed] = []
    generated: list[Timed] = []
    probe.start()
    try:
        while True:
            sent = time.perf_counter()
            sample = generate(session, base, RETENTION_SIZE, RETENTION_STEPS, args.request_timeout)
            ended = time.perf_counter()
            dispatch.append(Timed(sent, ended, sample.queue_s))
            generated.append(Timed(sent, ended, ended - sent))
            window_over = time.perf_counter() - began >= args.retention_window
            if window_over and (watch is None or watch.done is not None):
                break
            if watch is not None:
                watch.check(deadline)
    finally:
        probe.stop()
    return Window(dispatch, generated, probe.samples, probe.errors, time.perf_counter() - began)


def tail_stats(values_s: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds, and the number of samples."""
    values_ms = [v * 1000.0 for v in values_s]
    return {
        "p50_ms": percentile(values_ms, 50),
        "p99_ms": percentile(values_ms, 99),
        "max_ms": max(values_ms) if values_ms else math.nan,
        "n": len(values_ms),
    }


def window_figures(window: Window, span: tuple[float, float] | None = None) -> dict[str, Any]:
    """The window's figures; with span (perf_counter from, to), only requests that overlapped it."""

    def values(samples: list[Timed]) -> list[float]:
        if span is None:
            return [s.value_s for s in samples]
        return [s.value_s for s in samples if s.start <= span[1] and s.end >= span[0]]

    return {
        "dispatch": tail_stats(values(window.dispatch)),
        "generate": tail_stats(values(window.generate)),
        "health": tail_stats(values(window.health)),
        "health_errors": window.health_errors,
        "seconds": window.seconds if span is None else span[1] - span[0],
    }


def slowest_at(samples: list[Timed], origin: float) -> float:
    """When the slowest sample was sent, in seconds relative to origin (a perf_counter time); NaN if none."""
    return max(samples, key=lambda s: s.value_s).start - origin if samples else math.nan


def run_retention(args: argparse.Namespace) -> dict[str, Any]:
    print(f"phase 3: retention of {args.retention_records} records, on a server of its own", file=sys.stderr)
    with own_server(args) as server:
        session = requests.Session()
        status = fetch_status(session, server.url)
        for _ in range(max(1, args.warmup)):
            generate(session, server.url, RETENTION_SIZE, RETENTION_STEPS, args.request_timeout)
        print(f"  measuring {args.retention_window:g} s without retention", file=sys.stderr)
        baseline = measure(server.url, args)
        older_than = time.time() - RETENTION_AGE_S / 2
        database = database_of(server)
        with contextlib.closing(sqlite3.connect(database, timeout=30)) as conn:
            rows_before, old_before = count_rows(conn), count_rows(conn, older_than)
        seed_s = seed_old_jobs(database, args.retention_records)
        seeded_at = time.perf_counter()
        print(f"  seeded {args.retention_records} old records in {seed_s:.2f} s; measuring", file=sys.stderr)
        watch = PassWatch(database, older_than, old_before + args.retention_records, old_before)
        watch.start()
        try:
            during = measure(server.url, args, watch)
        finally:
            watch.stop()
        with contextlib.closing(sqlite3.connect(database, timeout=30)) as conn:
            rows_after = count_rows(conn)
    assert watch.first_drop is not None and watch.done is not None  # measure() returns only once the pass is over
    report = {
        "records": args.retention_records,
        "window_s": args.retention_window,
        "cleanup_interval_s": args.retention_interval,
        "request": {"size": RETENTION_SIZE, "steps": RETENTION_STEPS},
        "devices": [w["device"] for w in status.get("workers", [])],
        "rows_before_seeding": rows_before,
        "rows_after": rows_after,
        "seed_s": seed_s,
        "pass": {
            "wait_s": watch.first_drop - seeded_at,  # seeding committed -> first deletion seen
            "duration_s": watch.done - watch.first_drop,  # first deletion seen -> all seeded rows gone
            "poll_interval_s": RETENTION_POLL_S,
            # when the slowest requests of the "during" window were sent, relative to the first deletion seen
            "slowest_dispatch_at_s": slowest_at(during.dispatch, watch.first_drop),
            "slowest_health_at_s": slowest_at(during.health, watch.first_drop),
        },
        "no_retention": window_figures(baseline),
        "during_retention": window_figures(during),
        "while_deleting": window_figures(during, (watch.first_drop, watch.done)),
    }
    print_retention(report)
    return report


def print_retention(report: dict[str, Any]) -> None:
    n, passed = report["records"], report["pass"]
    print(
        f"retention: own server, {len(report['devices'])} worker(s) [{', '.join(report['devices'])}], "
        f"cleanup every {report['cleanup_interval_s']:g} s, requests {RETENTION_SIZE} px / {RETENTION_STEPS} steps"
    )
    print(f"  seeded {n} old job records in {report['seed_s']:.2f} s (the store held {report['rows_before_seeding']})")
    print(
        f"  retention pass: {passed['duration_s']:.2f} s from the first deletion seen to the last "
        f"(first seen {passed['wait_s']:.1f} s after seeding; polled every {RETENTION_POLL_S * 1000:g} ms); "
        f"{report['rows_after']} rows left"
    )
    print()
    columns = ("no_retention", "during_retention", "while_deleting")
    stats = ("p50_ms", "p99_ms", "max_ms")
    rows = []
    for key, label in (("dispatch", "dispatch (queue_s)"), ("generate", "POST /generate"), ("health", "/health")):
        row = [label]
        for column in columns:
            figures = report[column][key]
            row += [*(ms(figures[stat]) for stat in stats), str(figures["n"])]
        rows.append(row)
    groups = [("no retention", 4), (f"during retention ({n} rows)", 4), ("while deleting", 4)]
    print(format_table(["latency (ms)", *(["p50", "p99", "max", "n"] * len(columns))], rows, groups))
    errors = [report[column]["health_errors"] for column in columns[:2]]
    rates = [report[c]["health"]["n"] / report[c]["seconds"] for c in columns if report[c]["seconds"] > 0]
    print(
        f"/health requests/s (no retention / during / while deleting): {' / '.join(f'{r:.0f}' for r in rates)}; "
        f"failed /health requests: {errors[0]} / {errors[1]}"
    )
    print(
        f"slowest during retention: dispatch sent at {passed['slowest_dispatch_at_s']:+.2f} s, /health at "
        f"{passed['slowest_health_at_s']:+.2f} s from the first deletion seen (the pass begins a little earlier, "
        "with its SELECT)"
    )
    print(
        f"windows: {report['no_retention']['seconds']:.1f} s / {report['during_retention']['seconds']:.1f} s; "
        "p99 of fewer than 100 samples lies between the two slowest"
    )


# --- main ----------------------------------------------------------------------------------------------------


def print_header(args: argparse.Namespace, status: dict[str, Any]) -> None:
    workers = status.get("workers", [])
    devices = ", ".join(f"{w['slot']}:{w['device']}" for w in workers) or "none"
    model = status.get("model", {})
    embedded = " (embedded random-weight test model)" if model.get("embedded_test_model") else ""
    print("GenServe overhead benchmark")
    print(f"  url:      {args.url}  (GenServe {status.get('version', '?')}, status {status.get('status', '?')})")
    print(f"  model:    {model.get('model_id', '?')}{embedded}")
    print(f"  workers:  {len(workers)} [{devices}]")
    print(f"  request:  text2img {args.size}x{args.size}, {args.steps} steps, JSON, one keep-alive connection")
    print(
        f"  runs:     {args.requests} measured sequential requests after {args.warmup} warm-up; "
        f"{args.kill_trials} kill trials"
    )
    print()


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if args.requests or args.kill_trials:
        report.update(run_against_url(args))
    if args.retention_records:
        if report:
            print()
        report["retention"] = run_retention(args)
    return report


def run_against_url(args: argparse.Namespace) -> dict[str, Any]:
    """Phases 1 and 2, against the server at --url."""
    session = requests.Session()
    status = fetch_status(session, args.url)
    check_ready(session, args.url)
    if args.kill_trials:
        require_local_server(args.url)
    print_header(args, status)
    report: dict[str, Any] = {"url": args.url, "devices": [w["device"] for w in status.get("workers", [])]}
    if args.requests:
        report.update(run_phase_overhead(session, args))
    if args.kill_trials:
        if args.requests:
            print()
        report["kill_recovery"] = run_phase_kill(session, args)
    return report


def run_phase_overhead(session: requests.Session, args: argparse.Namespace) -> dict[str, Any]:
    print(f"phase 1: {args.warmup} warm-up + {args.requests} measured requests", file=sys.stderr)
    samples = run_overhead(session, args)
    figures = overhead_figures(samples)
    print_overhead(figures, samples)
    return {
        "size": args.size,
        "steps": args.steps,
        "requests": args.requests,
        "warmup": args.warmup,
        "overhead": figures,
        "targets": {
            "service_overhead_p50_ms": OVERHEAD_TARGET_MS,
            "dispatch_p50_ms": DISPATCH_TARGET_MS,
            "service_overhead_pass": figures["service_overhead"]["p50_ms"] <= OVERHEAD_TARGET_MS,
            "dispatch_pass": figures["dispatch"]["p50_ms"] <= DISPATCH_TARGET_MS,
        },
    }


def run_phase_kill(session: requests.Session, args: argparse.Namespace) -> dict[str, Any]:
    print(f"phase 2: {args.kill_trials} worker kill trials", file=sys.stderr)
    trials, before, after = run_kill_trials(session, args)
    kills = kill_figures(trials)
    print_kill(kills, trials, before, after)
    return {
        **kills,
        "trials": [{k: v for k, v in asdict(t).items() if k != "poll_rtt_s"} for t in trials],
        "total_restarts_before": before,
        "total_restarts_after": after,
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the finally blocks stop phase 3's server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"\nbench_overhead: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_overhead: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print()
        print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
