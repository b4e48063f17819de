"""The memory planner, with the real FLUX.1-dev family's configs (public facts, written out below: no weights) and
with the embedded model, whose estimates are checked against the bytes its loaded models actually hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from genserve import flux_family
from genserve.config import Config
from genserve.memory_plan import (
    GIB,
    ComponentShape,
    DeviceInfo,
    card_device_info,
    component_folders,
    cpu_device_info,
    enabled_components,
    plan_ladder,
    plan_memory,
    shapes_from_folders,
    startup_problems,
)
from genserve.messages import ALL_MODES, MemoryPlan, MemorySettings

# --- the public configs, as published in each model's config.json ------------------------------------------------

FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
FLUX_FILL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "in_channels": 384, "out_channels": 64}
CONTROLNET_UNION_PRO = {
    **FLUX_DEV_TRANSFORMER,
    "_class_name": "FluxControlNetModel",
    "num_layers": 5,
    "num_single_layers": 10,
    "num_mode": 10,
}
T5_XXL = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# Parameter counts of the published checkpoints (T5's token embedding counted once: the encoder's is tied to it).
PUBLISHED_PARAMS = {
    "transformer": 11_901_408_320,
    "fill": 11_902_391_360,
    "controlnet": 3_301_956_608,
    "text_encoder_2": 4_762_310_656,
    "text_encoder": 123_060_480,
    "vae": 83_819_683,
}


def write_flux_folders(root: Path) -> tuple[Path, Path, Path]:
    """FLUX.1-dev, FLUX.1-Fill-dev and a union ControlNet laid out as on disk, configs only (no weights)."""
    base, fill, controlnet = root / "FLUX.1-dev", root / "FLUX.1-Fill-dev", root / "ControlNet-Union-Pro"
    configs = {
        base / "transformer": FLUX_DEV_TRANSFORMER,
        base / "text_encoder": CLIP_L,
        base / "text_encoder_2": T5_XXL,
        base / "vae": VAE,
        fill / "transformer": FLUX_FILL_TRANSFORMER,
        controlnet: CONTROLNET_UNION_PRO,
    }
    for folder, config in configs.items():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
    return base, fill, controlnet


@pytest.fixture(scope="module")
def flux_shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ComponentShape]:
    base, fill, controlnet = write_flux_folders(tmp_path_factory.mktemp("flux"))
    return shapes_from_folders(component_folders(base, fill, controlnet))


def settings(**memory: Any) -> MemorySettings:
    return Config.model_validate({"memory": memory}).memory_settings()


def plan_on(card_gb: float, shapes: dict[str, ComponentShape], fp8: bool = True, **memory: Any) -> MemoryPlan:
    return plan_memory(settings(**memory), shapes, card_device_info(card_gb, fp8=fp8), "bf16")


def component(plan: MemoryPlan, name: str) -> Any:
    return next(c for c in plan.components if c.name == name)


def test_shapes_from_the_public_configs_match_the_published_parameter_counts(
    flux_shapes: dict[str, ComponentShape],
) -> None:
    assert {name: shape.params for name, shape in flux_shapes.items()} == PUBLISHED_PARAMS
    assert flux_shapes["transformer"].blocks == 57 and flux_shapes["transformer"].hidden == 3072
    assert flux_shapes["controlnet"].blocks == 15
    # bf16 bytes are exactly two per parameter: the base transformer is the famous ~23.8 GB (decimal).
    assert flux_shapes["transformer"].bytes_at("none", 2) == 2 * PUBLISHED_PARAMS["transformer"]


def test_the_built_in_family_is_the_published_one() -> None:
    """`genserve plan` without weights uses genserve.flux_family: it must say what the configs above say."""
    assert flux_family.FAMILY == {
        "transformer": FLUX_DEV_TRANSFORMER,
        "fill": FLUX_FILL_TRANSFORMER,
        "controlnet": CONTROLNET_UNION_PRO,
        "text_encoder": CLIP_L,
        "text_encoder_2": T5_XXL,
        "vae": VAE,
    }


@pytest.mark.parametrize(
    ("card_gb", "fp8", "expected_setting", "transformer_precision", "transformer_placement"),
    [
        (24, True, "all transformers quantised (fp8) + model CPU offload", "fp8", "offload"),
        (24, False, "all transformers quantised (int8) + model CPU offload", "int8", "offload"),
        (48, True, "all transformers quantised (fp8)", "fp8", "device"),
        (48, False, "all transformers quantised (int8)", "int8", "device"),
        (80, True, "everything pinned", "bf16", "device"),
        (141, True, "everything pinned", "bf16", "device"),
    ],
)
def test_auto_takes_the_first_rung_that_fits_each_card(
    flux_shapes: dict[str, ComponentShape],
    card_gb: int,
    fp8: bool,
    expected_setting: str,
    transformer_precision: str,
    transformer_placement: str,
) -> None:
    plan = plan_on(card_gb, flux_shapes, fp8=fp8)
    assert plan.fits and plan.setting == expected_setting
    assert component(plan, "transformer").precision == transformer_precision
    assert component(plan, "transformer").placement == transformer_placement
    assert plan.device_bytes <= plan.device_available_bytes
    # Every rung before the chosen one does not fit this card: auto took the first that does.
    rungs = plan_ladder(settings(), flux_shapes, card_device_info(card_gb, fp8=fp8), "bf16")
    chosen = [rung.setting for rung in rungs].index(plan.setting)
    assert not any(rung.fits for rung in rungs[:chosen])


def test_each_rung_needs_less_device_memory_than_the_one_before(flux_shapes: dict[str, ComponentShape]) -> None:
    rungs = plan_ladder(settings(), flux_shapes, card_device_info(24), "bf16")
    assert [rung.setting for rung in rungs] == [
        "everything pinned",
        "Fill and ControlNet quantised (fp8)",
        "all transformers quantised (fp8)",
        "all transformers quantised (fp8) + text encoders on the CPU",
        "all transformers quantised (fp8) + model CPU offload",
        "all transformers quantised (fp8) + group offload",
    ]
    device = [rung.device_bytes for rung in rungs]
    assert device == sorted(device, reverse=True) and len(set(device)) == len(device)
    # What leaves the device is held by the host instead.
    text_encoders_on_cpu = rungs[3]
    assert text_encoders_on_cpu.host_bytes == sum(
        c.bytes for c in text_encoders_on_cpu.components if c.name.startswith("text_encoder")
    )
    assert {c.placement for c in text_encoders_on_cpu.components if c.name.startswith("text_encoder")} == {"cpu"}


def test_pinned_refuses_a_card_it_does_not_fit_and_names_what_would(flux_shapes: dict[str, ComponentShape]) -> None:
    plan = plan_on(48, flux_shapes, strategy="pinned")
    assert not plan.fits and plan.setting == "everything pinned"
    assert plan.device_bytes > 60 * GIB
    assert "memory.strategy: auto would take 'all transformers quantised (fp8)'" in plan.note
    assert plan_on(80, flux_shapes, strategy="pinned").fits


def test_explicit_choices_hold_on_every_rung(flux_shapes: dict[str, ComponentShape]) -> None:
    rungs = plan_ladder(
        settings(quantize={"transformer": "nf4", "text_encoder_2": "int8"}), flux_shapes, card_device_info(24), "bf16"
    )
    assert all(dict(rung.quantize)["transformer"] == "nf4" for rung in rungs)
    assert all(dict(rung.quantize)["text_encoder_2"] == "int8" for rung in rungs)
    nf4 = component(rungs[0], "transformer")
    # Half a byte per Linear weight plus a float32 absmax per 64 of them: about 0.56 bytes a parameter.
    assert 0.55 < nf4.bytes / nf4.params < 0.58


def test_the_reserve_grows_with_the_largest_allowed_size(flux_shapes: dict[str, ComponentShape]) -> None:
    big = plan_on(80, flux_shapes)
    small = plan_memory(
        Config.model_validate({"limits": {"max_size": 1024}}).memory_settings(),
        flux_shapes,
        card_device_info(80),
        "bf16",
    )
    assert small.reserve_bytes < big.reserve_bytes
    assert big.device_bytes - small.device_bytes == big.reserve_bytes - small.reserve_bytes
    assert plan_on(80, flux_shapes, reserve_gb=3).reserve_bytes == 3 * GIB


def test_offload_needs_host_memory_and_is_refused_without_it(flux_shapes: dict[str, ComponentShape]) -> None:
    device = card_device_info(24, host_gb=8)
    plan = plan_memory(settings(), flux_shapes, device, "bf16")
    assert not plan.fits and "host memory" in plan.note


def test_hardware_that_cannot_run_a_setting_is_named() -> None:
    cpu = startup_problems(settings(quantize={"transformer": "nf4"}), ["cpu"])
    assert cpu == ["cpu: nf4 (transformer) needs a CUDA GPU (bitsandbytes); a CPU worker cannot run it"]
    assert "fp8 (fill) needs a CUDA GPU" in " ".join(startup_problems(settings(quantize={"fill": "fp8"}), ["cpu"]))
    assert "a CPU worker has no GPU" in " ".join(startup_problems(settings(offload="model"), ["cpu"]))
    assert startup_problems(settings(quantize={"transformer": "int8"}), ["cpu"]) == []
    assert startup_problems(settings(quantize={"transformer": "fp8"}), ["cuda:0"]) == []


def test_the_service_refuses_at_start_what_its_cpu_workers_cannot_run(tmp_path: Path) -> None:
    """The API process says no before any worker starts (python -m genserve turns this into exit status 2)."""
    from genserve.app import create_app
    from genserve.config import ConfigError

    config = Config.model_validate(
        {"memory": {"quantize": {"transformer": "nf4", "fill": "fp8"}}, "results": {"dir": str(tmp_path)}}
    )
    with pytest.raises(ConfigError) as refused:
        create_app(config, devices=["cpu"])
    message = str(refused.value)
    assert message.startswith("settings this hardware cannot run: ")
    assert "cpu: nf4 (transformer) needs a CUDA GPU" in message and "cpu: fp8 (fill) needs a CUDA GPU" in message


def test_fp8_on_a_gpu_without_it_is_refused_by_the_plan(flux_shapes: dict[str, ComponentShape]) -> None:
    ampere = DeviceInfo(
        name="cuda:0",
        is_cuda=True,
        available_bytes=80 * GIB,
        host_available_bytes=0,
        has_fp8=False,
        capability="8.0",
        has_torchao=True,
        has_bitsandbytes=True,
    )
    plan = plan_memory(settings(quantize={"transformer": "fp8"}), flux_shapes, ampere, "bf16")
    assert not plan.fits
    assert "compute capability 8.9 or newer" in plan.note and "(compute capability 8.0)" in plan.note
    # auto's own choice on such a GPU is int8.
    assert plan_memory(settings(), flux_shapes, ampere, "bf16").fits


# --- the embedded model: estimates against the bytes actually allocated ------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantised tensor subclass holds its inner tensors (data, scales, zero points)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def allocated_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(tensor_bytes(t) for t in tensors.values())


@pytest.fixture(scope="module")
def embedded_paths(embedded_cache: Path) -> Any:
    from workers.embedded import ensure_embedded_model

    return ensure_embedded_model(embedded_cache)


@pytest.mark.parametrize("strategy", ["pinned", "quantized"])
def test_estimates_for_the_embedded_model_match_the_bytes_allocated(embedded_paths: Any, strategy: str) -> None:
    from workers.loading import ModelPaths, load_models

    paths = ModelPaths(base=embedded_paths.base, fill=embedded_paths.fill, controlnet=embedded_paths.controlnet)
    shapes = shapes_from_folders(component_folders(paths.base, paths.fill, paths.controlnet))
    assert sorted(shapes) == sorted(enabled_components(ALL_MODES))
    plan = plan_memory(settings(strategy=strategy, auto_quantization="int8"), shapes, cpu_device_info(0), "fp32")
    assert plan.fits
    models = load_models(paths, plan, "cpu", torch.float32)
    loaded = {
        "text_encoder": models.base.text_encoder,
        "text_encoder_2": models.base.text_encoder_2,
        "vae": models.base.vae,
        "transformer": models.base.transformer,
        "fill": models.fill_transformer,
        "controlnet": models.controlnet,
    }
    for planned in plan.components:
        assert allocated_bytes(loaded[planned.name]) == planned.bytes, planned.name
    precisions = {c.name: c.precision for c in plan.components}
    quantized = strategy == "quantized"
    assert precisions["transformer"] == ("int8" if quantized else "fp32")
    assert precisions["fill"] == precisions["controlnet"] == precisions["transformer"]
    assert precisions["text_encoder_2"] == "fp32"


def test_pipelines_share_the_quantised_transformer(embedded_cache: Path) -> None:
    """img2img and both ControlNet pipelines run on the base's own (quantised) transformer: no second copy."""
    from genserve.messages import WorkerSpec
    from workers.pipelines import PipelineSet

    config = Config.model_validate({"memory": {"strategy": "quantized", "auto_quantization": "int8"}})
    spec = WorkerSpec(
        slot=0,
        api_pid=0,
        device="cpu",
        model_path="",
        fill_path="",
        controlnet_path="",
        redux_path="",
        embedded_cache_dir=str(embedded_cache),
        modes=ALL_MODES,
        dtype="auto",
        memory=config.memory_settings(),
        performance=config.performance_settings(),
        loras=config.lora_settings(),
        cpu_threads=0,
        heartbeat_interval_s=2,
        max_consecutive_oom=3,
        log_level="info",
    )
    plans: list[MemoryPlan] = []
    pipelines = PipelineSet.load(spec, on_plan=plans.append)
    assert plans == [pipelines.plan] and pipelines.plan.setting == "transformers quantised (int8)"
    pipes = pipelines._pipes
    base = pipes["text2img"].transformer
    for name in ("img2img", "controlnet", "controlnet_img2img"):
        assert pipes[name].transformer is base, name
    assert pipes["controlnet"].controlnet is pipes["controlnet_img2img"].controlnet
    assert pipes["fill"].transformer is not base
    weight = base.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__module__.startswith("torchao") and weight.qdata.dtype == torch.int8
