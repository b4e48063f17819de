"""``python -m genserve plan``: the memory plan for cards of given sizes, without a GPU (run in-process through the
same entry point the command uses)."""

from __future__ import annotations

import pytest

from genserve.__main__ import main


def test_plan_sizes_the_flux_family_for_each_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--memory-gb", "24", "80", "--config", "/dev/null"]) == 0
    out = capsys.readouterr().out
    assert "planning for FLUX.1-dev family" in out
    assert "memory plan for 24 GB card: strategy auto -> all transformers quantised (fp8) + model CPU offload" in out
    assert "memory plan for 80 GB card: strategy auto -> everything pinned: fits" in out
    # The whole ladder is shown, the rung taken marked.
    assert "  -> all transformers quantised (fp8) + model CPU offload " in out
    assert out.count("the auto ladder on this card:") == 2
    # The default model.modes include redux: the FLUX.1-Redux models are planned, at bf16, on every card.
    assert "FLUX.1-Redux-dev" in out
    for name, millions in (("redux_image_encoder", 428), ("redux_image_embedder", 65)):
        assert out.count(f"  {name} ") == 2
        assert f"  {name:<22}{millions:>9}M  bf16      " in out


def test_plan_leaves_redux_out_when_the_modes_do(
    capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = tmp_path_factory.mktemp("plan") / "config.yaml"
    config.write_text("model: {modes: [text2img, img2img, fill, controlnet]}\n")
    assert main(["plan", "--memory-gb", "80", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "  transformer " in out and "redux_image" not in out
    # Without the Redux models the pinned plan is 0.9 GiB smaller (64.1 GiB instead of 65.0).
    assert "strategy auto -> everything pinned: fits: 64.1 GiB of 79.5 GiB" in out


def test_plan_without_fp8_quantises_int8(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--memory-gb", "48", "--no-fp8", "--config", "/dev/null"]) == 0
    assert "strategy auto -> all transformers quantised (int8): fits" in capsys.readouterr().out


def test_plan_exits_1_when_a_card_is_too_small(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--memory-gb", "4", "--config", "/dev/null"]) == 1
    out = capsys.readouterr().out
    assert (
        "DOES NOT FIT" in out and "no setting fits, not even 'all transformers quantised (fp8) + group offload'" in out
    )


def test_plan_reads_a_configured_models_folders(
    capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory, embedded_cache: object
) -> None:
    from pathlib import Path

    from workers.embedded import ensure_embedded_model

    paths = ensure_embedded_model(Path(str(embedded_cache)))
    config = tmp_path_factory.mktemp("plan") / "config.yaml"
    config.write_text(
        f"model: {{path: {paths.base}}}\nfill: {{path: {paths.fill}}}\ncontrolnet: {{path: {paths.controlnet}}}\n"
        f"redux: {{path: {paths.redux}}}\nmemory: {{strategy: pinned}}\n"
    )
    assert main(["plan", "--memory-gb", "2", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"planning for the configured model at {paths.base}" in out
    assert "memory plan for 2 GB card: strategy pinned -> everything pinned: fits" in out
    for name in ("transformer", "fill", "controlnet", "text_encoder_2", "redux_image_encoder", "redux_image_embedder"):
        assert f"  {name} " in out
    # Without redux.path a real model serves no redux (config.served_modes): nothing of it is planned.
    config.write_text(
        f"model: {{path: {paths.base}}}\nfill: {{path: {paths.fill}}}\ncontrolnet: {{path: {paths.controlnet}}}\n"
    )
    assert main(["plan", "--memory-gb", "2", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "  controlnet " in out and "redux_image" not in out
