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
import requests
from PIL import Image

from tests.server import REPO_ROOT, GenServeProcess
from tests.stubs import QuietHandler, serving

IMG2IMG_TOOL = "tools/test_img2img.py"
UPLOAD_TOOL = "tools/test_upload_methods.py"
GENERATION_MODES = ("text2img", "img2img", "fill", "controlnet", "redux")
VALIDATION_ROWS = (
    "validation: img2img without input_image",
    "validation: fill without mask_image",
    "validation: controlnet without control_image",
    "validation: redux without input_image",
    "validation: unknown mode 'sketch'",
    "validation: unknown LoRA 'no-such-lora'",
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
    """A fake GenServe that is ready and serves img2img (no text2img, no redux) and has an empty LoRA catalogue, but
    answers /generate with a 32x32 PNG whatever the asked size (and 200 even where a 400 is due), and
    /generate/img2img with a 500."""

    def do_GET(self) -> None:
        if self.path == "/ready":
            self.reply(200, {"ready": True})
        elif self.path == "/loras":
            self.reply(200, {"loras": []})
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


class NoLorasHandler(QuietHandler):
    """A fake GenServe from before LoRAs: it serves text2img and has no GET /loras (404)."""

    def do_GET(self) -> None:
        if self.path == "/ready":
            self.reply(200, {"ready": True})
        elif self.path == "/loras":
            self.reply(404, {"detail": "Not Found"})
        else:
            self.reply(200, {"model": {"modes": ["text2img"]}, "workers": [{"device": "cpu"}]})


# --- tools/test_img2img.py ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", [[], ["--form"]], ids=["json", "form"])
def test_img2img_tool_passes_every_mode_and_validation(server: GenServeProcess, transport: list[str]) -> None:
    proc = run_tool(IMG2IMG_TOOL, *QUICK, *transport, "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    summary = results(proc.stdout)
    modes = {mode: summary.get(mode) for mode in GENERATION_MODES}
    assert modes == dict.fromkeys(GENERATION_MODES, "PASS"), explain(proc)
    assert summary.get("lora") == "PASS", explain(proc)
    assert {row: summary.get(row) for row in VALIDATION_ROWS} == dict.fromkeys(VALIDATION_ROWS, "PASS"), explain(proc)
    assert len(summary) == len(GENERATION_MODES) + 1 + len(VALIDATION_ROWS)  # every test ran, by default
    assert "12 passed, 0 failed, 0 skipped" in proc.stdout
    assert ("form-data" in proc.stdout) == bool(transport)
    # The per-test lines name the device, the times and the mode.
    assert "PASS fill: mode=fill gpu=cpu server=" in proc.stdout
    assert "PASS redux: mode=redux gpu=cpu server=" in proc.stdout
    assert "PASS lora: mode=text2img gpu=cpu server=" in proc.stdout


def test_img2img_tool_validation_only(server: GenServeProcess) -> None:
    proc = run_tool(IMG2IMG_TOOL, "validation", *QUICK, "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    summary = results(proc.stdout)
    assert summary == dict.fromkeys(VALIDATION_ROWS, "PASS"), explain(proc)
    assert "input_image" in proc.stdout and "mask_image" in proc.stdout and "control_image" in proc.stdout
    assert "400: no LoRA named 'no-such-lora'" in proc.stdout  # the server's own message, shown in the table


def test_img2img_tool_lora_uses_the_first_lora_that_fits(server: GenServeProcess) -> None:
    """The embedded model's catalogue lists embedded-detail first; the tool sends it at 0.8 and checks the echo. The
    worker really loaded it: the server counts the adapter load."""
    loads_before = server.status()["loras"]["adapter_loads"]
    proc = run_tool(IMG2IMG_TOOL, "lora", "--form", *QUICK, "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    assert results(proc.stdout) == {"lora": "PASS"}, explain(proc)
    assert "64x64 PNG with LoRA embedded-detail at 0.8" in proc.stdout
    held = [key for worker in server.status()["workers"] for key in worker["loras"]["held"]]
    assert any(key.startswith("base/embedded-detail@") for key in held), held
    assert server.status()["loras"]["adapter_loads"] >= loads_before  # loaded now, or kept from an earlier test


def test_img2img_tool_redux_sends_its_scales(server: GenServeProcess) -> None:
    proc = run_tool(IMG2IMG_TOOL, "redux", *QUICK, "--url", server.url)
    assert proc.returncode == 0, explain(proc)
    assert results(proc.stdout) == {"redux": "PASS"}, explain(proc)
    task = next(line for line in proc.stdout.splitlines() if line.startswith("│ redux")).split("task ")[1][:8]
    job = requests.get(f"{server.url}/jobs?limit=50", timeout=30).json()
    params = next(item for item in job["jobs"] if str(item["task_id"]).startswith(task))["params"]
    assert (params["mode"], params["prompt_embeds_scale"], params["pooled_prompt_embeds_scale"]) == ("redux", 0.9, 0.9)


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


def test_img2img_tool_skips_redux_and_lora_where_the_server_cannot(lying_server: str) -> None:
    """The fake serves neither redux nor text2img and its LoRA catalogue is empty: each new test is a skip with the
    reason, not a failure."""
    proc = run_tool(IMG2IMG_TOOL, "redux", "lora", "validation", *QUICK, "--url", lying_server)
    summary = results(proc.stdout)
    assert summary["redux"] == "SKIP", explain(proc)
    assert summary["lora"] == "SKIP"
    assert "the LoRA catalogue is empty" in proc.stdout
    assert summary["validation: redux without input_image"] == "SKIP"
    assert summary["validation: unknown LoRA 'no-such-lora'"] == "SKIP"  # text2img is not served


def test_img2img_tool_skips_loras_on_a_server_without_them() -> None:
    with serving(NoLorasHandler) as url:
        proc = run_tool(IMG2IMG_TOOL, "lora", "validation", *QUICK, "--url", url)
    summary = results(proc.stdout)
    assert summary["lora"] == "SKIP", explain(proc)
    assert summary["validation: unknown LoRA 'no-such-lora'"] == "SKIP"
    assert "the server has no LoRA catalogue (GET /loras answered 404)" in proc.stdout


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
