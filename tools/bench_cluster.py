#!/usr/bin/env python3
"""What the Redis cluster backend costs and buys, measured from the outside on servers of the benchmark's own.

Everything runs on this machine: a ``redis-server`` on a free loopback port (Debian's package; the benchmark
says how to install it when it is missing) and GenServe processes (``python -m genserve``, the embedded test
model on the CPU, one worker per process with ``workers.cpu_threads: 1``, text2img at ``--size`` with ``--steps``),
in a temporary folder removed at the end. All are stopped whatever happens (an error, Ctrl-C, SIGTERM).

Phase 1, dispatch latency (``--dispatch-jobs`` N, after ``--warmup`` uncounted jobs): N jobs one after another on
an idle worker, each through POST /jobs, its events followed on GET /jobs/{id}/events (SSE) until it ends, then
read with GET /jobs/{id}, with a pause of ``--gap`` seconds between jobs so the worker is idle and waiting again.
For each job:

    server   submitted_at -> started_at    the job record's two wall clocks: the API process stamps the
                                           submission, the worker its start (one machine, one clock)
    client   POST sent -> started_at       the client's wall clock as it sends the POST, to the worker's start:
                                           adds the HTTP request and the intake before submitted_at
    client   POST sent -> 'started' seen   ... until the client reads the job's 'started' event on its SSE
                                           stream (opened after the 202): adds the event's way back to the
                                           client; when the job started before the stream was open, it is the
                                           time the stream opened (an upper bound)
    client   POST round trip               POST /jobs sent -> 202 received

p50 and p99 (linear interpolation; with 50 jobs p99 is about the slowest) for the local backend (one
``python -m genserve``: API and one CPU worker in one service) and the redis backend (one API node and one worker
node on the Redis), and their ratio redis / local.

Phase 2, throughput (``--throughput-jobs`` M): one API node; M jobs submitted at once (POST /jobs from 8 client
threads), then GET /jobs polled until all have ended; the wall time runs from just before the first POST to the
last job's finished_at (both wall clocks of this machine). First with one worker node, then with a second worker
node added to the same cluster; jobs/s and the ratio 2 nodes / 1 node, and how many jobs each node ran. Before
each measurement 4 uncounted jobs per node warm the workers up. For reference the same M jobs also run on the
local backend's single worker (phase 1's server). Each node runs one worker with one torch thread, so two nodes
fit on two cores — but on a 2-core machine the API node, Redis, the client and both nodes' own processes share
those two cores with the workers: the ratio says what this machine gives, not what two machines would.

Usage:
    .venv/bin/python tools/bench_cluster.py                                  # 50 dispatch jobs, 60 throughput jobs
    .venv/bin/python tools/bench_cluster.py --dispatch-jobs 100 --throughput-jobs 120 --steps 1
    .venv/bin/python tools/bench_cluster.py --throughput-jobs 0 --json      # phase 1 only; figures also as JSON

Exit status: 0 when every phase ran and every job completed; 1 when redis-server is missing, a server does not
start, a request fails or a job does not complete; 2 for a usage error; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
from rich.console import Console
from rich.table import Table

from _cluster import Cluster, own_cluster
from _measure import versions
from _server import ServerError, add_embedded_cache_argument, local_server

PROMPT = "a lighthouse on a cliff at dusk, cluster benchmark"
TERMINAL = ("completed", "failed", "canceled")
SUBMIT_THREADS = 8
POLL_S = 0.1  # phase 2: GET /jobs polling while the jobs run
WARMUP_PER_NODE = 4

# Piped into a file the tables keep their rows on one line each (rich would fold them at 80 columns).
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 150)


class BenchError(Exception):
    """A failure that ends the benchmark with a message and exit status 1."""


# --- command line --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark of GenServe's Redis cluster backend on servers of its own: dispatch latency "
        "(local vs redis backend) and throughput (1 vs 2 worker nodes), CPU and the embedded model.",
        epilog="See the module docstring for what each figure measures.",
    )
    parser.add_argument(
        "--dispatch-jobs",
        type=int,
        default=50,
        metavar="N",
        help="phase 1: sequential jobs per backend, 0 skips the phase (default %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, metavar="N", help="phase 1: uncounted jobs first (default %(default)s)"
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=0.05,
        metavar="S",
        help="phase 1: pause between jobs, so the worker waits idle (default %(default)s)",
    )
    parser.add_argument(
        "--throughput-jobs",
        type=int,
        default=60,
        metavar="M",
        help="phase 2: jobs submitted at once per measurement, 0 skips the phase (default %(default)s)",
    )
    parser.add_argument("--size", type=int, default=64, help="image width and height (default %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="num_inference_steps of every job (default %(default)s)")
    parser.add_argument(
        "--lease",
        type=float,
        default=5.0,
        metavar="S",
        help="the cluster's cluster.lease_s (default %(default)s, GenServe's default)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="how long the servers may take to be ready (default %(default)s; the first start may build the "
        "embedded model)",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="how long one job, or phase 2's whole batch, may take (default %(default)s)",
    )
    add_embedded_cache_argument(parser)
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON object at the end")
    args = parser.parse_args(argv)
    if min(args.dispatch_jobs, args.warmup, args.throughput_jobs) < 0:
        parser.error("--dispatch-jobs, --warmup and --throughput-jobs must not be negative")
    if not (args.dispatch_jobs or args.throughput_jobs):
        parser.error("nothing to do: --dispatch-jobs and --throughput-jobs are both 0")
    if args.size < 16 or args.size % 16:
        parser.error("--size must be a multiple of 16, at least 16")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.gap < 0 or args.lease < 0.5:
        parser.error("--gap must not be negative and --lease must be at least 0.5")
    args.embedded_cache = Path(args.embedded_cache).expanduser()
    return args


# --- figures -------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b <= 0 else f"{a / b:.2f}x"


@dataclass
class DispatchSample:
    server_s: float  # submitted_at -> started_at
    client_start_s: float  # POST sent -> started_at
    client_seen_s: float  # POST sent -> 'started' event read by the client
    post_s: float  # POST round trip


DISPATCH_ROWS = (
    ("server: submitted_at -> started_at", "server_s"),
    ("client: POST sent -> started_at", "client_start_s"),
    ("client: POST sent -> 'started' seen (SSE)", "client_seen_s"),
    ("client: POST /jobs round trip", "post_s"),
)


def dispatch_figures(samples: list[DispatchSample]) -> dict[str, dict[str, float]]:
    figures = {}
    for _, name in DISPATCH_ROWS:
        values = [getattr(sample, name) * 1000 for sample in samples]
        figures[name] = {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99), "max_ms": max(values)}
    return figures


@dataclass
class Throughput:
    label: str
    jobs: int
    wall_s: float  # first POST sent -> last finished_at
    seen_s: float  # first POST sent -> the client saw the last job end
    submit_s: float  # first POST sent -> the last job's submitted_at
    by_node: dict[str, int]

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s if self.wall_s > 0 else math.nan


# --- HTTP ----------------------------------------------------------------------------------------------------


def job_fields(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "width": args.size, "height": args.size, "num_inference_steps": args.steps, "seed": seed}


def submit(session: requests.Session, base: str, fields: dict[str, Any]) -> str:
    try:
        response = session.post(f"{base}/jobs", json=fields, timeout=30)
    except requests.RequestException as exc:
        raise BenchError(f"POST /jobs: {exc}") from None
    if response.status_code != 202:
        raise BenchError(f"POST /jobs answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["task_id"])


def get_view(session: requests.Session, base: str, task_id: str) -> dict[str, Any]:
    try:
        response = session.get(f"{base}/jobs/{task_id}", timeout=30)
    except requests.RequestException as exc:
        raise BenchError(f"GET /jobs/{task_id}: {exc}") from None
    if response.status_code != 200:
        raise BenchError(f"GET /jobs/{task_id} answered {response.status_code}: {response.text[:300]}")
    view: dict[str, Any] = response.json()
    return view


def follow_events(session: requests.Session, base: str, task_id: str, timeout_s: float) -> tuple[float, str]:
    """Read the job's SSE stream until its terminal event → (wall clock the 'started' event was read, final kind)."""
    started_seen = math.nan
    kind = ""
    try:
        with session.get(f"{base}/jobs/{task_id}/events", stream=True, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise BenchError(f"GET /jobs/{task_id}/events answered {response.status_code}")
            for raw in response.iter_lines(chunk_size=None):
                line = raw.decode() if isinstance(raw, bytes) else raw
                if not line.startswith("event:"):
                    continue
                kind = line.partition(":")[2].strip()
                if kind == "started" and math.isnan(started_seen):
                    started_seen = time.time()
                if kind in TERMINAL:
                    return started_seen, kind
    except requests.RequestException as exc:
        raise BenchError(f"GET /jobs/{task_id}/events: {exc}") from None
    raise BenchError(f"the events of job {task_id} ended before a terminal event (last: {kind or 'none'})")


def one_dispatch(session: requests.Session, base: str, args: argparse.Namespace, seed: int) -> DispatchSample:
    sent_wall, sent = time.time(), time.perf_counter()
    task_id = submit(session, base, job_fields(args, seed))
    post_s = time.perf_counter() - sent
    started_seen, kind = follow_events(session, base, task_id, args.job_timeout)
    view = get_view(session, base, task_id)
    if kind != "completed" or view.get("status") != "completed":
        raise BenchError(f"job {task_id} ended {view.get('status')}: {view.get('error')}")
    started_at, submitted_at = float(view["started_at"]), float(view["submitted_at"])
    if math.isnan(started_seen):  # no 'started' event came (it is always sent; never seen so far)
        started_seen = time.time()
    return DispatchSample(
        server_s=started_at - submitted_at,
        client_start_s=started_at - sent_wall,
        client_seen_s=started_seen - sent_wall,
        post_s=post_s,
    )


def measure_dispatch(base: str, args: argparse.Namespace, label: str) -> list[DispatchSample]:
    session = requests.Session()
    samples = []
    total = args.warmup + args.dispatch_jobs
    for index in range(total):
        sample = one_dispatch(session, base, args, seed=index)
        if index >= args.warmup:
            samples.append(sample)
        time.sleep(args.gap)
    figures = dispatch_figures(samples)["server_s"]
    say(f"  {label}: {len(samples)} jobs, dispatch p50 {ms(figures['p50_ms'])} ms, p99 {ms(figures['p99_ms'])} ms")
    return samples


def run_batch(base: str, args: argparse.Namespace, count: int, seed: int) -> tuple[list[dict[str, Any]], float, float]:
    """Submit ``count`` jobs at once and wait for all → (their final views, submission wall clock, seconds until
    the client saw the last one end)."""
    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return local.session  # type: ignore[no-any-return]

    began_wall, began = time.time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=SUBMIT_THREADS, thread_name_prefix="bench-submit") as pool:
        ids = list(pool.map(lambda i: submit(session(), base, job_fields(args, seed + i)), range(count)))
    submitted_s = time.perf_counter() - began
    wanted = set(ids)
    views: dict[str, dict[str, Any]] = {}
    poller = requests.Session()
    deadline = time.monotonic() + args.job_timeout
    while True:
        try:
            answer = poller.get(f"{base}/jobs", params={"limit": max(100, 2 * count)}, timeout=30).json()
        except (requests.RequestException, ValueError) as exc:
            raise BenchError(f"GET /jobs: {exc}") from None
        for view in answer.get("jobs") or []:
            if view.get("task_id") in wanted and view.get("status") in TERMINAL:
                views[view["task_id"]] = view
        if len(views) == count:
            return [views[task_id] for task_id in ids], began_wall, time.perf_counter() - began
        if time.monotonic() > deadline:
            raise BenchError(
                f"{count - len(views)} of {count} jobs not ended within {args.job_timeout:g} s "
                f"(submitted in {submitted_s:.1f} s)"
            )
        time.sleep(POLL_S)


