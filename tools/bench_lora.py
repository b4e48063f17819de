#!/usr/bin/env python3
"""What a per-request LoRA costs a worker, and how many adapter loads the dispatcher's LoRA affinity saves.

Part 1: one server of the tool's own (tools/_server.py) on the embedded model, one CPU worker, loras.max_loaded large
enough that nothing is ever unloaded. Each of --reps rounds runs, one job at a time (text2img, --size², --steps):

- base:   a job without LoRA after a job without LoRA (the reference);
- first:  a job with a LoRA this worker never loaded (its load is part of the job);
- warm:   the same LoRA again (already loaded and active);
- switch: a job with another LoRA, loaded earlier and still held, right after the first one (set_adapters only);
- none:   a job without LoRA right after one with (the adapters turned off, the fused attentions back).

Fresh loads without a restart: before the rounds the tool copies the embedded model's LoRA under new names
(bench-first-1, bench-first-2, ...) into the server's catalogue with POST /loras, so each round's "first" names a
LoRA the worker has never seen. Each case is proved to be what it claims by the worker's ``loras.loads`` and
``loras.unloads`` in /status, read after every job: "first" must add exactly one load, every other case none, and
nothing may be unloaded; otherwise the tool stops. Reported per case: the response's ``timings.pipeline_s`` (which
includes activating the adapters, and so a load) and the client's wall time, mean over the rounds.

Part 2: a second server with two CPU workers and loras.max_loaded 1 gets --stream jobs that alternate between two
LoRAs (A, B, A, B, ...), one at a time. Reported: the adapter loads the server made (/status ``loras.adapter_loads``;
measured, the dispatcher as it is, with affinity), and the loads a dispatcher without affinity would make on the
same stream (simulated: it takes the lowest idle slot each time, and each worker keeps one adapter, least recently
used out). There is no setting that turns affinity off, so that line is computed, not measured; the simulation of
the affinity rule is printed too, as a check of the simulator against the measurement.

Usage:
    .venv/bin/python tools/bench_lora.py
    .venv/bin/python tools/bench_lora.py --size 256 --steps 4 --reps 3 --stream 12
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from _server import LocalServer, ServerError, add_embedded_cache_argument, local_server

CASES = ("base", "first", "warm", "switch", "none")
AFTER = {
    "base": "a job without LoRA",
    "first": "a job without LoRA",
    "warm": "the same LoRA",
    "switch": "another loaded LoRA",
    "none": "a job with a LoRA",
}
EXPECTED_LOADS = {"base": 0, "first": 1, "warm": 0, "switch": 0, "none": 0}
WEIGHT = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--reps", type=int, default=3, help="rounds of the five cases on the one-worker server")
    parser.add_argument("--stream", type=int, default=12, help="jobs of the alternating stream on the two workers")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads of each worker; 0: all cores")
    add_embedded_cache_argument(parser, "; its LoRA files are copied for part 1")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.stream < 2:
        parser.error("--reps must be at least 1 and --stream at least 2")
    return args


def config_for(args: argparse.Namespace, workers: int, max_loaded: int, loras_dir: Path) -> dict[str, Any]:
    return {
        "model": {"embedded_cache_dir": str(args.embedded_cache)},
        "workers": {
            "cpu_workers": workers,
            "cpu_threads": args.cpu_threads,
            "max_restarts": 0,
            "on_budget_spent": "exit",
        },
        "queue": {"task_timeout_s": 3600},
        "loras": {"dir": str(loras_dir), "max_loaded": max_loaded},
    }


# --- HTTP --------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    wall_s: float
    pipeline_s: float
    worker_id: Any


def generate(server: LocalServer, args: argparse.Namespace, lora: str | None, seed: int) -> Answer:
    """One text2img job, with ``lora`` at WEIGHT or without LoRA; the answer's echo is checked."""
    fields: dict[str, Any] = {
        "prompt": f"a lighthouse at dusk, take {seed}",
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "seed": seed,
    }
    if lora is not None:
        fields["loras"] = [{"name": lora, "weight": WEIGHT}]
    began = time.perf_counter()
    response = requests.post(f"{server.url}/generate", json=fields, timeout=3600)
    wall_s = time.perf_counter() - began
    body: dict[str, Any] = response.json()
    if response.status_code != 200 or not body.get("success"):
        raise ServerError(f"POST /generate answered {response.status_code}: {body.get('error')}")
    echoed = [entry.get("name") for entry in body.get("loras") or []]
    if echoed != ([lora] if lora else []):
        raise ServerError(f"asked for LoRA {lora!r}, the answer echoes {body.get('loras')!r}")
    return Answer(wall_s, float(body["timings"]["pipeline_s"]), body.get("worker_id"))


