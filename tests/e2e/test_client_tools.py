"""The client tools tools/test_img2img.py and tools/test_upload_methods.py, run as a user runs them: as
subprocesses against a real server, checking exit codes, their tables and the files they write."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.server import REPO_ROOT, GenServeProcess
from tests.stubs import QuietHandler, serving

IMG2IMG_TOOL = "tools/test_img2img.py"
UPLOAD_TOOL = "tools/test_upload_methods.py"
GENERATION_MODES = ("text2img", "img2img", "fill", "controlnet")
VALIDATION_ROWS = (
    "validation: img2img without input_image",
    "validation: fill without mask_image",
    "validation: controlnet without control_image",
    "validation: unknown mode 'sketch'",
)
QUICK = ["--size", "64", "--steps", "1"]
CLOSED_PORT_URL = "http://127.0.0.1:1"


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # A wide console so rich never folds a table cell; no terminal, so no colour codes.
    env = {**os.environ, "COLUMNS": "220", "NO_COLOR": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def table_rows(output: str) -> list[list[str]]:
    """The body rows of every rich table in ``output``, as lists of stripped cells (wrapped lines excluded)."""
    rows = []
    for line in output.splitlines():
        if line.startswith("│") and line.endswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            if cells[0]:
                rows.append(cells)
    return rows


def results(output: str) -> dict[str, str]:
    """test name -> PASS/FAIL/SKIP from test_img2img's summary table."""
    return {row[0]: row[1] for row in table_rows(output)}


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


class LyingHandler(QuietHandler):
    """A fake GenServe that is ready and serves img2img, but answers /generate with a 32x32 PNG whatever the asked
    size (and 200 even where a 400 is due), and /generate/img2img with a 500."""

    def do_GET(self) -> None:
        if self.path == "/ready":
            self.reply(200, {"ready": True})
        else:
            self.reply(200, {"model": {"modes": ["img2img"]}, "workers": [{"device": "cpu"}]})

    def do_POST(self) -> None:
        request = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/generate/img2img":
            self.reply(500, {"success": False, "error": "boom in the pipeline", "error_type": "internal_error"})
            return
        fields = json.loads(request)
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        fields.pop("input_image", None)
        self.reply(200, {**fields, "success": True, "image_base64": image, "elapsed_time": 0.01, "gpu_id": "cpu"})


@pytest.fixture(scope="module")
def lying_server() -> Iterator[str]:
    with serving(LyingHandler) as url:
        yield url