def measure_throughput(base: str, args: argparse.Namespace, label: str, nodes: int) -> Throughput:
    run_batch(base, args, WARMUP_PER_NODE * nodes, seed=10_000)  # uncounted: every worker has run a job
    views, began_wall, seen_s = run_batch(base, args, args.throughput_jobs, seed=20_000)
    failed = [view for view in views if view.get("status") != "completed"]
    if failed:
        errors = Counter(str((view.get("error") or {}).get("type") or view.get("status")) for view in failed)
        raise BenchError(f"{label}: {len(failed)} of {len(views)} jobs did not complete: {dict(errors)}")
    result = Throughput(
        label=label,
        jobs=len(views),
        wall_s=max(float(view["finished_at"]) for view in views) - began_wall,
        seen_s=seen_s,
        submit_s=max(float(view["submitted_at"]) for view in views) - began_wall,
        by_node=dict(sorted(Counter(str(view.get("node") or "local") for view in views).items())),
    )
    say(f"  {label}: {result.jobs} jobs in {result.wall_s:.2f} s, {result.jobs_per_s:.2f} jobs/s")
    return result


# --- servers -------------------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def common_sections(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": {"embedded_cache_dir": str(args.embedded_cache), "modes": ["text2img"]},
        "queue": {"max_size": max(100, 2 * args.throughput_jobs + 16)},
        "defaults": {"width": args.size, "height": args.size, "num_inference_steps": args.steps},
    }


