"""The pure parts of tools/test_img2img.py: what each test sends, which LoRA it picks, how it reads the echo, the
order of its steps and its command line. tests/e2e/test_client_tools.py runs the tool against real servers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import test_img2img as tool  # noqa: E402  (a tool, imported the way the tools import each other)

SETTINGS = tool.Settings(size=64, steps=1, prompt="a lighthouse", seed=5)
NO_ROUTE = tool.Catalogue([], missing="the server has no LoRA catalogue (GET /loras answered 404)")


def test_default_is_every_test_in_order() -> None:
    assert tool.parse_args([]).tests == [
        "text2img",
        "img2img",
        "fill",
        "controlnet",
        "redux",
        "lora",
        "validation",
    ]
    assert tool.parse_args(["lora", "redux", "lora"]).tests == ["lora", "redux"]


def test_an_unknown_test_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        tool.parse_args(["loras"])
    assert exit_.value.code == 2
    assert "unknown test 'loras'" in capsys.readouterr().err


def test_help_lists_the_new_tests(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        tool.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "redux" in text and "lora" in text and f"default: all {len(tool.TESTS)}" in text
    assert tool.__doc__ is not None and "``redux``" in tool.__doc__ and "``lora``" in tool.__doc__


def test_redux_sends_input_image_a_short_prompt_and_both_scales() -> None:
    fields = tool.generation_fields("redux", SETTINGS)
    assert fields["mode"] == "redux"
    assert fields["prompt"] == tool.REDUX_PROMPT and len(fields["prompt"]) < len(SETTINGS.prompt)
    assert (fields["prompt_embeds_scale"], fields["pooled_prompt_embeds_scale"]) == (0.9, 0.9)
    images = tool.InputImages.build(64)
    assert images.for_mode("redux") == {"input_image": images.input_png}
    other = tool.generation_fields("img2img", SETTINGS)
    assert "prompt_embeds_scale" not in other and other["prompt"] == SETTINGS.prompt


def test_form_fields_send_lists_as_json() -> None:
    loras = [{"name": "embedded-style", "weight": 0.8}]
    assert json.loads(tool.form_value(loras)) == loras
    assert tool.form_value(0.9) == "0.9"
    assert tool.form_value("redux") == "redux"
    assert tool.form_value(64) == "64"


def lora(name: str, transformer: bool, fill: bool = True) -> dict[str, Any]:
    return {"name": name, "rank": 4, "fits": {"transformer": transformer, "fill": fill}}


def test_pick_lora_takes_the_first_that_fits_the_base_transformer() -> None:
    assert tool.pick_lora([lora("fill-only", False), lora("b", True), lora("a", True)]) == ("b", "")
    name, why = tool.pick_lora([])
    assert name is None and "catalogue is empty" in why
    name, why = tool.pick_lora([lora("fill-only", False), {"name": "odd"}])
    assert name is None and "no LoRA of the catalogue fits the base transformer (fill-only, odd)" == why


def test_the_lora_echo_must_match_name_and_weight() -> None:
    asked = [{"name": "embedded-detail", "weight": 0.8}]
    assert tool.loras_echo_problem([{"name": "embedded-detail", "weight": 0.8}], asked) is None
    assert tool.loras_echo_problem([{"name": "embedded-detail", "weight": 0.8000000001}], asked) is None
    for wrong in (None, [], [{"name": "embedded-detail", "weight": 1.0}], [{"name": "other", "weight": 0.8}], ["x"]):
        problem = tool.loras_echo_problem(wrong, asked)
        assert problem is not None and problem.startswith("loras echoed as"), wrong


def test_validation_covers_redux_and_an_unknown_lora() -> None:
    steps = dict(tool.plan_steps(["validation"]))
    redux = steps["validation: redux without input_image"]
    assert (redux.mode, redux.images, redux.needle) == ("redux", (), "input_image")
    unknown = steps[f"validation: unknown LoRA '{tool.MISSING_LORA}'"]
    assert unknown.loras == (tool.MISSING_LORA,) and unknown.needle == tool.MISSING_LORA
    assert [name for name, _ in tool.plan_steps(["lora", "text2img"])] == ["lora", "text2img"]


class FakeClient:
    """Stands in for tool.Client where a test must not be reached: any request fails the test."""

    form = False

    def generate(self, fields: dict[str, Any], images: dict[str, bytes]) -> Any:
        raise AssertionError(f"no request expected, got {fields}")


@pytest.mark.parametrize(
    ("catalogue", "enabled", "reason"),
    [
        (NO_ROUTE, ("text2img",), "404"),
        (tool.Catalogue([]), ("text2img",), "catalogue is empty"),
        (tool.Catalogue([lora("fill-only", False)]), ("text2img",), "fits the base transformer"),
        (tool.Catalogue([lora("a", True)]), ("img2img",), "text2img is not served"),
    ],
    ids=["no-route", "empty", "none-fits", "no-text2img"],
)
def test_lora_test_skips_with_the_reason(catalogue: Any, enabled: tuple[str, ...], reason: str) -> None:
    images = tool.InputImages.build(64)
    outcome = tool.run_step(FakeClient(), "lora", images, SETTINGS, enabled, catalogue)  # type: ignore[arg-type]
    assert (outcome.name, outcome.result, outcome.mode) == ("lora", "SKIP", "text2img")
    assert reason in outcome.detail


def test_validation_skips_what_the_server_cannot_check() -> None:
    images = tool.InputImages.build(64)
    steps = dict(tool.plan_steps(["validation"]))
    unknown_lora = steps[f"validation: unknown LoRA '{tool.MISSING_LORA}'"]
    skipped = tool.run_step(FakeClient(), unknown_lora, images, SETTINGS, ("text2img",), NO_ROUTE)  # type: ignore[arg-type]
    assert skipped.result == "SKIP" and "404" in skipped.detail
    redux = steps["validation: redux without input_image"]
    skipped = tool.run_step(FakeClient(), redux, images, SETTINGS, ("text2img",), tool.Catalogue([]))  # type: ignore[arg-type]
    assert skipped.result == "SKIP" and skipped.detail == "mode not served by this server"
    generation = tool.run_step(FakeClient(), "redux", images, SETTINGS, ("text2img",), tool.Catalogue([]))  # type: ignore[arg-type]
    assert generation.result == "SKIP" and "it serves text2img" in generation.detail