def worker_loras(server: LocalServer) -> list[dict[str, Any]]:
    """Each worker's ``loras`` view in /status: held, loads, unloads, adapter_mib."""
    return [worker["loras"] for worker in server.status()["workers"]]


def catalogue_names(server: LocalServer) -> list[str]:
    loras = requests.get(f"{server.url}/loras", timeout=30).json()["loras"]
    return [str(lora["name"]) for lora in loras if lora.get("fits", {}).get("transformer")]


def embedded_lora_file(cache: Path, name: str) -> Path:
    """The newest embedded model's copy of LoRA ``name`` (the server built or reused it before it was ready)."""

    def version(folder: Path) -> int:
        match = re.search(r"(\d+)$", folder.name)
        return int(match.group(1)) if match else -1

    for folder in sorted(cache.glob("flux-embedded-v*"), key=version, reverse=True):
        path = folder / "loras" / f"{name}.safetensors"
        if path.is_file():
            return path
    raise ServerError(f"no embedded LoRA file {name}.safetensors under {cache}")


def add_copy(server: LocalServer, source: Path, name: str) -> None:
    """POST /loras: ``source`` as a new catalogue LoRA ``name`` (a name the worker has never loaded)."""
    with open(source, "rb") as handle:
        response = requests.post(
            f"{server.url}/loras",
            files={"file": (f"{name}.safetensors", handle, "application/octet-stream")},
            data={"name": name},
            timeout=60,
        )
    if response.status_code != 201:
        raise ServerError(f"POST /loras ({name}) answered {response.status_code}: {response.text[:300]}")


# --- part 1: the cost of a LoRA on one worker ---------------------------------------------------------------------


@dataclass
class CaseFigures:
    wall_s: list[float] = field(default_factory=list)
    pipeline_s: list[float] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)  # the worker's loads added by each job of the case


def run_costs(args: argparse.Namespace, folder: Path) -> dict[str, CaseFigures]:
    loras_dir = folder / "loras-costs"
    loras_dir.mkdir()
    figures = {case: CaseFigures() for case in CASES}
    config = config_for(args, workers=1, max_loaded=args.reps + 2, loras_dir=loras_dir)
    print(f"starting the one-worker server (loras.max_loaded {args.reps + 2})", file=sys.stderr)
    with local_server(config, ready_timeout_s=600) as server:
        names = catalogue_names(server)
        if not names:
            raise ServerError("the catalogue has no LoRA that fits the base transformer")
        other = names[-1]  # the LoRA "switch" turns to: loaded once in the warm-up, held from then on
        source = embedded_lora_file(args.embedded_cache, names[0])
        fresh = [f"bench-first-{index}" for index in range(1, args.reps + 1)]
        for name in fresh:
            add_copy(server, source, name)
        # Warm-up: first-call costs stay out, and "other" is loaded before the rounds.
        for lora in (None, other, None):
            generate(server, args, lora, seed=0)
        seed = 1
        for round_ in range(1, args.reps + 1):
            print(f"  round {round_}: {', '.join(CASES)}", file=sys.stderr)
            plan = {"base": None, "first": fresh[round_ - 1], "warm": fresh[round_ - 1], "switch": other, "none": None}
            for case in CASES:
                before = worker_loras(server)[0]
                answer = generate(server, args, plan[case], seed)
                after = worker_loras(server)[0]
                seed += 1
                prove(case, plan[case], before, after)
                figures[case].wall_s.append(answer.wall_s)
                figures[case].pipeline_s.append(answer.pipeline_s)
                figures[case].loads.append(after["loads"] - before["loads"])
    return figures


