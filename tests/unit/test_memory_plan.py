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
    REDUX,
    TEXT_ENCODERS,
    ComponentShape,
    DeviceInfo,
    card_device_info,
    component_folders,
    cpu_device_info,
    enabled_components,
    evaluate,
    plan_ladder,
    plan_memory,
    requested_setting,
    shapes_from_family,
    shapes_from_folders,
    startup_problems,
)
from genserve.messages import ALL_MODES, MemoryPlan, MemorySettings
from tests.tensors import allocated_bytes

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
# FLUX.1-Redux-dev: image_encoder/ is google/siglip-so400m-patch14-384's vision tower, image_embedder/ the Redux one.
SIGLIP_SO400M = {
    "architectures": ["SiglipVisionModel"],
    "attention_dropout": 0.0,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "image_size": 384,
    "intermediate_size": 4304,
    "layer_norm_eps": 1e-06,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": True,
}
REDUX_EMBEDDER = {"_class_name": "ReduxImageEncoder", "redux_dim": 1152, "txt_in_features": 4096}
# Parameter counts of the published checkpoints (T5's token embedding counted once: the encoder's is tied to it).
PUBLISHED_PARAMS = {
    "transformer": 11_901_408_320,
    "fill": 11_902_391_360,
    "controlnet": 3_301_956_608,
    "text_encoder_2": 4_762_310_656,
    "text_encoder": 123_060_480,
    "vae": 83_819_683,
    # SigLIP so400m's vision tower as transformers counts it: embeddings, 27 layers, post-layernorm and the
    # attention-pooling head (the head alone is 16.3 M).
    "redux_image_encoder": 428_225_600,
    # ReduxImageEncoder: redux_up 1152 -> 12288 and redux_down 12288 -> 4096, with biases.
    "redux_image_embedder": 64_503_808,
}


def write_flux_folders(root: Path) -> tuple[Path, Path, Path, Path]:
    """FLUX.1-dev, FLUX.1-Fill-dev, a union ControlNet and FLUX.1-Redux-dev laid out as on disk, configs only."""
    base, fill, controlnet = root / "FLUX.1-dev", root / "FLUX.1-Fill-dev", root / "ControlNet-Union-Pro"
    redux = root / "FLUX.1-Redux-dev"
    configs = {
        base / "transformer": FLUX_DEV_TRANSFORMER,
        base / "text_encoder": CLIP_L,
        base / "text_encoder_2": T5_XXL,
        base / "vae": VAE,
        fill / "transformer": FLUX_FILL_TRANSFORMER,
        controlnet: CONTROLNET_UNION_PRO,
        redux / "image_encoder": SIGLIP_SO400M,
        redux / "image_embedder": REDUX_EMBEDDER,
    }
    for folder, config in configs.items():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
    return base, fill, controlnet, redux


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    return write_flux_folders(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def flux_shapes(flux_folders: tuple[Path, Path, Path, Path]) -> dict[str, ComponentShape]:
    """Every mode served, redux included (the default model.modes)."""
    base, fill, controlnet, redux = flux_folders
    return shapes_from_folders(component_folders(base, fill, controlnet, redux_path=redux))


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
        "redux_image_encoder": SIGLIP_SO400M,
        "redux_image_embedder": REDUX_EMBEDDER,
    }
    family = shapes_from_family(enabled_components(ALL_MODES))
    assert {name: shape.params for name, shape in family.items()} == PUBLISHED_PARAMS


