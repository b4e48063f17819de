"""Fused q/k/v on torchao-quantised transformers, on the embedded model through the real loading path: with
``fuse_qkv`` on, an int8 transformer is loaded unquantised, fused, stripped of its separate q/k/v, then quantised.
int8 stands in for fp8 here (torchao's fp8 needs a GPU); both take per-row weight scales, so fusing changes neither."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from genserve.config import Config
from genserve.memory_plan import component_folders, cpu_device_info, plan_memory, shapes_from_folders
from genserve.messages import MemoryPlan
from tests.tensors import allocated_bytes, transformer_inputs
from workers.loading import LoadedModels, ModelPaths, load_models
from workers.speed import Speed

TRANSFORMERS = ("transformer", "fill", "controlnet")
SEPARATE = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@pytest.fixture(scope="module")
def paths(embedded_cache: Path) -> ModelPaths:
    from workers.embedded import ensure_embedded_model

    built = ensure_embedded_model(embedded_cache)
    return ModelPaths(base=built.base, fill=built.fill, controlnet=built.controlnet)


@pytest.fixture(scope="module")
def plan(paths: ModelPaths) -> MemoryPlan:
    """The planner's own int8 plan for a CPU worker: every transformer int8, on the host."""
    memory = Config.model_validate({"memory": {"strategy": "quantized", "auto_quantization": "int8"}}).memory_settings()
    shapes = shapes_from_folders(component_folders(paths.base, paths.fill, paths.controlnet))
    planned = plan_memory(memory, shapes, cpu_device_info(0), "fp32")
    assert {name: dict(planned.quantize)[name] for name in TRANSFORMERS} == dict.fromkeys(TRANSFORMERS, "int8")
    return planned


def transformers_of(models: LoadedModels) -> dict[str, Any]:
    return {"transformer": models.base.transformer, "fill": models.fill_transformer, "controlnet": models.controlnet}


@pytest.fixture(scope="module")
def fused(paths: ModelPaths, plan: MemoryPlan) -> dict[str, Any]:
    return transformers_of(load_models(paths, plan, "cpu", torch.float32, fuse_qkv=True))


@pytest.fixture(scope="module")
def unfused(paths: ModelPaths, plan: MemoryPlan) -> dict[str, Any]:
    return transformers_of(load_models(paths, plan, "cpu", torch.float32))