def worker_sections() -> dict[str, Any]:
    # One worker with one torch thread; a worker that cannot start ends its server instead of retrying for ever.
    return {"workers": {"cpu_workers": 1, "cpu_threads": 1, "max_restarts": 2, "on_budget_spent": "exit"}}


@contextmanager
def local_backend(args: argparse.Namespace) -> Iterator[str]:
    """One ``python -m genserve`` (backend local: API and one CPU worker) → its URL."""
    with tempfile.TemporaryDirectory(prefix="genserve-bench-cluster-") as folder:
        config = {**common_sections(args), **worker_sections(), "results": {"dir": str(Path(folder) / "results")}}
        with local_server(config, args.start_timeout, Path(folder)) as server:
            yield server.url


@contextmanager
def redis_backend(args: argparse.Namespace) -> Iterator[Cluster]:
    """A Redis, one API node and one worker node."""
    node_config = {**common_sections(args), **worker_sections()}
    with own_cluster(node_config, 1, args.start_timeout, common_sections(args), lease_s=args.lease) as cluster:
        yield cluster


# --- report --------------------------------------------------------------------------------------------------


def print_header(args: argparse.Namespace) -> None:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    physical = psutil.cpu_count(logical=False)
    ram = psutil.virtual_memory().total / 2**30
    found = versions()
    console.print("GenServe cluster benchmark", style="bold", highlight=False)
    console.print(
        f"  machine:  {os.cpu_count()} logical cores ({physical} physical), {cpu}, {ram:.1f} GiB RAM; "
        f"python {found['python']}, torch {found.get('torch')}",
        highlight=False,
    )
    console.print(
        f"  jobs:     text2img {args.size}x{args.size}, {args.steps} steps, embedded random-weight test model, CPU; "
        "every GenServe process has one worker with workers.cpu_threads 1",
        highlight=False,
    )
    console.print(
        f"  phase 1:  {args.dispatch_jobs} sequential jobs per backend after {args.warmup} warm-up, "
        f"{args.gap:g} s apart; local = one python -m genserve; redis = one API node + one worker node",
        highlight=False,
    )
    console.print(
        f"  phase 2:  {args.throughput_jobs} jobs submitted at once ({SUBMIT_THREADS} client threads) to one API "
        f"node, 1 then 2 worker nodes; {WARMUP_PER_NODE} warm-up jobs per node first; cluster.lease_s {args.lease:g}",
        highlight=False,
    )
    console.print()


