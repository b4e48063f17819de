#!/usr/bin/env python3
"""What overlapped encoding gains: throughput of one worker with the PNG encode and write on the worker's encoder
thread (performance.overlap_encoding: true) against the same worker encoding inline, before its next job (false).

Two servers of the tool's own (tools/_server.py) on the embedded model, one CPU worker each, both started first
(an idle server costs no CPU). Each gets one warm-up job; then, in turn, each gets a queue of --jobs text2img jobs
(default 20 at 1024², 4 steps), all submitted at once, and the tool waits for every one before the other server's
turn; --rounds repeats the pair, so that a machine whose load drifts treats both alike. Reported per server: the
wall time from the first submission to the last answer, throughput (jobs/s), and the worker's mean pipeline_s and
encode_s; then the gain (throughput with overlap over throughput without) and the ideal gain if encoding were
hidden entirely, (pipeline + encode) / pipeline.

The jobs are sent as concurrent POST /generate requests rather than POST /jobs: the server queues them the same way
(one global queue, one worker), and only /generate's answer carries the worker's pipeline_s and encode_s.

On a CPU the encoder thread competes with the pipeline's own threads for the same cores: with every core given to
torch (the default) expect little or no gain, since nothing is idle. Leave a core free (--cpu-threads, one less than
the cores) to see what a GPU worker gets, whose denoising runs on the device while host cores are free to encode.

Usage:
    .venv/bin/python tools/bench_pipelining.py
    .venv/bin/python tools/bench_pipelining.py --cpu-threads 1 --rounds 2     # on a 2-core machine
    .venv/bin/python tools/bench_pipelining.py --jobs 10 --size 512 --steps 2 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from _server import LocalServer, ServerError, add_embedded_cache_argument, local_server, run_bench

VARIANTS = {"inline": False, "overlap": True}  # name → performance.overlap_encoding


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="text2img jobs in the queue, per server")
    parser.add_argument("--size", type=int, default=1024, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--rounds", type=int, default=1, help="queues per server, taken in turns")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads of the worker; 0: all cores")
    add_embedded_cache_argument(parser)
    return parser.parse_args(argv)


def generate(session: requests.Session, url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    answer = session.post(
        f"{url}/generate",
        json={
            "prompt": f"a lighthouse at dusk, take {seed}",
            "width": args.size,
            "height": args.size,
            "num_inference_steps": args.steps,
            "seed": seed,
        },
        timeout=3600,
    )
    body: dict[str, Any] = answer.json()
    if answer.status_code != 200 or not body.get("success"):
        raise ServerError(f"POST /generate answered {answer.status_code}: {body.get('error')}")
    timings: dict[str, Any] = body["timings"]
    return timings


def config_for(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": {"embedded_cache_dir": str(args.embedded_cache)},
        "workers": {"cpu_workers": 1, "cpu_threads": args.cpu_threads, "max_restarts": 0, "on_budget_spent": "exit"},
        "queue": {"max_size": max(100, args.jobs), "task_timeout_s": 3600},
        "performance": {"overlap_encoding": VARIANTS[name]},
    }


def run_queue(server: LocalServer, args: argparse.Namespace) -> tuple[float, list[dict[str, Any]]]:
    """Submit --jobs jobs at once and wait for all: (wall seconds, each answer's timings)."""
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        sessions = [requests.Session() for _ in range(args.jobs)]
        futures = [pool.submit(generate, sessions[i], server.url, args, 1 + i) for i in range(args.jobs)]
        timings = [future.result() for future in futures]
    return time.perf_counter() - began, timings


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    walls: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    timings: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with contextlib.ExitStack() as stack:
        servers: dict[str, LocalServer] = {}
        for name, overlap in VARIANTS.items():
            print(f"starting the {name} server (overlap_encoding: {str(overlap).lower()})", file=sys.stderr)
            servers[name] = stack.enter_context(local_server(config_for(name, args), ready_timeout_s=600))
            generate(requests.Session(), servers[name].url, args, seed=0)  # warm-up: first-call costs stay out
        for round_ in range(1, args.rounds + 1):
            for name, server in servers.items():
                print(f"  round {round_}: {args.jobs} jobs queued at once on the {name} server", file=sys.stderr)
                wall_s, answers = run_queue(server, args)
                walls[name] += wall_s
                timings[name] += answers
    return {
        name: {
            "wall_s": walls[name],
            "jobs_per_s": len(timings[name]) / walls[name],
            "pipeline_s": statistics.mean(float(t["pipeline_s"]) for t in timings[name]),
            "encode_s": statistics.mean(float(t["encode_s"]) for t in timings[name]),
        }
        for name in VARIANTS
    }


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    rounds = f" x {args.rounds} rounds" if args.rounds > 1 else ""
    what = f"a queue of {args.jobs} text2img jobs{rounds}, {args.size}², {args.steps} steps"
    print(f"\nembedded model, one CPU worker: {what}")
    print(f"  {'encoding':<10}{'wall s':>9}{'jobs/s':>9}{'pipeline_s':>12}{'encode_s':>10}")
    for name, figures in results.items():
        print(
            f"  {name:<10}{figures['wall_s']:>9.2f}{figures['jobs_per_s']:>9.3f}"
            f"{figures['pipeline_s']:>12.3f}{figures['encode_s']:>10.3f}"
        )
    inline, overlap = results["inline"], results["overlap"]
    ideal = (inline["pipeline_s"] + inline["encode_s"]) / inline["pipeline_s"]
    gain = overlap["jobs_per_s"] / inline["jobs_per_s"]
    print(f"  gain: {gain:.3f}x throughput with overlap (ideal, encoding hidden entirely: {ideal:.3f}x)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench_pipelining", lambda: run(args), lambda results: report(results, args))


if __name__ == "__main__":
    sys.exit(main())