def attentions(model: Any) -> list[Any]:
    from diffusers.models.attention import AttentionModuleMixin

    return [module for module in model.modules() if isinstance(module, AttentionModuleMixin)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_attention_is_fused_into_an_int8_projection(fused: dict[str, Any], name: str) -> None:
    from torchao.quantization import Int8Tensor

    model = fused[name]
    assert attentions(model)
    for attention in attentions(model):
        assert attention.fused_projections
        assert isinstance(attention.to_qkv.weight, Int8Tensor)
        assert attention.to_qkv.out_features == 3 * attention.inner_dim
        if attention.added_kv_proj_dim is not None:  # the double-stream blocks' text projections
            assert isinstance(attention.to_added_qkv.weight, Int8Tensor)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_no_separate_or_unquantised_projection_stays_alive(fused: dict[str, Any], name: str) -> None:
    from torchao.quantization import Int8Tensor

    model = fused[name]
    separate = [key for key in model.state_dict() if key.split(".")[-2] in SEPARATE]
    assert separate == []
    # Nothing unquantised is left behind any Linear either (no bf16/fp32 copy of the fused weight, no view of one).
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert linears and all(isinstance(linear.weight, Int8Tensor) for linear in linears)


@pytest.mark.parametrize("name", ["transformer", "fill"])
def test_the_fused_int8_transformer_gives_the_unfused_int8_output(
    fused: dict[str, Any], unfused: dict[str, Any], name: str
) -> None:
    """int8 weight-only quantises per output row, so the fused weight's rows are the separate weights' rows with the
    same scales: the one difference is one matmul over 3x the rows instead of three, i.e. fp32 summation order.
    Measured on CPU: 0.0 (bit-identical); 1e-6 leaves room for another BLAS's order and stays 4 orders of magnitude
    under int8's own error against fp32 (about 5e-3 here), so any real fusion mistake (a swapped or lost projection,
    a second quantisation) fails."""
    inputs = transformer_inputs(fused[name])
    with torch.inference_mode():
        expected = unfused[name](**inputs).sample
        actual = fused[name](**inputs).sample
    assert relative_error(actual, expected) <= 1e-6


def attention_outputs(model: Any, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every attention's output(s) in one forward, in order."""
    outputs: list[torch.Tensor] = []

    def record(_module: Any, _args: Any, output: Any) -> None:
        outputs.extend(output if isinstance(output, tuple) else (output,))

    hooks = [attention.register_forward_hook(record) for attention in attentions(model)]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def test_the_fused_int8_controlnet_attends_as_the_unfused_int8_one(
    fused: dict[str, Any], unfused: dict[str, Any]
) -> None:
    """The ControlNet's blocks fuse too. Its residuals pass through zero-initialised output blocks (as a fresh
    ControlNet's do), so they would match whatever the attention did: its attention outputs are compared instead,
    with the transformer's tolerance (same reasoning)."""
    model = fused["controlnet"]
    inputs = transformer_inputs(model)
    generator = torch.Generator().manual_seed(4)
    inputs["controlnet_cond"] = torch.randn(inputs["hidden_states"].shape, generator=generator)
    inputs["controlnet_mode"] = torch.tensor([[0]])
    expected = attention_outputs(unfused["controlnet"], inputs)
    actual = attention_outputs(model, inputs)
    assert len(actual) == len(expected) == 3  # the double-stream block's image and text outputs, the single block's
    for actual_output, expected_output in zip(actual, expected, strict=True):
        assert relative_error(actual_output, expected_output) <= 1e-6


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_fusing_keeps_the_planned_bytes(
    fused: dict[str, Any], unfused: dict[str, Any], plan: MemoryPlan, name: str
) -> None:
    """The plan counts bytes per Linear row; fused rows are the same rows, with the same per-row scales."""
    fused_bytes, unfused_bytes = allocated_bytes(fused[name]), allocated_bytes(unfused[name])
    assert abs(fused_bytes - unfused_bytes) <= 0.01 * unfused_bytes
    assert fused_bytes == next(c.bytes for c in plan.components if c.name == name)


def test_the_speed_settings_see_the_fusion_done_at_load(
    fused: dict[str, Any], unfused: dict[str, Any], plan: MemoryPlan, caplog: pytest.LogCaptureFixture
) -> None:
    """Speed.apply leaves a transformer fused at load as it is (no second fusion: its separate weights are gone), and
    says once why a quantised one loaded without fusion stays unfused."""
    settings = Config.model_validate({"performance": {"fuse_qkv": True}}).performance_settings()
    weights = {id(attention): attention.to_qkv.weight for attention in attentions(fused["transformer"])}
    with caplog.at_level("INFO", logger="workers.speed"):
        Speed(settings, "cpu", plan).apply(fused)
        Speed(settings, "cpu", plan).apply(unfused)
    assert {id(attention): attention.to_qkv.weight for attention in attentions(fused["transformer"])} == weights
    assert all(not attention.fused_projections for attention in attentions(unfused["transformer"]))
    messages = [record.getMessage() for record in caplog.records if "fused" in record.getMessage()]
    assert messages == [
        *(f"{name}: q/k/v projections already fused (before quantising, at load)" for name in TRANSFORMERS),
        "q/k/v projections left unfused in transformer, fill, controlnet: quantised while loading, not fused first "
        "(load_models was not asked to fuse)",
    ]


def test_with_too_little_host_memory_for_the_unquantised_model_it_loads_quantised_unfused(
    paths: ModelPaths, plan: MemoryPlan, caplog: pytest.LogCaptureFixture
) -> None:
    import psutil

    # A plan whose base transformer claims more parameters than this host's free memory holds unquantised.
    huge = psutil.virtual_memory().available  # parameters: at 4 bytes each, four times what is free
    components = tuple(
        dataclasses.replace(component, params=huge) if component.name == "transformer" else component
        for component in plan.components
    )
    models = transformers_of(
        load_models(paths, dataclasses.replace(plan, components=components), "cpu", torch.float32, fuse_qkv=True)
    )
    assert not any(attention.fused_projections for attention in attentions(models["transformer"]))
    assert all(attention.fused_projections for attention in attentions(models["fill"]))  # small enough: fused
    assert "fusing q/k/v before quantising needs the unquantised model on the host" in caplog.text
