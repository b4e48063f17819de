#!/usr/bin/env python3
"""Smoke-test every GenServe mode against a running server, over HTTP only.

The tool draws its own input images with Pillow, all at the output size:

- ``input.png``: a solid colour (the input of img2img, fill and redux);
- ``mask.png``: black with a white rectangle in the middle (fill repaints the white part);
- ``control.png``: white lines on black, shaped like an edge map (controlnet, canny).

Tests (run in this order; no argument runs all seven):

- ``text2img``, ``img2img``, ``fill``, ``controlnet``, ``redux``: one generation each. A test passes when the server
  answers HTTP 200 with ``success: true``, ``image_base64`` decodes to a PNG of exactly the asked size, and
  ``mode``, ``width`` and ``height`` echo the request. ``redux`` (FLUX.1-Redux: a variation of ``input.png``) sends
  a short prompt and ``prompt_embeds_scale`` / ``pooled_prompt_embeds_scale`` 0.9. Modes the server does not serve
  (``/status`` lists them) are skipped.
- ``lora``: ``GET /loras``, then one text2img generation with the first LoRA of the catalogue that fits the base
  transformer, at weight 0.8: the same checks, and the response's ``loras`` must echo that LoRA and weight. Skipped,
  with the reason, when the server has no LoRA catalogue, the catalogue is empty or no LoRA in it fits.
- ``validation``: each mode without the image it needs must be refused with 400, ``success: false`` and a message
  that names the missing field (img2img without ``input_image``, fill without ``mask_image``, controlnet without
  ``control_image``, redux without ``input_image``); an unknown mode must be refused with 400 too, and so must a
  LoRA name the catalogue does not have, with a message that names it (skipped on a server without ``GET /loras``).

Requests go to ``POST /generate`` as JSON with base64 images, or with ``--form`` to ``POST /generate/img2img`` as
multipart form-data with the images as files. For each test the tool prints the device (``gpu_id``), the server's
``elapsed_time``, the client's end-to-end time and the mode, then a summary table.

Exit status: 0 when every test passed (skips included), 1 when one failed, 2 when the server cannot be reached or
is not ready.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from PIL import Image, ImageDraw
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from _cli import ToolError, add_connection_arguments, console, fail, make_session, positive_int, request_json

GENERATION_MODES = ("text2img", "img2img", "fill", "controlnet", "redux")
TESTS = (*GENERATION_MODES, "lora", "validation")
DEFAULT_PROMPT = "a red lighthouse on a rocky coast at dusk, GenServe smoke test"
REDUX_PROMPT = "watercolour"  # redux's prompt is optional: a short one steers the variation a little
REDUX_SCALES = {"prompt_embeds_scale": 0.9, "pooled_prompt_embeds_scale": 0.9}
LORA_WEIGHT = 0.8
MISSING_LORA = "no-such-lora"  # a LoRA name no catalogue should have
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE_MULTIPLE = 16  # the server rounds sizes down to this
MIN_SIZE, MAX_SIZE = 64, 2048

EPILOG = """\
examples:
  %(prog)s                                   # all seven tests on http://localhost:12411, JSON, 512 px, 4 steps
  %(prog)s img2img                           # one test
  %(prog)s fill controlnet --form            # two tests, as multipart form-data to /generate/img2img
  %(prog)s redux lora                        # FLUX.1-Redux, and text2img with the first LoRA of GET /loras
  %(prog)s validation --url http://gpu-box:12411 --api-key KEY
  %(prog)s --size 1024 --steps 28 --prompt "a glass house in a forest" --seed 7
  %(prog)s --size 256 --steps 1 --save out/  # keep input.png, mask.png, control.png and every output PNG

tests: text2img, img2img, fill, controlnet, redux (one generation each; skipped when the server does not serve
the mode), lora (GET /loras, then text2img with the first LoRA that fits the base transformer at weight 0.8; skipped
when none does), validation (missing images, an unknown mode, an unknown LoRA: each must be a 400 naming it).

