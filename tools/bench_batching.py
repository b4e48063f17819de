#!/usr/bin/env python3
"""What batching the images of one request gains: one worker running num_images=N as one batched pipeline call
(performance.max_batch: N) against the same worker running them one after another (max_batch: 1).

Two servers of the tool's own (tools/_server.py) on the embedded model, one CPU worker each, both started first
(an idle server costs no CPU), each warmed up with one request of each shape. Then, in turns over --rounds, each
server answers --requests requests of --images images (text2img, --size², --steps steps), one request at a time.
Reported per server: the mean wall time of a request, seconds per image, and the worker's pipeline_s per image;
then the gain (sequential time over batched time). The batched server's answers must say batch_size N, the other's
1, or the tool stops: it measures what it claims to.

On a CPU, torch already spreads one image's matmuls over every core, so a batch gains little beyond the prompt
encoded once and fewer per-call costs; a GPU gains more where one image leaves the device idle (small sizes, few
steps). tools/gpu_check.sh measures the GPU.

Usage:
    .venv/bin/python tools/bench_batching.py
    .venv/bin/python tools/bench_batching.py --images 4 --size 512 --steps 4 --requests 3 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Any

import requests

from _server import LocalServer, ServerError, add_embedded_cache_argument, local_server, run_bench

VARIANTS = ("sequential", "batched")  # max_batch 1, max_batch --images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="num_images of each request (at most 4 by default)")
    parser.add_argument("--requests", type=int, default=3, help="requests per server and round")
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--rounds", type=int, default=1, help="turns per server")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads of the worker; 0: all cores")
    add_embedded_cache_argument(parser)
    return parser.parse_args(argv)


def config_for(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": {"embedded_cache_dir": str(args.embedded_cache)},
        "workers": {"cpu_workers": 1, "cpu_threads": args.cpu_threads, "max_restarts": 0, "on_budget_spent": "exit"},
        "queue": {"task_timeout_s": 3600},
        "limits": {"max_images": max(4, args.images)},
        "performance": {
            "max_batch": 1 if name == "sequential" else args.images,
            "batch_pixels": args.images * args.size * args.size,  # the size under test batches whatever it is
        },
    }


def ask(server: LocalServer, args: argparse.Namespace, seed: int, expected_batch: int) -> tuple[float, float]:
    """One request of --images images: (wall seconds, the worker's pipeline seconds per image)."""
    began = time.perf_counter()
    answer = requests.post(
        f"{server.url}/generate",
        json={
            "prompt": f"a lighthouse at dusk, take {seed}",
            "width": args.size,
            "height": args.size,
            "num_inference_steps": args.steps,
            "num_images": args.images,
            "seed": seed,
        },
        timeout=3600,
    )
    wall_s = time.perf_counter() - began
    body: dict[str, Any] = answer.json()
    if answer.status_code != 200 or not body.get("success"):
        raise ServerError(f"POST /generate answered {answer.status_code}: {body.get('error')}")
    timings = body["timings"]
    if timings["batch_size"] != expected_batch:
        raise ServerError(f"expected batches of {expected_batch}, the server ran {timings['batch_size']}")
    per_image = float(timings["pipeline_s"]) / expected_batch  # a batch's pipeline_s is the whole call's
    return wall_s, per_image


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    pipelines: dict[str, list[float]] = {name: [] for name in VARIANTS}
    batch = {"sequential": 1, "batched": args.images}
    with contextlib.ExitStack() as stack:
        servers: dict[str, LocalServer] = {}
        for name in VARIANTS:
            print(
                f"starting the {name} server (max_batch {config_for(name, args)['performance']['max_batch']})",
                file=sys.stderr,
            )
            servers[name] = stack.enter_context(local_server(config_for(name, args), ready_timeout_s=600))
            ask(servers[name], args, seed=0, expected_batch=batch[name])  # warm-up: first-call costs stay out
        for round_ in range(1, args.rounds + 1):
            for name, server in servers.items():
                print(
                    f"  round {round_}: {args.requests} requests of {args.images} on the {name} server", file=sys.stderr
                )
                for index in range(args.requests):
                    wall_s, per_image = ask(server, args, seed=100 * round_ + index, expected_batch=batch[name])
                    walls[name].append(wall_s)
                    pipelines[name].append(per_image)
    return {
        name: {
            "request_s": statistics.mean(walls[name]),
            "image_s": statistics.mean(walls[name]) / args.images,
            "pipeline_image_s": statistics.mean(pipelines[name]),
        }
        for name in VARIANTS
    }


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    rounds = f" x {args.rounds} rounds" if args.rounds > 1 else ""
    what = f"{args.requests} requests{rounds} of num_images={args.images}, text2img {args.size}², {args.steps} steps"
    print(f"\nembedded model, one CPU worker: {what}")
    print(f"  {'variant':<12}{'request s':>11}{'s/image':>10}{'pipeline s/image':>18}")
    for name, figures in results.items():
        print(
            f"  {name:<12}{figures['request_s']:>11.3f}{figures['image_s']:>10.3f}{figures['pipeline_image_s']:>18.3f}"
        )
    gain = results["sequential"]["request_s"] / results["batched"]["request_s"]
    print(f"  gain: {gain:.3f}x (a request's time run one by one over its time as one batch)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench_batching", lambda: run(args), lambda results: report(results, args))


if __name__ == "__main__":
    sys.exit(main())