def test_the_redux_models_from_the_public_configs(flux_shapes: dict[str, ComponentShape]) -> None:
    """SigLIP so400m (its vision tower with the pooling head) is about 0.43 B parameters, the embedder 0.06 B; both
    are counted at the model dtype (never quantised): 0.80 and 0.12 GiB in bf16."""
    siglip, embedder = flux_shapes["redux_image_encoder"], flux_shapes["redux_image_embedder"]
    print(f"SigLIP so400m: {siglip.params} parameters, {siglip.bytes_at('none', 2) / GIB:.3f} GiB in bf16")
    print(f"ReduxImageEncoder: {embedder.params} parameters, {embedder.bytes_at('none', 2) / GIB:.3f} GiB in bf16")
    assert siglip.params == 428_225_600 and embedder.params == 64_503_808
    assert siglip.blocks == 27 and embedder.blocks == 1
    assert siglip.hidden == embedder.hidden == 0  # they do not size the denoising reserve
    # bf16: two bytes a parameter, plus SigLIP's position_ids buffer (729 int64).
    assert siglip.bytes_at("none", 2) == 2 * 428_225_600 + 729 * 8
    assert embedder.bytes_at("none", 2) == 2 * 64_503_808
    assert round(siglip.bytes_at("none", 2) / GIB, 2) == 0.80 and round(embedder.bytes_at("none", 2) / GIB, 2) == 0.12
    plan = plan_on(80, flux_shapes)
    assert plan.fits and plan.setting == "everything pinned"
    for name in REDUX:
        assert component(plan, name).precision == "bf16" and component(plan, name).placement == "device"
        assert component(plan, name).bytes == flux_shapes[name].bytes_at("none", 2)
    # They count in the plan's total like every other model.
    assert plan.device_bytes == sum(c.bytes for c in plan.components) + plan.reserve_bytes


def test_a_plan_without_redux_has_no_redux_components(flux_folders: tuple[Path, Path, Path, Path]) -> None:
    base, fill, controlnet, redux = flux_folders
    modes = tuple(mode for mode in ALL_MODES if mode != "redux")
    assert not set(REDUX) & set(enabled_components(modes))
    assert set(REDUX) <= set(enabled_components(("text2img", "redux")))
    assert set(component_folders(base, fill, controlnet, redux_path=redux)) - set(
        component_folders(base, fill, controlnet)
    ) == set(REDUX)
    assert component_folders(base, None, None, redux_path=redux)["redux_image_encoder"] == redux / "image_encoder"
    assert component_folders(base, None, None, redux_path=redux)["redux_image_embedder"] == redux / "image_embedder"
    with_redux = shapes_from_folders(component_folders(base, fill, controlnet, redux_path=redux))
    without = shapes_from_folders(component_folders(base, fill, controlnet))
    for shapes in (without, shapes_from_family(enabled_components(modes))):
        plan = plan_on(80, shapes)
        assert not {c.name for c in plan.components} & set(REDUX)
    # Pinned, the Redux models add exactly their bf16 bytes (the reserve is the transformer's and the VAE's).
    difference = plan_on(80, with_redux).device_bytes - plan_on(80, without).device_bytes
    assert difference == sum(with_redux[name].bytes_at("none", 2) for name in REDUX)


@pytest.mark.parametrize("explicit", [{}, {"quantize": {"text_encoder_2": "int8"}}, {"offload": "text_encoders"}])
def test_the_redux_models_are_placed_with_the_text_encoders_on_every_rung(
    flux_shapes: dict[str, ComponentShape], explicit: dict[str, Any]
) -> None:
    """On every rung of the ladder and in every requested setting, SigLIP goes where T5 goes and the small embedder
    where CLIP goes (on the device; on the host under text_encoders and model offload; under group offload SigLIP is
    streamed as T5 is and the embedder stays, as CLIP does); both at the model dtype whatever is quantised."""
    device = card_device_info(24)
    plans = plan_ladder(settings(**explicit), flux_shapes, device, "bf16")
    for strategy, offload in (("pinned", "none"), ("quantized", "none"), ("offload", "model"), ("offload", "group")):
        requested = settings(**{**explicit, "strategy": strategy, "offload": offload})
        plans.append(evaluate(requested_setting(requested, device), flux_shapes, device, "bf16", 0, strategy))
    placements = set()
    for plan in plans:
        place = {c.name: c.placement for c in plan.components}
        assert place["redux_image_encoder"] == place["text_encoder_2"], plan.setting
        assert place["redux_image_embedder"] == place["text_encoder"], plan.setting
        placements.add((plan.offload, place["redux_image_encoder"], place["redux_image_embedder"]))
        for name in REDUX:
            assert component(plan, name).precision == "bf16", (plan.setting, name)
            assert dict(plan.quantize).get(name) is None  # memory.quantize cannot name them
        # What is not on the device is on the host, the Redux models included.
        assert plan.host_bytes == sum(c.bytes for c in plan.components if c.placement != "device")
    expected = {
        ("none", "device", "device"),
        ("text_encoders", "cpu", "cpu"),
        ("model", "offload", "offload"),
        ("group", "group", "device"),
    }
    assert placements <= expected and expected - placements <= {("none", "device", "device")}
    # On a CPU worker everything is on its one device.
    cpu = plan_memory(settings(**explicit), flux_shapes, cpu_device_info(512), "fp32")
    assert {component(cpu, name).placement for name in REDUX} == {"device"}


