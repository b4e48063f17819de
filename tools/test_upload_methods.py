#!/usr/bin/env python3
"""Compare GenServe's two upload methods for img2img: JSON with a base64 image against multipart form-data.

Both carry the same request: img2img, the same prompt, seed and steps, and the same input PNG:

- ``json``: ``POST /generate`` with ``{"input_image": "<base64 PNG>", ...}`` (base64 makes the image 4/3 as big);
- ``form``: ``POST /generate/img2img`` with the PNG as a file part.

The input image is photo-like (smooth colour fields plus sensor-like noise, from a seeded generator, so every run
sends the same bytes) and as large as the output, so the payloads are as big as real photos of that size.

For every image size and method the tool sends ``--repeats`` measured requests (after ``--warmup`` uncounted ones
per size, which let the model warm up at that resolution) and reports medians of:

- payload: the request body in bytes, exactly as sent;
- end-to-end: client time from sending the request to having read the whole response;
- server: the server's ``elapsed_time`` (from the start of the route to the rendered response), and the part of it
  that is not the worker's pipeline and PNG encoding (``timings``): body parsing, base64 and image decoding,
  resizing, dispatch, base64 of the result;
- transfer overhead: end-to-end minus server elapsed (the HTTP exchange, uvicorn, and the response download);

and the ratio form/json of each. ``simple`` measures 512 and 1024 pixels, two repetitions; ``full`` measures 256 to
2048 pixels, three repetitions, and also draws a PNG chart of payload size and overhead against image size.

Exit status: 0 when every request succeeded, 1 when one failed, 2 when the server is unreachable or not ready.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from _cli import ToolError, add_connection_arguments, console, fail, make_session, positive_int, request_json

METHODS = ("json", "form")
ROUTES = {"json": "/generate", "form": "/generate/img2img"}
PRESETS: dict[str, dict[str, Any]] = {
    "simple": {"sizes": (512, 1024), "repeats": 2},
    "full": {"sizes": (256, 512, 1024, 1536, 2048), "repeats": 3},
}
DEFAULT_CHART = "genserve_upload_methods.png"
DEFAULT_PROMPT = "the same scene in autumn colours, upload method comparison"
SIZE_MULTIPLE = 16
MIN_SIZE, MAX_SIZE = 64, 2048

EPILOG = f"""\
examples:
  %(prog)s simple                              # 512 and 1024 px, 2 repetitions, on http://localhost:12411
  %(prog)s full                                # 256-2048 px, 3 repetitions, chart in {DEFAULT_CHART}
  %(prog)s full --chart upload.png --json-out upload.json --url http://gpu-box:12411
  %(prog)s simple --sizes 768,1024 --repeats 5 --steps 4
  %(prog)s full --sizes 64,128 --repeats 1     # a quick check of the tool itself

what the columns mean (medians over the repetitions):
  payload     request body as sent, bytes
  e2e         client end-to-end time of the request, response read included
  server      the server's elapsed_time; "non-pipeline" is elapsed_time - pipeline_s - encode_s (parsing, decoding,
              dispatch, base64 of the result)
  transfer    e2e - server elapsed: HTTP exchange, uvicorn, response download

