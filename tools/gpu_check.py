"""GPU check: what each memory strategy of GenServe costs on a real card, with full-size FLUX.1-dev shapes.

GenServe plans its device memory before it loads a byte (genserve/memory_plan.py): weights at their planned precision
plus an activation reserve whose factors are estimates. This check puts those estimates against a real card. It
needs no FLUX weights and no network: it builds a random-weight FLUX.1-dev family (tools/_flux_build.py: the public
configs of genserve/flux_family.py at full size, directly on the GPU in bf16, ~32 GiB on disk; a complete build is
reused), then serves it once per memory strategy:

- pinned bf16 (``memory.strategy: pinned``);
- fp8 transformers (``strategy: quantized``, ``auto_quantization: fp8``; torchao);
- nf4 transformers (``quantize: {transformer, fill, controlnet: nf4}``; bitsandbytes);
- text encoders on the CPU (``strategy: offload``, ``offload: text_encoders``).

For each one it starts ``python -m genserve`` on a free port and measures, from the outside:

- planned GiB: the worker's memory plan (GET /status ``workers[0].memory_plan.device_gib``): what it promised. The
  servers accept at most 1024x1024 (``limits.max_size``), so the plan's activation reserve is for the timed job;
- peak GiB: the device's used memory from nvidia-ml, sampled every 50 ms from spawn to stop (the CUDA context and
  everything else on the card included): what it took. Peak above plan means the reserve factors are too small;
- load s: spawn -> GET /ready 200 (server start, memory plan, loading and quantising every model);
- the end-to-end seconds of a 1024x1024, 28-step text2img job as a client sees it (median of the timed runs, after a
  short warm-up at the same size);
- whether a fill and a ControlNet job (512x512, 4 steps) work under that strategy: every pinned mode must.

It prints one markdown table and writes it, with every detail, to gpu_check.md and gpu_check.json in the output
folder (rewritten after each strategy, so a run cut short keeps what it finished). A failing strategy is reported and
the next one runs. Sizes are in GiB throughout, as the memory plan counts them. The speed benchmark
(tools/bench_gpu.py, ``tools/gpu_check.sh --bench``) serves the same family afterwards without building it again.

``--tiny`` runs the same code on a CPU in a few minutes: a small family derived from the same configs, a CPU worker,
256x256 and 4 steps, and only what a CPU can run (pinned fp32, int8); the GPU-only strategies are listed as skipped
and the peak is the server processes' resident memory instead of the device's. That is how this script is tested.

Usage: ``tools/gpu_check.sh`` on the GPU box (installs carried wheels, prints the machine, tees the log), or
``python tools/gpu_check.py [--tiny] [--out DIR] [--model-dir DIR] [--strategies pinned,fp8] [--budget-s S]``.
Two more strategies run only when named in --strategies (the default four fill the 8-minute budget):
``offload-model`` (fp8 transformers with model CPU offload: what ``auto`` takes on a 24 GB card) and ``group``
(group offload with CUDA streams).
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from _flux_build import GPU_FAMILY, TINY_FAMILY, ModelFolders, RunProfile, SetupError, prepare, start_run
from _measure import (
    WARMUP_STEPS,
    JobOutcome,
    Measured,
    add_run_arguments,
    cell,
    error_cell,
    finish,
    give_up,
    machine,
    markdown_rows,
    measure_rows,
    measure_server,
    pick_rows,
    planned_gib,
    report_heading,
    run_jobs,
    say,
    text2img_fields,
    time_left,
    versions,
    write_outputs,
)
from _server import LocalServer
from test_img2img import make_control_image, make_mask_image  # the client tool's own test images

# --- what runs -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Profile(RunProfile):
    """Everything that differs between the real check (a CUDA card) and its CPU rehearsal (--tiny). The timed
    text2img job is the family's (1024x1024, 28 steps on the card), after a short warm-up at the same size that
    compiles kernels and sizes the allocator."""

    quick_size: int  # the fill and ControlNet jobs: size x size ...
    quick_steps: int  # ... with this many steps


GPU_PROFILE = Profile(
    family=GPU_FAMILY,
    quick_size=512,
    quick_steps=4,
    runs=2,
    rows=("pinned", "fp8", "nf4", "offload-te"),
    ready_timeout_s=300,
    job_timeout_s=300,
    budget_s=450,  # gpu_check.sh adds ~30 s (wheels, versions): about 8 minutes in all
    min_row_s=75,  # a strategy takes 1-2 minutes: start one only with at least this much left
    out_dir="/tmp/gpu_check",
)
TINY_PROFILE = Profile(
    family=TINY_FAMILY,
    quick_size=256,
    quick_steps=4,
    runs=2,
    rows=("pinned", "int8", "fp8", "nf4", "offload-te"),
    ready_timeout_s=240,
    job_timeout_s=120,
    budget_s=900,
    min_row_s=20,
    out_dir="/tmp/gpu_check_tiny",
)


@dataclass(frozen=True)
class Strategy:
    """One memory setting to serve the family with: the config's ``memory:`` section."""

    key: str  # short name: table rows, log and folder names
    title: str  # in words; {dtype} is the model dtype
    memory: dict[str, Any]  # config.yaml's memory section
    needs_gpu: bool  # fp8, nf4 and offload run only on a CUDA device