def prove(case: str, lora: str | None, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Stop unless the worker's counters show ``case`` is what it claims: the loads it made, nothing unloaded, and
    for a LoRA case the LoRA held (for switch: held already before the job)."""
    loads = after["loads"] - before["loads"]
    if loads != EXPECTED_LOADS[case]:
        raise ServerError(f"'{case}' should load {EXPECTED_LOADS[case]} adapter(s), the worker loaded {loads}")
    if after["unloads"] != before["unloads"]:
        raise ServerError(f"'{case}' unloaded an adapter: raise loras.max_loaded")
    if lora is not None:
        holds = [key for key in after["held"] if key.startswith(f"base/{lora}@")]
        if not holds:
            raise ServerError(f"after '{case}' the worker does not hold {lora}: {after['held']}")
        if case in ("warm", "switch") and holds[0] not in before["held"]:
            raise ServerError(f"'{case}' ran {lora} which was not loaded before it")


# --- part 2: affinity on two workers ----------------------------------------------------------------------------


def simulate(stream: Sequence[str], workers: int, max_loaded: int, affinity: bool) -> tuple[int, int, list[int]]:
    """Adapter loads and unloads a dispatcher makes on ``stream`` (one LoRA per job, one job at a time, so every
    worker is idle at each dispatch), and the worker of each job. Without affinity: the lowest idle slot. With it,
    GenServe's rule: the worker holding the job's LoRA, else the one holding fewest adapters, then the lowest slot.
    Each worker keeps ``max_loaded`` adapters, least recently used out."""
    held: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(workers)]
    loads = unloads = 0
    chosen: list[int] = []
    for lora in stream:
        slot = (
            min(range(workers), key=lambda i: (lora not in held[i], len(held[i]), i)) if affinity else 0
        )  # all idle: the lowest idle slot is slot 0
        cache = held[slot]
        if lora in cache:
            cache.move_to_end(lora)
        else:
            if len(cache) >= max_loaded:
                cache.popitem(last=False)
                unloads += 1
            cache[lora] = None
            loads += 1
        chosen.append(slot)
    return loads, unloads, chosen


@dataclass
class StreamFigures:
    stream: list[str]
    loads: int
    unloads: int
    avoided: int
    workers: list[Any]  # the worker of each job
    wall_s: list[float]
    pipeline_s: list[float]


def run_stream(args: argparse.Namespace, folder: Path) -> StreamFigures:
    loras_dir = folder / "loras-stream"
    loras_dir.mkdir()
    config = config_for(args, workers=2, max_loaded=1, loras_dir=loras_dir)
    print("starting the two-worker server (loras.max_loaded 1)", file=sys.stderr)
    with local_server(config, ready_timeout_s=600) as server:
        names = catalogue_names(server)
        if len(names) < 2:
            raise ServerError(f"the stream needs two LoRAs that fit the base transformer, the catalogue has {names}")
        pair = names[:2]
        stream = [pair[index % 2] for index in range(args.stream)]
        with ThreadPoolExecutor(max_workers=2) as pool:  # warm-up of both workers at once, without LoRA
            list(pool.map(lambda seed: generate(server, args, None, seed), (0, 1)))
        status = server.status()
        loads0, avoided0 = status["loras"]["adapter_loads"], status["loras"]["adapter_loads_avoided"]
        unloads0 = sum(view["unloads"] for view in worker_loras(server))
        print(f"  a stream of {args.stream} jobs alternating {pair[0]} and {pair[1]}, one at a time", file=sys.stderr)
        answers = [generate(server, args, lora, seed=10 + index) for index, lora in enumerate(stream)]
        status = server.status()
        return StreamFigures(
            stream=stream,
            loads=status["loras"]["adapter_loads"] - loads0,
            unloads=sum(view["unloads"] for view in worker_loras(server)) - unloads0,
            avoided=status["loras"]["adapter_loads_avoided"] - avoided0,
            workers=[answer.worker_id for answer in answers],
            wall_s=[answer.wall_s for answer in answers],
            pipeline_s=[answer.pipeline_s for answer in answers],
        )


# --- report ------------------------------------------------------------------------------------------------------


def placement(stream: Sequence[str], workers: Sequence[Any]) -> str:
    """Which workers each LoRA's jobs ran on, e.g. 'A→0  B→1'."""
    by_lora: dict[str, list[Any]] = {}
    for lora, worker in zip(stream, workers, strict=True):
        if worker not in by_lora.setdefault(lora, []):
            by_lora[lora].append(worker)
    letters = {lora: "AB"[index] for index, lora in enumerate(dict.fromkeys(stream))}
    return "  ".join(f"{letters[lora]}→{','.join(map(str, ws))}" for lora, ws in by_lora.items())


def report(costs: dict[str, CaseFigures], stream: StreamFigures, args: argparse.Namespace) -> None:
    print(f"\nembedded model, text2img {args.size}², {args.steps} steps, LoRA weight {WEIGHT}")
    print(f"\n1. one CPU worker, {args.reps} round(s), one job at a time (means over the rounds)")
    print(f"  {'case':<8}{'after':<22}{'loads/job':>10}{'pipeline_s':>12}{'wall s':>9}{'vs base':>9}")
    base = statistics.mean(costs["base"].pipeline_s)
    for case in CASES:
        figures = costs[case]
        pipeline = statistics.mean(figures.pipeline_s)
        print(
            f"  {case:<8}{AFTER[case]:<22}{statistics.mean(figures.loads):>10.2f}{pipeline:>12.3f}"
            f"{statistics.mean(figures.wall_s):>9.3f}{pipeline - base:>+9.3f}"
        )
    load_cost = statistics.mean(costs["first"].pipeline_s) - statistics.mean(costs["warm"].pipeline_s)
    print(f"  a load costs about {load_cost:.3f} s (first - warm, pipeline_s); loads counted by the worker in /status")

    pair = list(dict.fromkeys(stream.stream))
    free_loads, free_unloads, free_workers = simulate(stream.stream, workers=2, max_loaded=1, affinity=False)
    sim_loads, sim_unloads, sim_workers = simulate(stream.stream, workers=2, max_loaded=1, affinity=True)
    print(
        f"\n2. two CPU workers, loras.max_loaded 1: {len(stream.stream)} jobs alternating A={pair[0]} and "
        f"B={pair[1]}, one at a time"
    )
    print(f"  {'dispatcher':<34}{'source':<11}{'loads':>7}{'unloads':>9}  placement")
    print(
        f"  {'with affinity (the server as is)':<34}{'measured':<11}{stream.loads:>7}{stream.unloads:>9}  "
        f"{placement(stream.stream, stream.workers)}"
    )
    print(
        f"  {'with affinity (its rule)':<34}{'simulated':<11}{sim_loads:>7}{sim_unloads:>9}  "
        f"{placement(stream.stream, sim_workers)}"
    )
    print(
        f"  {'without affinity (lowest idle)':<34}{'simulated':<11}{free_loads:>7}{free_unloads:>9}  "
        f"{placement(stream.stream, free_workers)}"
    )
    pipeline, wall = statistics.mean(stream.pipeline_s), statistics.mean(stream.wall_s)
    print(
        f"  measured: mean pipeline_s {pipeline:.3f}, wall {wall:.3f} s/job; "
        f"/status counts {stream.avoided} load(s) avoided (per job: the chosen worker against the lowest idle one)"
    )
    extra = free_loads - stream.loads
    print(
        f"  without affinity: {extra} more load(s), about {extra * load_cost:.2f} s more over the stream "
        f"(estimated: extra loads x part 1's load cost; not measured)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="genserve-bench-lora-") as folder:
            costs = run_costs(args, Path(folder))
            stream = run_stream(args, Path(folder))
    except (ServerError, requests.RequestException) as exc:
        print(f"bench_lora: {exc}", file=sys.stderr)
        return 1
    report(costs, stream, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