def dispatch_table(local: list[DispatchSample], redis: list[DispatchSample]) -> Table:
    table = Table(title=f"dispatch latency, ms ({len(local)} / {len(redis)} sequential jobs on an idle worker)")
    table.add_column("measure")
    for name in ("local p50", "local p99", "redis p50", "redis p99", "redis/local p50", "redis/local p99"):
        table.add_column(name, justify="right")
    local_figures, redis_figures = dispatch_figures(local), dispatch_figures(redis)
    for label, name in DISPATCH_ROWS:
        a, b = local_figures[name], redis_figures[name]
        table.add_row(
            label,
            ms(a["p50_ms"]),
            ms(a["p99_ms"]),
            ms(b["p50_ms"]),
            ms(b["p99_ms"]),
            ratio(b["p50_ms"], a["p50_ms"]),
            ratio(b["p99_ms"], a["p99_ms"]),
        )
    return table


def throughput_table(rows: list[Throughput]) -> Table:
    table = Table(title=f"throughput: {rows[0].jobs} jobs submitted at once")
    for name in ("setup", "jobs", "wall s", "jobs/s", "vs 1 node", "client saw all end s", "jobs per node"):
        table.add_column(name, justify="left" if name in ("setup", "jobs per node") else "right")
    one = next((row for row in rows if row.label == "redis, 1 worker node"), None)
    for row in rows:
        table.add_row(
            row.label,
            str(row.jobs),
            f"{row.wall_s:.2f}",
            f"{row.jobs_per_s:.2f}",
            ratio(row.jobs_per_s, one.jobs_per_s) if one is not None else "n/a",
            f"{row.seen_s:.2f}",
            ", ".join(f"{node}: {count}" for node, count in row.by_node.items()),
        )
    return table