STRATEGIES = {
    strategy.key: strategy
    for strategy in (
        Strategy("pinned", "pinned {dtype}", {"strategy": "pinned"}, needs_gpu=False),
        Strategy("fp8", "fp8 transformers", {"strategy": "quantized", "auto_quantization": "fp8"}, needs_gpu=True),
        Strategy(
            "nf4",
            "nf4 transformers",
            {"strategy": "pinned", "quantize": {"transformer": "nf4", "fill": "nf4", "controlnet": "nf4"}},
            needs_gpu=True,
        ),
        Strategy(
            "offload-te",
            "text encoders on the CPU",
            {"strategy": "offload", "offload": "text_encoders"},
            needs_gpu=True,
        ),
        Strategy("int8", "int8 transformers", {"strategy": "quantized", "auto_quantization": "int8"}, needs_gpu=False),
        # Not in the default run (the 8-minute budget holds four); ask for them with --strategies.
        Strategy(
            "offload-model",
            "fp8 transformers + model CPU offload (auto's 24 GB rung)",
            {
                "strategy": "offload",
                "offload": "model",
                "quantize": {"transformer": "fp8", "fill": "fp8", "controlnet": "fp8"},
            },
            needs_gpu=True,
        ),
        Strategy("group", "group offload (bf16)", {"strategy": "offload", "offload": "group"}, needs_gpu=True),
    )
}


# --- one server ----------------------------------------------------------------------------------------------------


def server_config(profile: Profile, strategy: Strategy, folders: ModelFolders, results: Path) -> dict[str, Any]:
    """The config.yaml of one strategy's server (tools/_server.py adds the host and a free port)."""
    return {
        "server": {"log_level": "info", "shutdown_grace_s": 5},
        "model": {"path": str(folders.base)},
        "fill": {"path": str(folders.fill)},
        "controlnet": {"path": str(folders.controlnet)},
        "workers": {"devices": [profile.family.device], "shutdown_timeout_s": 5},
        "memory": strategy.memory,
        "results": {"dir": str(results)},
        # The largest output is the timed job's size, so the plan's activation reserve is for the very job that is
        # measured: planned and peak then compare like with like.
        "limits": {"max_size": profile.family.size},
        "defaults": {"width": profile.family.size, "height": profile.family.size},
    }


# --- jobs ----------------------------------------------------------------------------------------------------------


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def picture(size: int) -> Image.Image:
    gradient = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", (gradient, gradient.rotate(90), gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def job_fields(kind: str, size: int, steps: int, timeout_s: float) -> dict[str, Any]:
    fields = text2img_fields(size, steps, timeout_s)
    if kind == "fill":
        fields.update(mode="fill", input_image=png_base64(picture(size)), mask_image=png_base64(make_mask_image(size)))
    elif kind == "controlnet":
        fields.update(mode="controlnet", control_image=png_base64(make_control_image(size)), controlnet_type="canny")
    return fields


def job_plan(profile: Profile, timeout_s: float) -> list[tuple[str, dict[str, Any]]]:
    """Warm-up, the timed text2img runs, one fill and one ControlNet job."""
    size, steps = profile.family.size, profile.family.steps
    plan = [("warm-up", size, WARMUP_STEPS)]
    plan += [("text2img", size, steps)] * profile.runs
    plan += [("fill", profile.quick_size, profile.quick_steps), ("controlnet", profile.quick_size, profile.quick_steps)]
    return [
        (kind, job_fields("text2img" if kind == "warm-up" else kind, size, steps, timeout_s))
        for kind, size, steps in plan
    ]


# --- one strategy --------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StrategyResult(Measured):
    memory: dict[str, Any] = field(default_factory=dict)  # the config's memory section

    def timed_seconds(self) -> list[float]:
        return [job.seconds for job in self.jobs if job.kind == "text2img" and job.ok]

    def mode_ok(self, kind: str) -> bool | None:
        outcomes = [job.ok for job in self.jobs if job.kind == kind]
        return all(outcomes) if outcomes else None


def new_result(strategy: Strategy, profile: Profile) -> StrategyResult:
    return StrategyResult(key=strategy.key, title=title_of(strategy, profile), memory=strategy.memory)