# --- tools/test_img2img.py ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", [[], ["--form"]], ids=["json", "form"])
def test_img2img_tool_passes_every_mode_and_validation(server: GenServeProcess, transport: list[str]) -> None:
    proc = run_tool(IMG2IMG_TOOL, *QUICK, *transport, "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    summary = results(proc.stdout)
    modes = {mode: summary.get(mode) for mode in GENERATION_MODES}
    assert modes == dict.fromkeys(GENERATION_MODES, "PASS"), explain(proc)
    assert {row: summary.get(row) for row in VALIDATION_ROWS} == dict.fromkeys(VALIDATION_ROWS, "PASS"), explain(proc)
    assert "8 passed, 0 failed" in proc.stdout
    assert ("form-data" in proc.stdout) == bool(transport)
    # The per-test lines name the device, the times and the mode.
    assert "PASS fill: mode=fill gpu=cpu server=" in proc.stdout


def test_img2img_tool_validation_only(server: GenServeProcess) -> None:
    proc = run_tool(IMG2IMG_TOOL, "validation", *QUICK, "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    summary = results(proc.stdout)
    assert summary == dict.fromkeys(VALIDATION_ROWS, "PASS"), explain(proc)
    assert "input_image" in proc.stdout and "mask_image" in proc.stdout and "control_image" in proc.stdout


def test_img2img_tool_runs_only_the_asked_mode(server: GenServeProcess) -> None:
    proc = run_tool(IMG2IMG_TOOL, "fill", *QUICK, "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    assert results(proc.stdout) == {"fill": "PASS"}, explain(proc)
    assert "1 passed, 0 failed" in proc.stdout


def test_img2img_tool_saves_inputs_and_outputs(server: GenServeProcess, tmp_path: Path) -> None:
    out = tmp_path / "saved"  # does not exist yet: the tool creates it
    args = ["img2img", "controlnet", "--size", "96", "--steps", "1", "--save", str(out), "--url", server.url]
    proc = run_tool(IMG2IMG_TOOL, *args)
    assert proc.returncode == 0, explain(proc)
    expected = {"input.png", "mask.png", "control.png", "img2img.png", "controlnet.png"}
    assert {path.name for path in out.iterdir()} == expected
    for name in expected:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.size == (96, 96), name


def test_img2img_tool_refuses_a_size_the_server_would_not_return(server: GenServeProcess) -> None:
    """The server rounds sizes down to a multiple of 16, so "exactly the asked size" needs such a size."""
    proc = run_tool(IMG2IMG_TOOL, "img2img", "--size", "100", "--url", server.url)
    assert proc.returncode == 2
    assert "--size must be a multiple of 16" in proc.stderr


def test_img2img_tool_fails_on_wrong_replies(lying_server: str) -> None:
    proc = run_tool(IMG2IMG_TOOL, "img2img", "fill", "validation", *QUICK, "--url", lying_server)
    assert proc.returncode == 1, explain(proc)
    summary = results(proc.stdout)
    assert summary["img2img"] == "FAIL"
    assert "PNG is 32x32, asked 64x64" in proc.stdout
    assert summary["fill"] == "SKIP"  # the fake serves img2img only
    assert summary["validation: img2img without input_image"] == "FAIL"  # answered 200 instead of 400
    assert summary["validation: fill without mask_image"] == "SKIP"
    assert "failed" in proc.stdout


# --- tools/test_upload_methods.py --------------------------------------------------------------------------------


def upload_rows(output: str) -> dict[tuple[str, str], list[str]]:
    """(size, method) -> the cells of test_upload_methods' results table."""
    return {(row[0], row[1]): row for row in table_rows(output) if len(row) >= 7 and row[1] in ("json", "form")}


def test_upload_methods_simple_prints_both_methods(server: GenServeProcess) -> None:
    proc = run_tool(UPLOAD_TOOL, "simple", "--sizes", "64,128", "--repeats", "1", "--steps", "1", "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    rows = upload_rows(proc.stdout)
    assert set(rows) == {(size, method) for size in ("64x64", "128x128") for method in ("json", "form")}, explain(proc)
    for size in ("64x64", "128x128"):
        payload = {method: int(rows[(size, method)][2].replace(",", "")) for method in ("json", "form")}
        assert payload["form"] > 0
        assert payload["json"] > payload["form"], "base64 makes the JSON body larger than the multipart one"
        for method in ("json", "form"):
            for cell in rows[(size, method)][3:7]:
                float(cell.replace(",", ""))  # every timing is a number
    assert "form / json" in proc.stdout
    assert "chart written" not in proc.stdout  # simple draws a chart only when --chart is given


def test_upload_methods_full_writes_chart_and_json(server: GenServeProcess, tmp_path: Path) -> None:
    chart, figures = tmp_path / "chart.png", tmp_path / "figures.json"
    args = ["full", "--sizes", "64,128", "--repeats", "1", "--steps", "1", "--chart", str(chart)]
    proc = run_tool(UPLOAD_TOOL, *args, "--json-out", str(figures), "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    assert len(upload_rows(proc.stdout)) == 4, explain(proc)
    with Image.open(chart) as image:
        assert image.format == "PNG"
        assert image.size[0] > 300 and image.size[1] > 200
    report = json.loads(figures.read_text())
    assert len(report["samples"]) == 4  # 2 sizes x 2 methods x 1 repeat
    assert set(report["medians"]) == {"64", "128"}
    assert 0 < report["medians"]["128"]["form_over_json"]["payload_bytes"] < 1


def test_upload_methods_fails_on_a_failed_request(lying_server: str) -> None:
    proc = run_tool(UPLOAD_TOOL, "simple", "--sizes", "64", "--repeats", "1", "--url", lying_server)
    assert proc.returncode == 1, explain(proc)
    assert "500" in proc.stderr and "boom in the pipeline" in proc.stderr, explain(proc)


# --- both tools --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", [IMG2IMG_TOOL, UPLOAD_TOOL])
def test_tools_report_an_unreachable_server(tool: str) -> None:
    proc = run_tool(tool, "--url", CLOSED_PORT_URL, timeout=60)
    assert proc.returncode != 0
    assert "cannot reach http://127.0.0.1:1" in proc.stderr, explain(proc)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", [IMG2IMG_TOOL, UPLOAD_TOOL])
def test_tools_have_help(tool: str) -> None:
    proc = run_tool(tool, "--help", timeout=60)
    assert proc.returncode == 0, explain(proc)
    for option in ("--url", "--api-key", "--timeout", "examples:"):
        assert option in proc.stdout