exit status: 0 all passed (or skipped), 1 a test failed, 2 the server is unreachable or not ready.
"""


# --- test images -------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_input_image(size: int) -> Image.Image:
    """A solid colour."""
    return Image.new("RGB", (size, size), (190, 90, 40))


def make_mask_image(size: int) -> Image.Image:
    """Black with a white rectangle over the middle half: fill repaints the white part."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def make_control_image(size: int) -> Image.Image:
    """White lines on black, like a canny edge map: a horizon, a house outline and a diagonal."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    line = max(1, size // 128)
    white = (255, 255, 255)
    draw.line([(0, 2 * size // 3), (size - 1, 2 * size // 3)], fill=white, width=line)
    left, right, top, bottom = size // 3, 2 * size // 3, size // 3, 2 * size // 3
    draw.rectangle([left, top, right, bottom], outline=white, width=line)
    draw.line([(left, top), (size // 2, size // 6), (right, top)], fill=white, width=line)
    draw.line([(0, 0), (size // 4, size // 2)], fill=white, width=line)
    return image


@dataclass(frozen=True)
class InputImages:
    input_png: bytes
    mask_png: bytes
    control_png: bytes

    @classmethod
    def build(cls, size: int) -> InputImages:
        return cls(
            input_png=png_bytes(make_input_image(size)),
            mask_png=png_bytes(make_mask_image(size)),
            control_png=png_bytes(make_control_image(size)),
        )

    def for_mode(self, mode: str) -> dict[str, bytes]:
        """The images ``mode`` needs, by request field."""
        return {
            "text2img": {},
            "img2img": {"input_image": self.input_png},
            "fill": {"input_image": self.input_png, "mask_image": self.mask_png},
            "controlnet": {"control_image": self.control_png},
            "redux": {"input_image": self.input_png},
        }[mode]

    def save(self, directory: Path) -> None:
        (directory / "input.png").write_bytes(self.input_png)
        (directory / "mask.png").write_bytes(self.mask_png)
        (directory / "control.png").write_bytes(self.control_png)


# --- HTTP --------------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    client_s: float


def form_value(value: Any) -> str:
    """A field as form-data text: lists and objects (``loras``) as JSON, as the server parses them; the rest as is."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class Client:
    """Sends one generate request as JSON (POST /generate) or as multipart form-data (POST /generate/img2img)."""

    def __init__(self, session: requests.Session, url: str, timeout: float, form: bool) -> None:
        self.session = session
        self.url = url
        self.timeout = timeout
        self.form = form

    @property
    def route(self) -> str:
        return "/generate/img2img" if self.form else "/generate"

    def generate(self, fields: dict[str, Any], images: dict[str, bytes]) -> Reply:
        kwargs: dict[str, Any]
        if self.form:
            # Every field as a multipart part (files=(None, value) is a plain form field), so even text2img is
            # sent as multipart/form-data, like an HTML form with a file input.
            parts: list[tuple[str, tuple[str | None, bytes | str, str | None]]] = [
                (name, (None, form_value(value), None)) for name, value in fields.items()
            ]
            parts += [(name, (f"{name}.png", data, "image/png")) for name, data in images.items()]
            kwargs = {"files": parts}
        else:
            payload = dict(fields)
            payload.update({name: base64.b64encode(data).decode("ascii") for name, data in images.items()})
            kwargs = {"json": payload}
        began = time.perf_counter()
        status, body = request_json(
            self.session, "POST", self.url + self.route, timeout=self.timeout, expect_ok=False, **kwargs
        )
        client_s = time.perf_counter() - began
        if not isinstance(body, dict):
            raise ToolError(f"POST {self.route} answered {status} with JSON that is not an object")
        return Reply(status=status, body=body, client_s=client_s)


# --- tests -------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    result: str  # PASS | FAIL | SKIP
    mode: str = ""
    gpu: str = ""
    server_s: float | None = None
    client_s: float | None = None
    detail: str = ""
    output: bytes | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return self.result == "FAIL"


def error_text(body: dict[str, Any]) -> str:
    message = body.get("error") or body.get("detail") or "no error message"
    error_type = body.get("error_type")
    return f"{error_type}: {message}" if error_type else str(message)


