"""Fuzzing against a real server: never a 5xx, never a hang, never a dead worker.

Two halves, on one server started with small limits so that every valid request the fuzzer invents is cheap:

- tools/fuzz.py (schemathesis) over every operation of the live OpenAPI schema, seeded and bounded: valid and
  invalid cases, each answer checked with schemathesis' not_a_server_error. It runs as a subprocess, as a user
  runs it, so its command line and JSON report are tested too; the same seed sends the same cases every run.
- Hand-made hostile requests the schema cannot describe, sent byte for byte (http.client, no client-side
  normalising): malformed multipart bodies, truncated base64, random bytes and decompression bombs as images,
  deeply nested and oversized JSON, wrong JSON types and Content-Types, invalid UTF-8, NaN/Infinity, a 1 MB prompt,
  query values out of range and odd path ids. Each must get a 4xx, and the service must keep serving.

The hand-made cases pin down the bugs the first fuzz runs found (offsets past SQLite's integers, lone UTF-16
surrogates in JSON strings, chunked uploads past the size limit): each is now a plain case that must pass.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.conftest import ServerFactory
from tests.server import REPO_ROOT, GenServeProcess, png_claiming, wait_until

# --- the server under test ---------------------------------------------------------------------------------------

MAX_REQUEST_MB = 8
LIMITS: dict[str, Any] = {
    "limits": {"max_size": 128, "max_steps": 2, "max_upload_mb": 2, "max_input_pixels": 512 * 512},
    "defaults": {"width": 64, "height": 64, "num_inference_steps": 1},
    "queue": {"task_timeout_s": 30},
    "openai": {"max_n": 2},
    "server": {"max_request_mb": MAX_REQUEST_MB},
    "inputs": {"url_timeout_s": 2},
}
ANSWER_TIMEOUT_S = 30  # a hostile request without an answer by then counts as a hang


@pytest.fixture(scope="module")
def fuzz_server(start_server: ServerFactory) -> GenServeProcess:
    return start_server(LIMITS)


# --- schemathesis over the OpenAPI schema (tools/fuzz.py) ----------------------------------------------------------

FUZZ_TOOL = "tools/fuzz.py"
FUZZ_SEED = 20261121
FUZZ_EXAMPLES = 50
MIN_FUZZ_CASES = 800  # 50 per operation with inputs, 1 per operation without (the run sends 955 with this seed)

FUZZED_OPERATIONS = [
    "POST /generate",
    "POST /generate/img2img",
    "GET /",
    "GET /status",
    "GET /models",
    "GET /health",
    "GET /ready",
    "POST /jobs",
    "GET /jobs",
    "POST /jobs/form",
    "GET /jobs/{job_id}",
    "DELETE /jobs/{job_id}",
    "POST /jobs/{job_id}/cancel",
    "GET /jobs/{job_id}/events",
    "GET /image/{task_id}",
    "HEAD /image/{task_id}",
    "GET /queue",
    "GET /api/task_status/{task_id}",
    "GET /api/history",
    "GET /api/history/{task_id}",
    "GET /api/image/{task_id}",
    "POST /v1/images/generations",
    "POST /v1/images/edits",
    "POST /v1/images/variations",
    "POST /process",
    "POST /process/raw",
    "GET /loras",
    "POST /loras",
    "GET /loras/{name}",
    "DELETE /loras/{name}",
    "GET /metrics",
]

TWO_TO_63 = 2**63  # one past the largest integer SQLite stores
# /v1/images/* and /process*: bodies parsed by hand, schema via openapi_extra
HAND_PARSED_BODIES = [op for op in FUZZED_OPERATIONS if op.startswith(("POST /v1/", "POST /process"))]


def run_fuzz_tool(*args: str, workdir: Path | None = None, timeout: float = 270) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    if workdir is not None:
        env["HYPOTHESIS_STORAGE_DIRECTORY"] = str(workdir / "hypothesis")
    return subprocess.run(
        [sys.executable, FUZZ_TOOL, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def fuzz(server: GenServeProcess, workdir: Path, name: str, *operations: str) -> dict[str, Any]:
    report_path = workdir / f"{name}.json"
    selected = [arg for operation in operations for arg in ("--operation", operation)]
    common = ["--url", server.url, "--seed", str(FUZZ_SEED), "--examples", str(FUZZ_EXAMPLES), "--timeout", "60"]
    proc = run_fuzz_tool(*common, *selected, "--json", str(report_path), workdir=workdir)
    assert proc.returncode in (0, 1) and report_path.is_file(), explain(proc)  # 1: it found something
    report: dict[str, Any] = json.loads(report_path.read_text())
    report["stdout"] = proc.stdout
    return report


@pytest.fixture(scope="module")
def fuzz_report(fuzz_server: GenServeProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return fuzz(fuzz_server, tmp_path_factory.mktemp("fuzz"), "all")


def by_operation(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {operation["operation"]: operation for operation in report["operations"]}


def describe_failures(operation: dict[str, Any], server: GenServeProcess, shown: int = 10) -> str:
    failures = operation["failures"]
    lines = [f"{len(failures)} of {operation['cases']} cases got a 5xx or no answer:"]
    for failure in failures[:shown]:
        lines += [f"  {failure['status']} {failure['reason']}", f"    {failure['curl']}", f"    {failure['response']}"]
    if len(failures) > shown:
        lines.append(f"  … and {len(failures) - shown} more (tools/fuzz.py --json has them all)")
    return "\n".join(lines) + f"\n--- server log\n{server.log_tail(40)}"


@pytest.mark.parametrize("operation", FUZZED_OPERATIONS)
def test_fuzzing_finds_no_server_error(
    fuzz_report: dict[str, Any], fuzz_server: GenServeProcess, operation: str
) -> None:
    fuzzed = by_operation(fuzz_report).get(operation)
    assert fuzzed is not None, f"{operation} was not fuzzed: it is gone from /openapi.json?\n{fuzz_report['stdout']}"
    assert fuzzed["cases"] >= 1
    assert fuzzed["failed"] == len(fuzzed["failures"]), describe_failures(fuzzed, fuzz_server)  # all of them kept
    assert not fuzzed["failures"], describe_failures(fuzzed, fuzz_server)


def test_fuzzing_covers_every_operation_of_the_schema(
    fuzz_report: dict[str, Any], fuzz_server: GenServeProcess
) -> None:
    schema = requests.get(f"{fuzz_server.url}/openapi.json", timeout=10).json()
    live = {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
    assert set(by_operation(fuzz_report)) == live
    # A new route is fuzzed by the run above already; listing it here gives it its own test.
    assert set(FUZZED_OPERATIONS) == live, f"update FUZZED_OPERATIONS: {sorted(live ^ set(FUZZED_OPERATIONS))}"


def test_fuzzing_sent_enough_cases(fuzz_report: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(
            f"\nfuzz: {fuzz_report['cases']} schemathesis cases over {len(fuzz_report['operations'])} operations "
            f"(seed {fuzz_report['seed']}, up to {fuzz_report['examples']} per operation, "
            f"schemathesis {fuzz_report['schemathesis_version']}); 5xx or no answer: {fuzz_report['failed']}"
        )
    assert fuzz_report["cases"] >= MIN_FUZZ_CASES, fuzz_report["stdout"]
    # The OpenAI and Flux Imaging routes parse their bodies by hand: the tool describes them, else they get 1 case.
    fuzzed = by_operation(fuzz_report)
    assert all(fuzzed[label]["cases"] > 1 for label in HAND_PARSED_BODIES), fuzz_report["stdout"]


def test_fuzzing_left_every_worker_alive(fuzz_report: dict[str, Any]) -> None:
    assert fuzz_report["alive_after"], fuzz_report["stdout"]
    assert fuzz_report["restarts_before"] == fuzz_report["restarts_after"] == 0, fuzz_report["stdout"]
    assert fuzz_report["dead_after"] == 0, fuzz_report["stdout"]


def test_same_seed_sends_the_same_cases(
    fuzz_report: dict[str, Any], fuzz_server: GenServeProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    operations = ["GET /jobs", "GET /image/{task_id}", "POST /jobs/form", "POST /v1/images/edits"]
    again = by_operation(fuzz(fuzz_server, tmp_path_factory.mktemp("fuzz-again"), "again", *operations))
    first = by_operation(fuzz_report)
    for operation in operations:
        assert (again[operation]["cases"], again[operation]["statuses"]) == (
            first[operation]["cases"],
            first[operation]["statuses"],
        ), operation


def test_fuzz_tool_reports_an_unreachable_server(tmp_path: Path) -> None:
    proc = run_fuzz_tool("--url", "http://127.0.0.1:1", "--timeout", "5", workdir=tmp_path, timeout=60)
    assert proc.returncode == 1, explain(proc)
    assert "cannot reach http://127.0.0.1:1" in proc.stderr, explain(proc)
    assert "Traceback" not in proc.stderr


def test_fuzz_tool_has_help(tmp_path: Path) -> None:
    proc = run_fuzz_tool("--help", workdir=tmp_path, timeout=60)
    assert proc.returncode == 0, explain(proc)
    for option in ("--url", "--api-key", "--timeout", "--examples", "--seed", "--operation", "--json", "examples:"):
        assert option in proc.stdout


# --- hand-made hostile requests ------------------------------------------------------------------------------------

JSON_TYPE = "application/json"
BOUNDARY = "genservefuzz"
MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
RNG = random.Random(FUZZ_SEED)  # hand-made "random" inputs are the same every run


@dataclass
class Hostile:
    """One request, sent exactly as given, and the statuses it may get."""

    id: str
    method: str
    path: str  # "{job}" is replaced by the id of a completed job
    body: bytes = b""
    content_type: str | None = None
    expect: frozenset[int] = frozenset({400})  # the statuses that are right
    chunked: bool = False

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)

    def json(self) -> Any:
        return json.loads(self.body)


def send(server: GenServeProcess, case: Hostile, job_id: str = "") -> Answer:
    """One request byte for byte (no path normalising, no added headers); a hang fails the test."""
    port = int(server.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_TIMEOUT_S)
    path = case.path.replace("{job}", job_id)
    where = f"{case.method} {path[:200]}"
    try:
        connection.putrequest(case.method, path, skip_accept_encoding=True)
        if case.content_type is not None:
            connection.putheader("Content-Type", case.content_type)
        if case.chunked:
            connection.putheader("Transfer-Encoding", "chunked")
        else:
            connection.putheader("Content-Length", str(len(case.body)))
        connection.endheaders()
        try:
            if case.chunked:
                for start in range(0, len(case.body), 1 << 20):
                    piece = case.body[start : start + (1 << 20)]
                    connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                connection.send(b"0\r\n\r\n")
            elif case.body:
                connection.send(case.body)
        except ConnectionError:
            pass  # the server answered before the body ended (a 413) and stopped reading: read that answer
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    except TimeoutError:
        raise AssertionError(f"{where}: no answer within {ANSWER_TIMEOUT_S} s (a hang)") from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise AssertionError(f"{where}: the connection broke without an answer: {exc!r}") from None
    finally:
        connection.close()


def assert_error_shape(path: str, answer: Answer) -> None:
    """GenServe's own error shape, OpenAI's on /v1 (the HTTP server's own 400s for unparsable requests aside)."""
    if not answer.headers.get("content-type", "").startswith(JSON_TYPE):
        assert answer.status == 400 and b"Invalid HTTP request" in answer.body, answer.body[:300]
        return
    body = answer.json()
    if path.startswith("/v1/"):
        assert isinstance(body["error"]["message"], str) and body["error"]["type"], body
    elif path.startswith("/api/task_status/") and "status" in body:
        assert body["status"] == "not_found", body  # the ComfyUI-API shape of seed 003
    else:
        assert body["success"] is False and isinstance(body["error"], str) and body["error_type"], body


# --- the inputs ----------------------------------------------------------------------------------------------------


def encoded(size: tuple[int, int], fmt: str) -> bytes:
    """A noisy picture (compresses badly, so cutting it anywhere loses pixels)."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, RNG.randbytes(size[0] * size[1] * 3)).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


NOISY_PNG = encoded((96, 96), "PNG")
NOISY_JPEG = encoded((96, 96), "JPEG")
BAD_IMAGES: dict[str, bytes] = {
    "random-bytes": RNG.randbytes(4096),
    "truncated-png": NOISY_PNG[: len(NOISY_PNG) // 2],
    "truncated-jpeg": NOISY_JPEG[:400],
    "png-claiming-100000x100000": png_claiming(100_000, 100_000),
    "png-claiming-20000x20000": png_claiming(20_000, 20_000),
    "png-claiming-512x512-without-pixels": png_claiming(512, 512),
}
NOISY_PNG_B64 = b64(NOISY_PNG)
BAD_BASE64: dict[str, str] = {
    "base64-cut-in-half": NOISY_PNG_B64[: len(NOISY_PNG_B64) // 2],
    "base64-one-character-past-a-quad": NOISY_PNG_B64[:4001],
    "data-uri-cut-short": "data:image/png;base64," + NOISY_PNG_B64[:41],
    "base64-of-a-png-header-only": b64(NOISY_PNG[:33]),
    "not-base64-at-all": "%%% not base64 \u2603 %%%",
}

# route → (image field, the other fields that make the image the one thing left to judge)
JSON_IMAGE_ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "/generate": ("input_image", {"prompt": "x", "mode": "img2img"}),
    "/jobs": ("input_image", {"prompt": "x", "mode": "img2img"}),
    "/v1/images/generations": ("image", {"prompt": "x"}),
    "/v1/images/edits": ("image", {"prompt": "x"}),
    "/v1/images/variations": ("image", {}),
    "/process": ("input_image_url", {"prompt": "x"}),
    "/process/raw": ("input_image_url", {"prompt": "x"}),
}
FORM_IMAGE_ROUTES: dict[str, tuple[str, dict[str, str]]] = {
    "/generate/img2img": ("input_image", {"prompt": "x", "mode": "img2img"}),
    "/jobs/form": ("input_image", {"prompt": "x", "mode": "img2img"}),
    "/v1/images/generations": ("image", {"prompt": "x"}),
    "/v1/images/edits": ("image", {"prompt": "x"}),
    "/v1/images/variations": ("image", {}),
    "/process": ("input_file", {"prompt": "x"}),
    "/process/raw": ("input_file", {"prompt": "x"}),
}
JSON_ROUTES = list(JSON_IMAGE_ROUTES)
FORM_ROUTES = list(FORM_IMAGE_ROUTES)


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def form_part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    content_type = "\r\nContent-Type: application/octet-stream" if filename else ""
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}{content_type}\r\n\r\n".encode() + value + b"\r\n"


def form(fields: dict[str, str], files: dict[str, bytes] | None = None) -> bytes:
    parts = [form_part(name, value.encode()) for name, value in fields.items()]
    parts += [form_part(name, data, f"{name}.png") for name, data in (files or {}).items()]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


PROMPT_PART = form_part("prompt", b"x")
MALFORMED_MULTIPART: dict[str, tuple[str, bytes]] = {
    "boundary-mismatch": (MULTIPART_TYPE, PROMPT_PART.replace(BOUNDARY.encode(), b"other") + b"--other--\r\n"),
    "missing-final-boundary": (MULTIPART_TYPE, PROMPT_PART.rstrip(b"\r\n")),
    "part-without-name": (MULTIPART_TYPE, f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n".encode()),
    "part-without-disposition": (MULTIPART_TYPE, f"--{BOUNDARY}\r\nX-Part: 1\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()),
    "huge-part-header-line": (
        MULTIPART_TYPE,
        PROMPT_PART.replace(b"\r\n\r\n", b"\r\nX-Padding: " + b"a" * 200_000 + b"\r\n\r\n", 1)
        + b"--%s--\r\n" % BOUNDARY.encode(),
    ),
    "multipart-without-boundary": ("multipart/form-data", form({"prompt": "x"})),
    "random-bytes-as-multipart": (MULTIPART_TYPE, RNG.randbytes(4096)),
    "100-fields": (MULTIPART_TYPE, form({f"field{i}": "v" for i in range(100)} | {"prompt": "x"})),
    "20-files": (
        MULTIPART_TYPE,
        b"".join(form_part("image", b"v", f"{i}.png") for i in range(20))
        + PROMPT_PART
        + f"--{BOUNDARY}--\r\n".encode(),
    ),
}

OVER_LIMIT = MAX_REQUEST_MB * 1024 * 1024 + 1024
HUGE_JSON = as_json({"prompt": "x", "padding": "a" * OVER_LIMIT})
HUGE_FORM = form({"prompt": "x"}, {"input_image": b"\0" * OVER_LIMIT})
MEGABYTE_PROMPT = "a" * (1024 * 1024)
DEEP = 100_000


REFUSED = frozenset({400})
TOO_LARGE = frozenset({413})
NOT_FOUND_OR_REFUSED = frozenset({400, 404})
URI_TOO_LONG = frozenset({414})


def hostile_cases() -> list[Hostile]:
    cases: list[Hostile] = []

    def post(
        name: str,
        route: str,
        body: bytes,
        content_type: str = JSON_TYPE,
        expect: frozenset[int] = REFUSED,
        chunked: bool = False,
    ) -> None:
        cases.append(Hostile(f"{name}{route}", "POST", route, body, content_type, expect, chunked))

    def get(name: str, path: str, expect: frozenset[int] = REFUSED) -> None:
        cases.append(Hostile(f"{name}-GET{path}", "GET", path, expect=expect))

    # images: broken, random, bombs — as base64 in JSON and as uploaded files
    for route, (image_field, fields) in JSON_IMAGE_ROUTES.items():
        for name, data in BAD_IMAGES.items():
            post(f"json-{name}", route, as_json({**fields, image_field: b64(data)}))
        for name, text in BAD_BASE64.items():
            post(f"json-{name}", route, as_json({**fields, image_field: text}))
    for route, (image_field, fields) in FORM_IMAGE_ROUTES.items():
        for name, data in BAD_IMAGES.items():
            post(f"form-{name}", route, form(fields, {image_field: data}), MULTIPART_TYPE)
    bomb, fill = png_claiming(100_000, 100_000), {"prompt": "x", "mode": "fill", "input_image": NOISY_PNG_B64}
    post("json-fill-mask-bomb", "/generate", as_json({**fill, "mask_image": b64(bomb)}))
    post("json-fill-mask-zero-bytes", "/generate", as_json({**fill, "mask_image": b64(bytes(99))}))
    post(
        "json-control-image-bomb",
        "/generate",
        as_json({"prompt": "x", "mode": "controlnet", "control_image": b64(bomb)}),
    )
    for name, mask in {"mask-bomb": bomb, "mask-random-bytes": BAD_IMAGES["random-bytes"]}.items():
        post(
            f"form-{name}",
            "/v1/images/edits",
            form({"prompt": "x"}, {"image": NOISY_PNG, "mask": mask}),
            MULTIPART_TYPE,
        )

    # form-data: malformed, oversized, a 1 MB prompt
    for route in FORM_ROUTES:
        for name, (content_type, body) in MALFORMED_MULTIPART.items():
            post(f"multipart-{name}", route, body, content_type)
        post("form-over-max-request-mb", route, HUGE_FORM, MULTIPART_TYPE, TOO_LARGE)
        post("form-1mb-prompt", route, form({"prompt": MEGABYTE_PROMPT}), MULTIPART_TYPE)

    # JSON: nested, oversized, wrong types, invalid UTF-8, a 1 MB prompt
    for route in JSON_ROUTES:
        post(f"json-nested-lists-{DEEP}", route, b"[" * DEEP + b"]" * DEEP)
        post(f"json-nested-objects-{DEEP}", route, b'{"a":' * DEEP + b"1" + b"}" * DEEP)
        post("json-prompt-nested-900-deep", route, b'{"prompt":' + b"[" * 900 + b"]" * 900 + b"}")
        post("json-over-max-request-mb", route, HUGE_JSON, expect=TOO_LARGE)
        post("json-over-max-request-mb-chunked", route, HUGE_JSON, expect=TOO_LARGE, chunked=True)
        post("json-top-level-list", route, b"[1, 2, 3]")
        post("json-invalid-utf8", route, b'{"prompt": "\xff\xfe\xfd"}')
        post("json-invalid-utf8-key", route, b'{"\xc3\x28": 1, "prompt": "x"}')
        post("json-1mb-prompt", route, as_json({"prompt": MEGABYTE_PROMPT}))
        post("json-empty-body", route, b"")
    for name, body in {"string": b'"x"', "number": b"42", "null": b"null", "true": b"true", "1e999": b"1e999"}.items():
        post(f"json-top-level-{name}", "/generate", body)

    # a body that is not what its Content-Type says, or not what the route reads
    post("content-type-multipart", "/generate", form({"prompt": "x"}), MULTIPART_TYPE)
    post("content-type-xml", "/jobs", b"<job><prompt>x</prompt></job>", "application/xml")
    post("content-type-json", "/generate/img2img", b'{"prompt": "x"}')
    post("content-type-json", "/jobs/form", b'{"prompt": "x"}')
    post("content-type-octet-stream", "/v1/images/generations", b"\x00\x01\x02", "application/octet-stream")
    post("content-type-text", "/v1/images/edits", b'{"prompt": "x"}', "text/plain")
    post("content-type-urlencoded", "/v1/images/variations", b"image=abc", "application/x-www-form-urlencoded")
    post("content-type-text", "/process", b"a prompt", "text/plain")
    post("content-type-png", "/process/raw", b"\x89PNG", "image/png")

    # numbers JSON allows in Python's reading only: NaN, Infinity, 1e999 (→ inf), 5000 digits
    non_finite = [
        ("/generate", b'{"prompt": "x", "cfg": NaN}'),
        ("/generate", b'{"prompt": "x", "width": Infinity}'),
        ("/generate", b'{"prompt": "x", "seed": -Infinity}'),
        ("/generate", b'{"prompt": "x", "mode": "img2img", "strength": NaN}'),
        ("/generate", b'{"prompt": "x", "priority": 1e999}'),
        ("/generate", b'{"prompt": "x", "width": ' + b"9" * 5000 + b"}"),
        ("/jobs", b'{"prompt": "x", "num_inference_steps": NaN}'),
        ("/v1/images/generations", b'{"prompt": "x", "guidance_scale": NaN}'),
        ("/v1/images/generations", b'{"prompt": "x", "n": Infinity}'),
        ("/v1/images/generations", b'{"prompt": "x", "output_compression": NaN}'),
        ("/v1/images/edits", b'{"prompt": "x", "strength": NaN}'),
        ("/process", b'{"prompt": "x", "width": NaN}'),
        ("/process", b'{"prompt": "x", "guidance_scale": Infinity}'),
        ("/process/raw", b'{"prompt": "x", "num_inference_steps": -Infinity}'),
    ]
    for index, (route, body) in enumerate(non_finite):
        post(f"json-non-finite-number-{index}", route, body)

    # query values out of range
    for query in ("limit=0", "limit=501", "limit=-1", "limit=abc", f"limit={TWO_TO_63}", "offset=-1", "offset=1e3"):
        get("query", f"/jobs?{query}")
    for query in ("status=bogus", "status="):
        get("query", f"/jobs?{query}")
    for query in ("limit=0", "limit=1001", "offset=-1"):
        get("query", f"/api/history?{query}")
    for route in ("/jobs", "/api/history"):
        # an offset SQLite cannot hold is refused, not passed on to overflow there
        get("query", f"{route}?offset={TWO_TO_63}", frozenset({400}))
        get("query-largest-offset", f"{route}?offset={TWO_TO_63 - 1}", frozenset({400}))
    for image_path in ("/image/no-such-job", "/image/{job}"):
        for query in ("format=gif", "format=", "quality=0", "quality=101", "quality=-1", "quality=abc"):
            get("query", f"{image_path}?{query}")
        get("query", f"{image_path}?quality={TWO_TO_63}")

    # path ids nobody would mint
    odd_ids = {
        "nul": "%00",
        "nul-inside": "abc%00def",
        "dot-dot-encoded": "..%2F..%2Fetc%2Fpasswd",
        "dot-dot": "../../etc/passwd",
        "backslashes": "..%5C..%5Cwindows",
        "bad-escape": "%zz%",
        "snowman": "%E2%98%83",
        "encoded-surrogate": "%ED%A0%80",
        "crlf": "a%0D%0ALocation:%20x",
        "8k-long": "a" * 8000,
        "100k-long": "a" * 100_000,  # over server.max_header_kb: 414 from the edge protocol
    }
    id_routes = [
        ("GET", "/jobs/{}"),
        ("GET", "/jobs/{}/events"),
        ("GET", "/image/{}"),
        ("GET", "/api/task_status/{}"),
        ("GET", "/api/history/{}"),
        ("GET", "/api/image/{}"),
        ("DELETE", "/jobs/{}"),
        ("POST", "/jobs/{}/cancel"),
    ]
    for name, odd in odd_ids.items():
        for method, template in id_routes:
            path = template.format(odd)
            expect = URI_TOO_LONG if len(odd) > 64 * 1024 else NOT_FOUND_OR_REFUSED
            cases.append(Hostile(f"path-id-{name}-{method}{template}", method, path, expect=expect))
    return cases


HOSTILE = hostile_cases()


@pytest.fixture(scope="module")
def completed_job(fuzz_server: GenServeProcess) -> str:
    response = fuzz_server.generate(prompt="a job whose image the hostile queries ask for")
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


@pytest.mark.parametrize("case", [case.param() for case in HOSTILE])
def test_hostile_request_gets_a_4xx(fuzz_server: GenServeProcess, completed_job: str, case: Hostile) -> None:
    answer = send(fuzz_server, case, completed_job)
    assert answer.status in case.expect, (
        f"{case.method} {case.path[:200]} answered {answer.status}, expected {sorted(case.expect)}: "
        f"{answer.body[:500]!r}\n--- server log\n{fuzz_server.log_tail(30)}"
    )
    if answer.status >= 400:
        assert_error_shape(case.path, answer)
    assert requests.get(f"{fuzz_server.url}/health", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "route,file_field",
    [("/generate/img2img", "input_image"), ("/v1/images/edits", "image"), ("/process", "input_file")],
)
def test_unfinished_chunked_form_over_the_limit_is_refused_at_once(
    fuzz_server: GenServeProcess, route: str, file_field: str
) -> None:
    """A chunked body carries no Content-Length: the limit has to be counted while reading, as JSON routes do."""
    port = int(fuzz_server.url.rsplit(":", 1)[1])
    head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {MULTIPART_TYPE}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    # The file part's headers and blank line, then its content streams in and never ends.
    opening = PROMPT_PART + form_part(file_field, b"", "a.png")[: -len(b"\r\n")]
    piece = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(head + b"%x\r\n%s\r\n" % (len(opening), opening))
            for _ in range(MAX_REQUEST_MB + 4):  # past the limit, and never the last chunk
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (TimeoutError, ConnectionError):
            pass  # the server stopped reading or hung up: its answer should be waiting
        sock.settimeout(3)
        try:
            answer = sock.recv(64)
        except TimeoutError:
            answer = b""
    assert answer.startswith((b"HTTP/1.1 413", b"HTTP/1.1 411")), (
        f"{MAX_REQUEST_MB + 4} MB into an unfinished chunked body over the {MAX_REQUEST_MB} MB limit, "
        f"{route} has not answered: {answer!r}"
    )


# --- lone UTF-16 surrogates: valid JSON escapes that are no valid Unicode ------------------------------------------
# On their own server: a job record holding one breaks the job listings for as long as it is kept.

SURROGATE = "\ud800"


def surrogate(name: str, route: str, payload: dict[str, Any]) -> Hostile:
    # json.dumps writes the surrogate as the escape "\ud800": the body itself is plain ASCII. It is refused (400)
    # before anything runs or is stored.
    return Hostile(f"surrogate-{name}{route}", "POST", route, as_json(payload), JSON_TYPE, expect=frozenset({400}))


SURROGATE_CASES = [
    *(
        surrogate("prompt", route, {"prompt": SURROGATE})
        for route in ("/generate", "/v1/images/generations", "/process", "/process/raw")
    ),
    surrogate("model_id", "/generate", {"prompt": "x", "model_id": SURROGATE}),
    surrogate("model", "/v1/images/generations", {"prompt": "x", "model": SURROGATE}),
    surrogate("size", "/v1/images/generations", {"prompt": "x", "size": SURROGATE}),
    surrogate("mode", "/generate", {"prompt": "x", "mode": SURROGATE}),
    surrogate("image", "/generate", {"prompt": "x", "mode": "img2img", "input_image": SURROGATE * 8}),
    surrogate("image-url", "/process", {"input_image_url": f"https://{SURROGATE}.example/a.png"}),
    surrogate(
        "controlnet_type",
        "/generate",
        {"prompt": "x", "mode": "controlnet", "controlnet_type": SURROGATE, "control_image": NOISY_PNG_B64},
    ),
]


@pytest.fixture(scope="module")
def surrogate_server(start_server: ServerFactory) -> GenServeProcess:
    return start_server(LIMITS, in_process=True)


@pytest.mark.parametrize("case", [case.param() for case in SURROGATE_CASES])
def test_lone_surrogate_in_a_json_string_is_no_server_error(surrogate_server: GenServeProcess, case: Hostile) -> None:
    answer = send(surrogate_server, case)
    assert answer.status in case.expect, (
        f"{case.method} {case.path} {case.body!r} answered {answer.status}: {answer.body[:300]!r}\n"
        f"--- server log\n{surrogate_server.log_tail(20)}"
    )
    if answer.status >= 400:
        assert_error_shape(case.path, answer)


def test_lone_surrogate_prompt_does_not_break_the_job_listings(surrogate_server: GenServeProcess) -> None:
    url = surrogate_server.url
    submitted = requests.post(f"{url}/jobs", data=as_json({"prompt": SURROGATE}), headers={"Content-Type": JSON_TYPE})
    assert submitted.status_code in (202, 400), submitted.text  # 400: refused up front, nothing stored
    paths = ["/jobs", "/jobs?status=failed", "/api/history"]
    if submitted.status_code == 202:
        task_id = submitted.json()["task_id"]

        def ended() -> bool:
            answer = requests.get(f"{url}/api/task_status/{task_id}", timeout=5).json()
            return bool(answer["status"] in ("completed", "error"))

        wait_until(ended, 60, what=f"job {task_id} to end")
        paths += [f"/jobs/{task_id}", f"/api/history/{task_id}"]
    answers = {path: requests.get(f"{url}{path}", timeout=10).status_code for path in paths}
    assert all(status < 500 for status in answers.values()), answers


def test_lone_surrogates_leave_the_workers_alive(surrogate_server: GenServeProcess) -> None:
    status = surrogate_server.status()
    assert status["concurrent_manager"]["total_restarts"] == 0
    assert status["concurrent_manager"]["dead_processes"] == 0


# --- afterwards ----------------------------------------------------------------------------------------------------


def test_service_still_serves_after_the_fuzzing(fuzz_server: GenServeProcess) -> None:
    assert fuzz_server.process is not None and fuzz_server.process.poll() is None, fuzz_server.log_tail()
    status = fuzz_server.status()
    manager = status["concurrent_manager"]
    assert (manager["total_restarts"], manager["dead_processes"], manager["alive_processes"]) == (0, 0, 1), status
    assert all(worker["state"] in ("ready", "busy") for worker in status["workers"]), status
    started = time.monotonic()
    response = fuzz_server.generate(prompt="still here after the fuzzing")
    assert response.status_code == 200 and response.json()["success"] is True, response.text
    assert time.monotonic() - started < ANSWER_TIMEOUT_S
