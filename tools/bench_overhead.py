#!/usr/bin/env python3
"""Measure GenServe's service overhead and worker kill recovery, from the outside (HTTP only).

Client-only: this script never imports genserve or the workers; it speaks HTTP to a running server with
``requests`` and reads ``/status``. Phase 2 sends SIGKILL to a worker process, so for that phase the server must
run on this machine (as the same user); ``--kill-trials 0`` skips it.

Phase 1 (overhead): N sequential text2img requests to POST /generate, after some uncounted warm-up requests.
For each one it records the client end-to-end latency (perf_counter around the HTTP call, over one keep-alive
session) and the server's ``timings``: total_s (server-side request time), pipeline_s and encode_s (measured on
the worker) and queue_s (dispatch: submit until the job starts on an idle worker). It prints p50/p95/mean/max of

    end-to-end latency
    pipeline time, encode time            (the model and the PNG encoder: not overhead)
    service overhead  = end-to-end - pipeline - encode   (HTTP, JSON, base64, queueing, pipes: everything else)
    server overhead   = total_s - pipeline - encode      (the part of it spent inside the API process)
    dispatch          = queue_s

against the targets: service overhead <= 10 ms p50 and dispatch <= 2 ms p50, and a breakdown of where the
overhead goes (dispatch / rest of the server / outside the server).

Phase 2 (kill recovery, K trials): take a ready worker's pid from /status, SIGKILL it, poll /status every ~5 ms
and report how long until the slot is seen dead (state "dead", or already "starting" with a new pid) and until it
is "ready" again with a new pid. "Seen dead" includes the polling granularity (one poll interval plus one /status
round trip at most). Each trial spends one of the slot's respawns: the supervisor allows workers.max_restarts
(default 10) per restart_window_s (600 s), so repeated runs against one server soon leave the slot dead.

Usage:
    .venv/bin/python tools/bench_overhead.py          # localhost:12411, 50 requests, 512 px, 4 steps
    .venv/bin/python tools/bench_overhead.py --url http://127.0.0.1:12488 --requests 30 --kill-trials 2
    .venv/bin/python tools/bench_overhead.py --size 1024 --steps 28 --kill-trials 0      # overhead only
    .venv/bin/python tools/bench_overhead.py --json > bench.txt   # figures also as one JSON object at the end

Exit status: 0 when the benchmark ran (targets missed or not), 1 when the server is unreachable or not ready, a
request fails, or a killed worker does not come back.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests

OVERHEAD_TARGET_MS = 10.0  # service overhead, p50
DISPATCH_TARGET_MS = 2.0  # queue_s, p50
POLL_INTERVAL_S = 0.005  # /status polling during kill trials
PROMPT = "a lighthouse on a cliff at dusk, benchmark request"


class BenchError(Exception):
    """A failure that ends the benchmark with a message and exit status 1."""


# --- command line --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Client-side benchmark of GenServe's service overhead and worker kill recovery."
    )
    parser.add_argument("--url", default="http://localhost:12411", help="server base URL (default %(default)s)")
    parser.add_argument("--requests", type=int, default=50, metavar="N", help="measured requests (default %(default)s)")
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
    parser.add_argument("--json", action="store_true", help="also print all figures as one JSON object at the end")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.warmup < 0 or args.kill_trials < 0:
        parser.error("--warmup and --kill-trials must not be negative")
    args.url = args.url.rstrip("/")
    return args


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


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain aligned text: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(cells) if i]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


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
        parent = proc.parent()
        own = " ".join(proc.cmdline())
        parent_cmd = " ".join(parent.cmdline()) if parent else ""
    except psutil.NoSuchProcess:
        raise BenchError(f"worker pid {pid} from /status does not exist here; is the server on this machine?") from None
    except psutil.AccessDenied:
        raise BenchError(f"not allowed to inspect worker pid {pid}; run as the server's user") from None
    if parent is None or not ("multiprocessing" in own or "genserve" in own):
        raise BenchError(f"pid {pid} does not look like a GenServe worker ({own[:80]!r}); not killing it")
    if _listens_on(parent, port) is False and "genserve" not in parent_cmd:
        raise BenchError(f"pid {pid}'s parent {parent.pid} is not the server on port {port}; not killing it")


def _listens_on(proc: psutil.Process, port: int) -> bool | None:
    """Whether proc has a listening TCP socket on port; None when that cannot be seen."""
    try:
        connections = proc.net_connections(kind="tcp")
    except (psutil.AccessDenied, psutil.NoSuchProcess, AttributeError):
        return None
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


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
    def p50_max(values_s: list[float]) -> dict[str, float]:
        return {"p50_ms": percentile(values_s, 50) * 1000, "max_ms": max(values_s) * 1000}

    rtts = [rtt for trial in trials for rtt in trial.poll_rtt_s]
    return {
        "seen_dead": p50_max([t.seen_dead_s for t in trials]),
        "respawned": p50_max([t.respawned_s for t in trials]),
        "ready_again": p50_max([t.ready_s for t in trials]),
        "status_poll_rtt": p50_max(rtts),
    }


def print_kill(figures: dict[str, dict[str, float]], trials: list[KillTrial], before: int, after: int) -> None:
    labels = [
        ("seen_dead", "(a) seen dead: kill -> slot dead/respawning"),
        ("respawned", "    respawned: kill -> new pid (loading)"),
        ("ready_again", "(b) ready again: kill -> ready, new pid"),
        ("status_poll_rtt", "    /status poll round trip"),
    ]
    rows = [[label, ms(figures[key]["p50_ms"]), ms(figures[key]["max_ms"])] for key, label in labels]
    print(format_table(["kill recovery (ms)", "p50", "max"], rows))
    polls = sum(t.polls for t in trials)
    print(
        f"note: (a) includes the polling granularity: up to one {POLL_INTERVAL_S * 1000:g} ms poll interval plus one "
        f"/status round trip ({polls} polls over {len(trials)} trials)."
    )
    print("      (b) includes the supervisor's respawn backoff and the new worker's pipeline load.")
    expected = before + len(trials)
    mark = "ok" if after == expected else f"UNEXPECTED, expected {expected}"
    print(f"concurrent_manager.total_restarts: {before} -> {after} ({mark})")


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
    session = requests.Session()
    status = fetch_status(session, args.url)
    check_ready(session, args.url)
    if args.kill_trials:
        require_local_server(args.url)
    print_header(args, status)

    print(f"phase 1: {args.warmup} warm-up + {args.requests} measured requests", file=sys.stderr)
    samples = run_overhead(session, args)
    figures = overhead_figures(samples)
    print_overhead(figures, samples)
    report: dict[str, Any] = {
        "url": args.url,
        "devices": [w["device"] for w in status.get("workers", [])],
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
    if args.kill_trials:
        print()
        print(f"phase 2: {args.kill_trials} worker kill trials", file=sys.stderr)
        trials, before, after = run_kill_trials(session, args)
        kills = kill_figures(trials)
        print_kill(kills, trials, before, after)
        report["kill_recovery"] = {
            **kills,
            "trials": [{k: v for k, v in asdict(t).items() if k != "poll_rtt_s"} for t in trials],
            "total_restarts_before": before,
            "total_restarts_after": after,
        }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