def test_model_offload_moves_the_redux_models_one_at_a_time(flux_shapes: dict[str, ComponentShape]) -> None:
    """Under model CPU offload the device holds the largest single model (or the transformer with its ControlNet),
    never the Redux models beside it; with a small enough transformer set, SigLIP is what the device must hold."""
    plan = plan_on(24, flux_shapes)
    assert plan.offload == "model"
    assert (
        plan.device_bytes - plan.reserve_bytes
        == component(plan, "transformer").bytes + component(plan, "controlnet").bytes
    )
    small = {name: shape for name, shape in flux_shapes.items() if name in (*TEXT_ENCODERS, *REDUX)}
    offload = plan_memory(
        settings(strategy="offload", offload="model", reserve_gb=1), small, card_device_info(24), "bf16"
    )
    assert offload.device_bytes - offload.reserve_bytes == max(
        component(offload, name).bytes for name in (*TEXT_ENCODERS, *REDUX)
    )


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
    # What leaves the device is held by the host instead: the text encoders, and the Redux models with them.
    text_encoders_on_cpu = rungs[3]
    encoders = (*TEXT_ENCODERS, *REDUX)
    assert text_encoders_on_cpu.host_bytes == sum(
        c.bytes for c in text_encoders_on_cpu.components if c.name in encoders
    )
    assert {c.placement for c in text_encoders_on_cpu.components if c.name in encoders} == {"cpu"}
    assert rungs[2].device_bytes - rungs[3].device_bytes == text_encoders_on_cpu.host_bytes


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


@pytest.fixture(scope="module")
def embedded_paths(embedded_cache: Path) -> Any:
    from workers.embedded import ensure_embedded_model

    return ensure_embedded_model(embedded_cache)


@pytest.mark.parametrize("strategy", ["pinned", "quantized"])
def test_estimates_for_the_embedded_model_match_the_bytes_allocated(embedded_paths: Any, strategy: str) -> None:
    from workers.loading import ModelPaths, load_models

    paths = ModelPaths(
        base=embedded_paths.base,
        fill=embedded_paths.fill,
        controlnet=embedded_paths.controlnet,
        redux=embedded_paths.redux,
    )
    shapes = shapes_from_folders(component_folders(paths.base, paths.fill, paths.controlnet, redux_path=paths.redux))
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
        **load_redux_models(embedded_paths.redux),
    }
    for planned in plan.components:
        assert allocated_bytes(loaded[planned.name]) == planned.bytes, planned.name
    precisions = {c.name: c.precision for c in plan.components}
    quantized = strategy == "quantized"
    assert precisions["transformer"] == ("int8" if quantized else "fp32")
    assert precisions["fill"] == precisions["controlnet"] == precisions["transformer"]
    assert precisions["text_encoder_2"] == "fp32"
    assert precisions["redux_image_encoder"] == precisions["redux_image_embedder"] == "fp32"


def load_redux_models(redux: Path) -> dict[str, torch.nn.Module]:
    """The embedded FLUX.1-Redux models, instantiated from their folders with the real classes, on the CPU."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionModel

    return {
        "redux_image_encoder": SiglipVisionModel.from_pretrained(redux / "image_encoder", dtype=torch.float32),
        "redux_image_embedder": ReduxImageEncoder.from_pretrained(redux / "image_embedder", dtype=torch.float32),
    }


def test_the_embedded_redux_folders_are_counted(embedded_paths: Any) -> None:
    """The planner's shapes of the embedded Redux folders (meta device, config only) hold exactly the parameters of
    the models from_pretrained builds from them."""
    folders = component_folders(embedded_paths.base, None, None, redux_path=embedded_paths.redux)
    shapes = shapes_from_folders({name: folders[name] for name in REDUX})
    models = load_redux_models(embedded_paths.redux)
    for name in REDUX:
        model = models[name]
        assert shapes[name].params == sum(p.numel() for p in model.parameters()) > 0, name
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert shapes[name].linear_params == linear, name
        assert shapes[name].bytes_at("none", 4) == allocated_bytes(model), name
    assert shapes["redux_image_encoder"].blocks == 1  # the tiny SigLIP has one layer


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