def decode_png(image_base64: Any) -> Image.Image:
    """image_base64 → a loaded PIL image; ValueError naming what is wrong."""
    if not isinstance(image_base64, str) or not image_base64:
        raise ValueError("image_base64 is missing")
    try:
        data = base64.b64decode(image_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image_base64 is not valid base64") from None
    if not data.startswith(PNG_MAGIC):
        raise ValueError("image_base64 is not a PNG")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # any decoder error: the image is broken
        raise ValueError(f"image_base64 is not a decodable PNG ({exc})") from None
    return image


@dataclass
class Settings:
    size: int
    steps: int
    prompt: str
    seed: int


def generation_fields(mode: str, settings: Settings) -> dict[str, Any]:
    """The request fields of one generation in ``mode`` (images apart)."""
    fields: dict[str, Any] = {
        "prompt": settings.prompt,
        "mode": mode,
        "width": settings.size,
        "height": settings.size,
        "num_inference_steps": settings.steps,
        "seed": settings.seed,
    }
    if mode == "controlnet":
        fields["controlnet_type"] = "canny"
    if mode == "redux":
        fields["prompt"] = REDUX_PROMPT
        fields.update(REDUX_SCALES)
    return fields


def loras_echo_problem(echoed: Any, asked: list[dict[str, Any]]) -> str | None:
    """Why the response's ``loras`` does not echo the asked ``[{name, weight}]`` (None when it does)."""
    if not isinstance(echoed, list) or len(echoed) != len(asked):
        return f"loras echoed as {echoed!r}, asked {asked!r}"
    for got, want in zip(echoed, asked, strict=True):
        weight = got.get("weight") if isinstance(got, dict) else None
        if (
            not isinstance(got, dict)
            or got.get("name") != want["name"]
            or not isinstance(weight, (int, float))
            or abs(weight - want["weight"]) > 1e-6
        ):
            return f"loras echoed as {echoed!r}, asked {asked!r}"
    return None


def check_generation(
    client: Client,
    mode: str,
    images: InputImages,
    settings: Settings,
    name: str | None = None,
    loras: list[dict[str, Any]] | None = None,
) -> Outcome:
    """One generation in ``mode``: 200, success, a PNG of the asked size, the mode and size echoed (and the LoRAs,
    when ``loras`` is given: they are sent and must come back in the response's ``loras``)."""
    outcome = Outcome(name=name or mode, result="FAIL", mode=mode)
    fields = generation_fields(mode, settings)
    if loras is not None:
        fields["loras"] = loras
    try:
        reply = client.generate(fields, images.for_mode(mode))
    except ToolError as exc:
        outcome.detail = str(exc)
        return outcome
    body = reply.body
    outcome.client_s = reply.client_s
    outcome.gpu = str(body.get("gpu_id") or "")
    if isinstance(body.get("elapsed_time"), (int, float)):
        outcome.server_s = float(body["elapsed_time"])
    if reply.status != 200 or body.get("success") is not True:
        outcome.detail = f"HTTP {reply.status}, success={body.get('success')}: {error_text(body)}"
        return outcome
    problems: list[str] = []
    try:
        image = decode_png(body.get("image_base64"))
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if image.size != (settings.size, settings.size):
            problems.append(f"PNG is {image.size[0]}x{image.size[1]}, asked {settings.size}x{settings.size}")
        outcome.output = base64.b64decode(body["image_base64"])
    if body.get("mode") != mode:
        problems.append(f"mode echoed as {body.get('mode')!r}")
    if (body.get("width"), body.get("height")) != (settings.size, settings.size):
        problems.append(f"width/height reported as {body.get('width')}x{body.get('height')}")
    if loras is not None and (problem := loras_echo_problem(body.get("loras"), loras)):
        problems.append(problem)
    if problems:
        outcome.detail = "; ".join(problems)
        return outcome
    outcome.result = "PASS"
    with_loras = "".join(f" with LoRA {lora['name']} at {lora['weight']:g}" for lora in loras or [])
    outcome.detail = (
        f"{settings.size}x{settings.size} PNG{with_loras}, seed {body.get('seed')}, task {str(body.get('task_id'))[:8]}"
    )
    return outcome


@dataclass
class Catalogue:
    """What ``GET /loras`` said: the LoRAs, or why there are none to use (``missing``: the route is absent)."""

    loras: list[dict[str, Any]]
    missing: str = ""


def fetch_catalogue(client: Client) -> Catalogue:
    """GET /loras. A server without the route (404/405) has no catalogue; any other failure is a ToolError."""
    status, body = request_json(client.session, "GET", client.url + "/loras", timeout=client.timeout, expect_ok=False)
    if status in (404, 405):
        return Catalogue([], missing=f"the server has no LoRA catalogue (GET /loras answered {status})")
    if status != 200:
        message = error_text(body) if isinstance(body, dict) else body
        raise ToolError(f"GET /loras answered {status}: {message}")
    loras = body.get("loras") if isinstance(body, dict) else None
    if not isinstance(loras, list) or not all(isinstance(lora, dict) and "name" in lora for lora in loras):
        raise ToolError("GET /loras answered without a list of LoRAs with names")
    return Catalogue(loras)


def pick_lora(loras: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The first LoRA that fits the base transformer (text2img's), or None and why there is none."""
    if not loras:
        return None, "the LoRA catalogue is empty (GET /loras lists none)"
    for lora in loras:
        fits = lora.get("fits")
        if isinstance(fits, dict) and fits.get("transformer") is True:
            return str(lora["name"]), ""
    names = ", ".join(str(lora["name"]) for lora in loras)
    return None, f"no LoRA of the catalogue fits the base transformer ({names})"


def check_lora(
    client: Client, catalogue: Catalogue, images: InputImages, settings: Settings, enabled: tuple[str, ...]
) -> Outcome:
    """text2img with the first LoRA that fits, at LORA_WEIGHT; skipped with the reason when there is none."""
    if catalogue.missing:
        return Outcome("lora", "SKIP", "text2img", detail=catalogue.missing)
    name, why_not = pick_lora(catalogue.loras)
    if name is None:
        return Outcome("lora", "SKIP", "text2img", detail=why_not)
    if "text2img" not in enabled:
        return Outcome("lora", "SKIP", "text2img", detail="text2img is not served by this server")
    return check_generation(
        client, "text2img", images, settings, name="lora", loras=[{"name": name, "weight": LORA_WEIGHT}]
    )


@dataclass(frozen=True)
class ValidationCase:
    name: str
    mode: str  # the mode requested ("" when the case does not depend on an enabled mode)
    images: tuple[str, ...]  # the image fields sent
    needle: str  # what the error message must contain
    loras: tuple[str, ...] = ()  # LoRA names sent (weight 1); a case with LoRAs needs a server with GET /loras


VALIDATION_CASES = (
    ValidationCase("img2img without input_image", "img2img", (), "input_image"),
    ValidationCase("fill without mask_image", "fill", ("input_image",), "mask_image"),
    ValidationCase("controlnet without control_image", "controlnet", (), "control_image"),
    ValidationCase("redux without input_image", "redux", (), "input_image"),
    ValidationCase("unknown mode 'sketch'", "sketch", (), "mode"),
    ValidationCase(f"unknown LoRA '{MISSING_LORA}'", "text2img", (), MISSING_LORA, loras=(MISSING_LORA,)),
)


def check_validation_case(client: Client, case: ValidationCase, images: InputImages, settings: Settings) -> Outcome:
    """One request that must be refused with 400 and a message naming ``case.needle``."""
    outcome = Outcome(name=f"validation: {case.name}", result="FAIL", mode=case.mode)
    all_images = images.for_mode("fill") | images.for_mode("controlnet")
    fields: dict[str, Any] = {
        "prompt": settings.prompt,
        "mode": case.mode,
        "width": settings.size,
        "height": settings.size,
        "num_inference_steps": settings.steps,
    }
    if case.loras:
        fields["loras"] = [{"name": name, "weight": 1.0} for name in case.loras]
    try:
        reply = client.generate(fields, {name: all_images[name] for name in case.images})
    except ToolError as exc:
        outcome.detail = str(exc)
        return outcome
    body = reply.body
    outcome.client_s = reply.client_s
    if isinstance(body.get("elapsed_time"), (int, float)):
        outcome.server_s = float(body["elapsed_time"])
    message = str(body.get("error") or body.get("detail") or "")
    if reply.status != 400:
        outcome.detail = f"expected HTTP 400, got {reply.status}: {error_text(body)}"
    elif body.get("success") is not False:
        outcome.detail = f"HTTP 400 but success={body.get('success')!r}"
    elif case.needle not in message:
        outcome.detail = f"message does not name {case.needle!r}: {message!r}"
    else:
        outcome.result = "PASS"
        outcome.detail = f"400: {message}"
    return outcome


# --- running -----------------------------------------------------------------------------------------------------


def server_modes(client: Client) -> tuple[str, ...]:
    """Check the server answers and is ready; return the modes it serves. ToolError when it cannot run tests."""
    status, ready = request_json(client.session, "GET", client.url + "/ready", timeout=client.timeout, expect_ok=False)
    if status != 200:
        reason = ready.get("reason") if isinstance(ready, dict) else None
        raise ToolError(f"GenServe at {client.url} is not ready (HTTP {status}): {reason or ready}")
    _, info = request_json(client.session, "GET", client.url + "/status", timeout=client.timeout)
    modes = info.get("model", {}).get("modes") if isinstance(info, dict) else None
    return tuple(modes) if isinstance(modes, list) else GENERATION_MODES


def plan_steps(tests: list[str]) -> list[tuple[str, Any]]:
    """(test name, what to run) in order: generation modes and lora, then each validation case."""
    steps: list[tuple[str, Any]] = []
    for test in tests:
        if test == "validation":
            steps += [(f"validation: {case.name}", case) for case in VALIDATION_CASES]
        else:
            steps.append((test, test))
    return steps


def run_tests(client: Client, tests: list[str], settings: Settings, save: Path | None) -> list[Outcome]:
    images = InputImages.build(settings.size)
    if save is not None:
        images.save(save)
    enabled = server_modes(client)
    steps = plan_steps(tests)
    needs_catalogue = "lora" in tests or any(isinstance(what, ValidationCase) and what.loras for _, what in steps)
    catalogue = fetch_catalogue(client) if needs_catalogue else Catalogue([])
    outcomes: list[Outcome] = []
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    )
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("starting", total=len(steps))
        for name, what in steps:
            progress.update(task, description=name)
            outcome = run_step(client, what, images, settings, enabled, catalogue)
            outcomes.append(outcome)
            if save is not None and outcome.output is not None:
                (save / f"{outcome.name}{'-form' if client.form else ''}.png").write_bytes(outcome.output)
            progress.console.print(describe(outcome), highlight=False)
            progress.advance(task)
    return outcomes


def run_step(
    client: Client,
    what: Any,
    images: InputImages,
    settings: Settings,
    enabled: tuple[str, ...],
    catalogue: Catalogue,
) -> Outcome:
    if isinstance(what, ValidationCase):
        if what.mode in GENERATION_MODES and what.mode not in enabled:
            return Outcome(f"validation: {what.name}", "SKIP", what.mode, detail="mode not served by this server")
        if what.loras and catalogue.missing:
            return Outcome(f"validation: {what.name}", "SKIP", what.mode, detail=catalogue.missing)
        return check_validation_case(client, what, images, settings)
    if what == "lora":
        return check_lora(client, catalogue, images, settings, enabled)
    if what not in enabled:
        return Outcome(what, "SKIP", what, detail=f"mode not served by this server (it serves {', '.join(enabled)})")
    return check_generation(client, what, images, settings)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


RESULT_STYLE = {"PASS": "bold green", "FAIL": "bold red", "SKIP": "yellow"}


def describe(outcome: Outcome) -> str:
    style = RESULT_STYLE[outcome.result]
    return (
        f"[{style}]{outcome.result}[/] {outcome.name}: mode={outcome.mode or '-'} gpu={outcome.gpu or '-'} "
        f"server={seconds(outcome.server_s)} s client={seconds(outcome.client_s)} s"
        + (f" ({outcome.detail})" if outcome.result != "PASS" else "")
    )


def summary_table(outcomes: list[Outcome], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("test")
    table.add_column("result")
    table.add_column("gpu")
    table.add_column("server s", justify="right")
    table.add_column("client s", justify="right")
    table.add_column("detail", overflow="fold")
    for outcome in outcomes:
        style = RESULT_STYLE[outcome.result]
        table.add_row(
            outcome.name,
            f"[{style}]{outcome.result}[/]",
            outcome.gpu or "-",
            seconds(outcome.server_s),
            seconds(outcome.client_s),
            outcome.detail,
        )
    return table


# --- command line ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Smoke-test GenServe's text2img, img2img, fill, controlnet and redux modes, a request with a "
        "LoRA, and its input validation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "tests",
        nargs="*",
        metavar="TEST",
        help=f"which tests to run, any of: {', '.join(TESTS)} (default: all {len(TESTS)}, in that order)",
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--form",
        action="store_true",
        help="send multipart form-data with the images as files to POST /generate/img2img "
        "(default: JSON with base64 images to POST /generate)",
    )
    parser.add_argument(
        "--save",
        type=Path,
        metavar="DIR",
        default=None,
        help="write the generated inputs (input.png, mask.png, control.png) and each output (TEST.png, e.g. "
        "fill.png or lora.png, or TEST-form.png with --form) to DIR, created if needed",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=512,
        metavar="N",
        help=f"width and height of inputs and outputs; a multiple of {SIZE_MULTIPLE} in {MIN_SIZE}-{MAX_SIZE} "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=4, metavar="N", help="num_inference_steps (default %(default)s)"
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        metavar="TEXT",
        help=f"prompt for every request but redux's, which sends {REDUX_PROMPT!r} (default: a lighthouse)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, metavar="N", help="seed for every generation (default %(default)s)"
    )
    args = parser.parse_args(argv)
    unknown = [test for test in args.tests if test not in TESTS]
    if unknown:
        parser.error(f"unknown test {', '.join(map(repr, unknown))}; choose from {', '.join(TESTS)}")
    args.tests = list(dict.fromkeys(args.tests)) or list(TESTS)
    if not MIN_SIZE <= args.size <= MAX_SIZE or args.size % SIZE_MULTIPLE:
        parser.error(
            f"--size must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE} "
            f"(the server rounds other sizes down), got {args.size}"
        )
    if not args.prompt.strip():
        parser.error("--prompt must not be empty")
    args.url = args.url.rstrip("/")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.save is not None:
        try:
            args.save.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"cannot create --save directory {args.save}: {exc}", 2)
    client = Client(make_session(args.api_key), args.url, args.timeout, args.form)
    settings = Settings(size=args.size, steps=args.steps, prompt=args.prompt, seed=args.seed)
    method = "multipart form-data to POST /generate/img2img" if args.form else "JSON (base64) to POST /generate"
    console.print(
        f"GenServe mode tests against {args.url}: {', '.join(args.tests)}; {method}; "
        f"{args.size}x{args.size}, {args.steps} steps",
        highlight=False,
    )
    try:
        outcomes = run_tests(client, args.tests, settings, args.save)
    except ToolError as exc:
        fail(str(exc), 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    counts = {result: sum(o.result == result for o in outcomes) for result in ("PASS", "FAIL", "SKIP")}
    console.print(summary_table(outcomes, f"GenServe mode tests ({'form-data' if args.form else 'JSON'})"))
    line = f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
    console.print(f"[bold red]{line}[/]" if counts["FAIL"] else f"[bold green]{line}[/]", highlight=False)
    if args.save is not None:
        console.print(f"inputs and outputs saved in {args.save}", highlight=False)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