def run_strategy(
    profile: Profile,
    strategy: Strategy,
    folders: ModelFolders,
    out: Path,
    budget_s: float,
    device_memory: Callable[[], int] | None,
) -> StrategyResult:
    """Serve the family with one strategy and measure it; never raises (a failure is the result's error)."""
    result = new_result(strategy, profile)
    results_dir = out / "runs" / strategy.key / "server" / "results"
    config = server_config(profile, strategy, folders, results_dir)

    def use(server: LocalServer) -> list[JobOutcome]:
        timeout_s = max(30.0, min(profile.job_timeout_s, time_left(budget_s)))
        return run_jobs(server, job_plan(profile, timeout_s), timeout_s)

    measure_server(result, config, out, budget_s, profile.ready_timeout_s, device_memory, use)
    return result


def title_of(strategy: Strategy, profile: Profile) -> str:
    return strategy.title.format(dtype=profile.dtype_name)


# --- the report ----------------------------------------------------------------------------------------------------


def mode_cell(ok: bool | None) -> str:
    return "—" if ok is None else ("ok" if ok else "FAILED")


def markdown_table(profile: Profile, results: list[StrategyResult]) -> str:
    peak = "peak GiB (device, nvidia-ml)" if not profile.tiny else "peak GiB (server RSS)"
    timed = f"{profile.family.size}²×{profile.family.steps} s"
    header = ["strategy", "plan setting", "planned GiB", peak, "load s", timed, "fill", "controlnet", "error"]
    rows = []
    for result in results:
        timings = result.timed_seconds()
        rows.append(
            [
                f"{result.key} ({result.title})",
                (result.plan or {}).get("setting") or "—",
                cell(planned_gib(result.plan), 2),
                cell(result.peak_gib if result.status != "skipped" else None, 2),
                cell(result.load_s),
                cell(statistics.median(timings), 2) if timings else "—",
                mode_cell(result.mode_ok("fill")),
                mode_cell(result.mode_ok("controlnet")),
                error_cell(result.error),
            ]
        )
    return markdown_rows(header, rows)


def write_report(
    out: Path, profile: Profile, results: list[StrategyResult], model: dict[str, Any] | None, note: str | None
) -> str:
    table = markdown_table(profile, results)
    host = machine(None if profile.tiny else profile.family.device)
    size = profile.family.size
    lines = [
        *report_heading(f"GenServe GPU check ({profile.name})", host),
        table,
        "",
        f"Timed job: text2img {size}x{size}, {profile.family.steps} steps, median of {profile.runs} "
        f"(end to end, client side, after a {WARMUP_STEPS}-step warm-up); fill and controlnet: "
        f"{profile.quick_size}x{profile.quick_size}, {profile.quick_steps} steps. Load: spawn to /ready. "
        f"Planned: the worker's memory plan; the servers accept at most {size}x{size} "
        "(limits.max_size), so its activation reserve is for the timed job. "
        + (
            "Peak: nvidia-ml's used memory of the whole device, CUDA context included, sampled every 50 ms."
            if not profile.tiny
            else "Peak: resident memory of the server's processes, summed (shared pages count twice)."
        ),
    ]
    if note:
        lines += ["", note]
    payload = {
        "profile": asdict(profile),
        "machine": host,
        "versions": versions(),
        "model": model,
        "note": note,
        "strategies": [asdict(result) for result in results],
    }
    write_outputs(out, "gpu_check", "\n".join(lines) + "\n", payload)
    return table


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_run_arguments(parser, "check")
    parser.add_argument("--strategies", default="", help=f"comma-separated, of: {', '.join(STRATEGIES)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile, out, folders, budget_s = start_run(args, GPU_PROFILE, TINY_PROFILE)
    rows = [STRATEGIES[key] for key in pick_rows(args.strategies, profile.rows, STRATEGIES, "strategies")]
    results = [new_result(strategy, profile) for strategy in rows]
    say(f"profile {profile.name}: {len(rows)} strategies, budget {budget_s:.0f} s, report in {out}")
    try:
        device_memory, model = prepare(profile.family, folders.root, args.rebuild)
    except SetupError as exc:
        return give_up(results, str(exc), lambda note: write_report(out, profile, results, None, note))
    measure_rows(
        rows,
        results,
        lambda strategy: run_strategy(profile, strategy, folders, out, budget_s, device_memory),
        lambda: write_report(out, profile, results, model, None),
        tiny=profile.tiny,
        budget_s=budget_s,
        min_row_s=profile.min_row_s,
    )
    return finish(out, "gpu_check", write_report(out, profile, results, model, None), results)


if __name__ == "__main__":
    sys.exit(main())