# --- main ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "cores": os.cpu_count()}
    local_samples: list[DispatchSample] = []
    redis_samples: list[DispatchSample] = []
    rows: list[Throughput] = []
    say("local backend: starting one python -m genserve")
    with local_backend(args) as url:
        if args.dispatch_jobs:
            local_samples = measure_dispatch(url, args, "local")
        if args.throughput_jobs:
            rows.append(measure_throughput(url, args, "local, 1 worker (reference)", 1))
    say("redis backend: starting redis-server, one API node and one worker node")
    with redis_backend(args) as cluster:
        assert cluster.api is not None
        if args.dispatch_jobs:
            redis_samples = measure_dispatch(cluster.api.url, args, "redis")
        if args.throughput_jobs:
            rows.append(measure_throughput(cluster.api.url, args, "redis, 1 worker node", 1))
            say("redis backend: adding a second worker node")
            cluster.add_node(args.start_timeout)
            rows.append(measure_throughput(cluster.api.url, args, "redis, 2 worker nodes", 2))
        report["redis_server"] = cluster.redis.version()
    console.print()
    if local_samples and redis_samples:
        console.print(dispatch_table(local_samples, redis_samples))
        report["dispatch"] = {
            "local": dispatch_figures(local_samples),
            "redis": dispatch_figures(redis_samples),
            "samples": {"local": [asdict(s) for s in local_samples], "redis": [asdict(s) for s in redis_samples]},
        }
    if rows:
        console.print(throughput_table(rows))
        report["throughput"] = [{**asdict(row), "jobs_per_s": row.jobs_per_s} for row in rows]
        if os.cpu_count() and (os.cpu_count() or 0) <= 2:
            console.print(
                f"note: this machine has {os.cpu_count()} cores: the two worker nodes share them with the API node, "
                "Redis and this client, so the 2-node ratio is what one small machine gives, not two machines.",
                highlight=False,
            )
    return report


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the context managers stop every server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    print_header(args)
    try:
        report = run(args)
    except (BenchError, ServerError) as exc:
        print(f"\nbench_cluster: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_cluster: interrupted", file=sys.stderr)
        return 130
    if args.json:
        console.print()
        print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