exit status: 0 every request succeeded, 1 a request failed, 2 the server is unreachable or not ready.
"""


# --- the input image ---------------------------------------------------------------------------------------------


def photo_like_png(size: int, seed: int) -> bytes:
    """A deterministic photo-like PNG: smooth colour fields plus fine noise, about as compressible as a photo."""
    rng = np.random.default_rng(seed * 100_003 + size)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32)
    noise = rng.normal(0.0, 10.0, size=(size, size, 3)).astype(np.float32)
    pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# --- requests ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    body: bytes
    content_type: str
    encode_s: float  # client time to build the body


def encode_json(fields: dict[str, Any], image: bytes) -> Encoded:
    began = time.perf_counter()
    payload = {**fields, "input_image": base64.b64encode(image).decode("ascii")}
    body = json.dumps(payload).encode()
    return Encoded(body, "application/json", time.perf_counter() - began)


def encode_form(fields: dict[str, Any], image: bytes) -> Encoded:
    began = time.perf_counter()
    parts: list[tuple[str, tuple[str | None, bytes | str, str | None]]] = [
        (name, (None, str(value), None)) for name, value in fields.items()
    ]
    parts.append(("input_image", ("input.png", image, "image/png")))
    prepared = requests.Request("POST", "http://placeholder/", files=parts).prepare()
    body = prepared.body
    assert isinstance(body, bytes)
    return Encoded(body, prepared.headers["Content-Type"], time.perf_counter() - began)


@dataclass
class Sample:
    size: int
    method: str
    repeat: int
    payload_bytes: int
    response_bytes: int
    e2e_s: float
    server_s: float
    pipeline_s: float
    encode_s: float
    queue_s: float
    client_encode_s: float

    @property
    def transfer_s(self) -> float:
        return self.e2e_s - self.server_s

    @property
    def server_other_s(self) -> float:
        return self.server_s - self.pipeline_s - self.encode_s


def send(
    session: requests.Session, url: str, method: str, encoded: Encoded, size: int, timeout: float
) -> tuple[dict[str, Any], float, int]:
    """POST one encoded request; (body, end-to-end seconds, response bytes). ToolError unless it succeeded."""
    route = ROUTES[method]
    began = time.perf_counter()
    response_bytes = 0

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        nonlocal response_bytes
        response_bytes = len(response.content)

    status, body = request_json(
        session,
        "POST",
        url + route,
        timeout=timeout,
        expect_ok=False,
        data=encoded.body,
        headers={"Content-Type": encoded.content_type},
        hooks={"response": hook},
    )
    e2e = time.perf_counter() - began
    if not isinstance(body, dict) or status != 200 or body.get("success") is not True:
        detail = body.get("error") or body.get("detail") if isinstance(body, dict) else body
        kind = body.get("error_type") if isinstance(body, dict) else None
        raise ToolError(f"{method}: POST {route} at {size}x{size} answered {status}: {kind or 'error'}: {detail}")
    if (body.get("width"), body.get("height")) != (size, size) or not body.get("image_base64"):
        raise ToolError(f"{method}: POST {route} at {size}x{size} returned no image of the asked size")
    return body, e2e, response_bytes


def measure(
    session: requests.Session, url: str, method: str, encoded: Encoded, size: int, repeat: int, timeout: float
) -> Sample:
    body, e2e, response_bytes = send(session, url, method, encoded, size, timeout)
    timings = body.get("timings") or {}
    return Sample(
        size=size,
        method=method,
        repeat=repeat,
        payload_bytes=len(encoded.body),
        response_bytes=response_bytes,
        e2e_s=e2e,
        server_s=float(body.get("elapsed_time") or 0.0),
        pipeline_s=float(timings.get("pipeline_s") or 0.0),
        encode_s=float(timings.get("encode_s") or 0.0),
        queue_s=float(timings.get("queue_s") or 0.0),
        client_encode_s=encoded.encode_s,
    )


# --- the run -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    repeats: int
    warmup: int
    steps: int
    seed: int
    strength: float
    prompt: str


def check_server(session: requests.Session, url: str, timeout: float) -> dict[str, Any]:
    """The server answers and is ready; return /status. ToolError otherwise."""
    status, ready = request_json(session, "GET", url + "/ready", timeout=timeout, expect_ok=False)
    if status != 200:
        reason = ready.get("reason") if isinstance(ready, dict) else None
        raise ToolError(f"GenServe at {url} is not ready (HTTP {status}): {reason or ready}")
    _, info = request_json(session, "GET", url + "/status", timeout=timeout)
    modes = info.get("model", {}).get("modes") if isinstance(info, dict) else None
    if isinstance(modes, list) and "img2img" not in modes:
        raise ToolError(f"GenServe at {url} does not serve img2img (it serves {', '.join(modes)})")
    return info if isinstance(info, dict) else {}


def run_plan(session: requests.Session, url: str, timeout: float, plan: Plan) -> list[Sample]:
    samples: list[Sample] = []
    total = len(plan.sizes) * (plan.warmup + plan.repeats * len(METHODS))
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    )
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("preparing", total=total)
        for size in plan.sizes:
            image = photo_like_png(size, plan.seed)
            fields: dict[str, Any] = {
                "prompt": plan.prompt,
                "mode": "img2img",
                "width": size,
                "height": size,
                "num_inference_steps": plan.steps,
                "seed": plan.seed,
                "strength": plan.strength,
            }
            encoded = {"json": encode_json(fields, image), "form": encode_form(fields, image)}
            for i in range(plan.warmup):
                progress.update(task, description=f"{size}x{size} warm-up {i + 1}/{plan.warmup}")
                send(session, url, "json", encoded["json"], size, timeout)
                progress.advance(task)
            for repeat in range(plan.repeats):
                # Alternate which method goes first, so neither always runs on a just-warmed server.
                order = METHODS if repeat % 2 == 0 else METHODS[::-1]
                for method in order:
                    progress.update(task, description=f"{size}x{size} {method} {repeat + 1}/{plan.repeats}")
                    samples.append(measure(session, url, method, encoded[method], size, repeat, timeout))
                    progress.advance(task)
            progress.console.print(size_line(size, [s for s in samples if s.size == size]), highlight=False)
    return samples


# --- figures -----------------------------------------------------------------------------------------------------

FIGURES = ("payload_bytes", "response_bytes", "e2e_s", "server_s", "server_other_s", "pipeline_s", "transfer_s")


def medians(samples: list[Sample]) -> dict[str, float]:
    return {name: statistics.median(float(getattr(s, name)) for s in samples) for name in FIGURES}


def summarize(samples: list[Sample], sizes: tuple[int, ...]) -> dict[int, dict[str, dict[str, float]]]:
    """size -> method -> median figures."""
    return {
        size: {method: medians([s for s in samples if s.size == size and s.method == method]) for method in METHODS}
        for size in sizes
    }


def ratio(form: float, json_value: float) -> float | None:
    return form / json_value if json_value > 0 else None


def size_line(size: int, samples: list[Sample]) -> str:
    parts = []
    for method in METHODS:
        mine = [s for s in samples if s.method == method]
        if mine:
            m = medians(mine)
            parts.append(f"{method} {m['payload_bytes'] / 1024:,.0f} KiB, e2e {m['e2e_s'] * 1000:,.1f} ms")
    return f"{size}x{size}: " + "; ".join(parts)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def results_table(summary: dict[int, dict[str, dict[str, float]]], plan: Plan) -> Table:
    table = Table(
        title=f"img2img upload methods: medians of {plan.repeats} request(s) per row, {plan.steps} step(s)",
        title_justify="left",
    )
    table.add_column("size", no_wrap=True)
    table.add_column("method", no_wrap=True)
    table.add_column("payload B", justify="right", no_wrap=True)
    table.add_column("e2e ms", justify="right", no_wrap=True)
    table.add_column("server ms", justify="right", no_wrap=True)
    table.add_column("non-pipeline ms", justify="right", no_wrap=True)
    table.add_column("transfer ms", justify="right", no_wrap=True)
    for size, by_method in summary.items():
        for method in METHODS:
            m = by_method[method]
            table.add_row(
                f"{size}x{size}",
                method,
                f"{m['payload_bytes']:,.0f}",
                ms(m["e2e_s"]),
                ms(m["server_s"]),
                ms(m["server_other_s"]),
                ms(m["transfer_s"]),
                end_section=method == METHODS[-1],
            )
    return table


def ratio_table(summary: dict[int, dict[str, dict[str, float]]]) -> Table:
    table = Table(title="form / json (below 1.00x: form-data is smaller or faster)", title_justify="left")
    table.add_column("size", no_wrap=True)
    for name in ("payload", "e2e", "server", "non-pipeline", "transfer"):
        table.add_column(name, justify="right", no_wrap=True)
    for size, by_method in summary.items():
        form, json_ = by_method["form"], by_method["json"]
        table.add_row(
            f"{size}x{size}",
            *(
                times(ratio(form[key], json_[key]))
                for key in ("payload_bytes", "e2e_s", "server_s", "server_other_s", "transfer_s")
            ),
        )
    return table


def write_chart(summary: dict[int, dict[str, dict[str, float]]], path: Path, plan: Plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"json": ("tab:orange", "o", "JSON (base64)"), "form": ("tab:blue", "s", "form-data (file)")}
    for method in METHODS:
        colour, marker, label = styles[method]
        payload_mib = [summary[size][method]["payload_bytes"] / 2**20 for size in sizes]
        overhead_ms = [summary[size][method]["transfer_s"] * 1000 for size in sizes]
        non_pipeline_ms = [summary[size][method]["server_other_s"] * 1000 for size in sizes]
        left.plot(sizes, payload_mib, marker=marker, color=colour, label=label)
        right.plot(sizes, overhead_ms, marker=marker, color=colour, label=f"{label}: e2e - server")
        right.plot(
            sizes, non_pipeline_ms, marker=marker, color=colour, linestyle="--", label=f"{label}: server non-pipeline"
        )
    raw_mib = [size * size * 3 / 2**20 for size in sizes]
    left.plot(sizes, raw_mib, color="grey", linestyle=":", label="raw RGB pixels (reference)")
    left.set_title("request payload")
    left.set_xlabel("image side (px)")
    left.set_ylabel("MiB")
    right.set_title("overhead (medians)")
    right.set_xlabel("image side (px)")
    right.set_ylabel("ms")
    for axis in (left, right):
        axis.set_xticks(sizes)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    fig.suptitle(f"GenServe img2img: JSON base64 vs form-data ({plan.repeats} repeats, {plan.steps} steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, url: str, preset: str, plan: Plan, samples: list[Sample], summary: Any) -> None:
    report = {
        "url": url,
        "preset": preset,
        "plan": asdict(plan),
        "samples": [{**asdict(s), "transfer_s": s.transfer_s, "server_other_s": s.server_other_s} for s in samples],
        "medians": {
            str(size): {
                **by_method,
                "form_over_json": {
                    key: ratio(by_method["form"][key], by_method["json"][key]) for key in by_method["json"]
                },
            }
            for size, by_method in summary.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# --- command line ------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    bad = [size for size in sizes if not MIN_SIZE <= size <= MAX_SIZE or size % SIZE_MULTIPLE]
    if bad:
        raise argparse.ArgumentTypeError(
            f"sizes must be multiples of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}, got {bad}"
        )
    return tuple(dict.fromkeys(sizes))


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare JSON base64 (POST /generate) with multipart form-data (POST /generate/img2img) "
        "uploads for GenServe img2img: payload size, end-to-end time, server time and transfer overhead.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "preset",
        nargs="?",
        choices=tuple(PRESETS),
        default="simple",
        help="simple: 512 and 1024 px, 2 repeats; full: 256, 512, 1024, 1536, 2048 px, 3 repeats, and a chart "
        "(default %(default)s)",
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        metavar="N,N,...",
        help="image sides to measure instead of the preset's, comma-separated multiples of 16, e.g. 256,512",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        metavar="N",
        help="measured requests per size and method (default: 2 for simple, 3 for full)",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="uncounted JSON requests per size before measuring (default %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=2,
        metavar="N",
        help="num_inference_steps; few, so the figures are about transfer (default %(default)s)",
    )
    parser.add_argument(
        "--strength", type=float, default=0.8, metavar="X", help="img2img strength, (0, 1] (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=42, metavar="N", help="seed of image and request (default 42)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="prompt for every request")
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"write the PNG chart here; full writes {DEFAULT_CHART} unless told otherwise, simple only when given",
    )
    parser.add_argument(
        "--json-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="write every sample, the medians and the ratios as JSON to FILE",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.sizes = args.sizes or preset["sizes"]
    args.repeats = args.repeats or preset["repeats"]
    if args.chart is None and args.preset == "full":
        args.chart = Path(DEFAULT_CHART)
    if not 0 < args.strength <= 1:
        parser.error(f"--strength must be in (0, 1], got {args.strength}")
    if not args.prompt.strip():
        parser.error("--prompt must not be empty")
    args.url = args.url.rstrip("/")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        sizes=tuple(args.sizes),
        repeats=args.repeats,
        warmup=args.warmup,
        steps=args.steps,
        seed=args.seed,
        strength=args.strength,
        prompt=args.prompt,
    )
    session = make_session(args.api_key)
    try:
        info = check_server(session, args.url, args.timeout)
    except ToolError as exc:
        fail(str(exc), 2)
    devices = ", ".join(str(w.get("device")) for w in info.get("workers", [])) or "?"
    embedded = " (embedded test model)" if info.get("model", {}).get("embedded_test_model") else ""
    console.print(
        f"GenServe upload methods ({args.preset}) against {args.url}{embedded}, workers on {devices}: "
        f"img2img at {', '.join(map(str, plan.sizes))} px, {plan.repeats} repeat(s) per method after "
        f"{plan.warmup} warm-up, {plan.steps} step(s)",
        highlight=False,
    )
    try:
        samples = run_plan(session, args.url, args.timeout, plan)
    except ToolError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    summary = summarize(samples, plan.sizes)
    console.print(results_table(summary, plan))
    console.print(ratio_table(summary))
    if args.chart is not None:
        write_chart(summary, args.chart, plan)
        console.print(f"chart written to {args.chart}", highlight=False)
    if args.json_out is not None:
        write_json(args.json_out, args.url, args.preset, plan, samples, summary)
        console.print(f"figures written to {args.json_out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
