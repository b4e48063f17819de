"""The worker's speed path on the embedded model: fused q/k/v (same output, no extra memory; an nf4 transformer left
unfused, saying why), attention backend choice and its refusals, and VAE tiling by size. Fusion before quantising
(fp8, int8) is tested with loading, in test_fused_quantized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from genserve.config import Config
from genserve.messages import MemoryPlan
from genserve.startup_checks import attention_problems
from tests.tensors import transformer_inputs
from workers.speed import Speed, SpeedSetupError, choose_attention, fuse_qkv


@pytest.fixture(scope="module")
def embedded(embedded_cache: Path) -> Any:
    from workers.embedded import ensure_embedded_model

    return ensure_embedded_model(embedded_cache)


def load_transformer(folder: Path) -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct storage behind a module's parameters (views of one tensor count once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


def test_fused_qkv_gives_the_same_output_and_costs_no_memory(embedded: Any) -> None:
    transformer = load_transformer(embedded.base)
    inputs = transformer_inputs(transformer)
    with torch.inference_mode():
        before = transformer(**inputs).sample
    bytes_before = storage_bytes(transformer)
    fused = fuse_qkv(transformer)
    assert fused == transformer.config.num_layers + transformer.config.num_single_layers
    attention = transformer.transformer_blocks[0].attn
    assert attention.fused_projections and attention.to_qkv.weight.shape[0] == 3 * attention.to_q.weight.shape[0]
    # The separate projections are now views of the fused weight: the same storage, so no extra bytes.
    assert attention.to_q.weight.untyped_storage().data_ptr() == attention.to_qkv.weight.untyped_storage().data_ptr()
    assert storage_bytes(transformer) == bytes_before
    with torch.inference_mode():
        after = transformer(**inputs).sample
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def nf4_plan() -> MemoryPlan:
    """Only what Speed reads of a plan: the transformer's quantisation."""
    return MemoryPlan(
        device="cuda:0",
        strategy="quantized",
        setting="nf4",
        fits=True,
        quantize=(("transformer", "nf4"),),
        offload="none",
        components=(),
        device_bytes=0,
        reserve_bytes=0,
        device_available_bytes=0,
        host_bytes=0,
        host_available_bytes=0,
        note="",
    )


def test_an_nf4_transformer_is_left_unfused_saying_why(embedded: Any, caplog: pytest.LogCaptureFixture) -> None:
    """bitsandbytes quantises while loading, so fusion cannot come first; the speed settings must not fuse its
    quantised weights either. (The unquantised embedded transformer stands in: Speed decides by the plan.)"""
    transformer = load_transformer(embedded.base)
    settings = Config.model_validate({"performance": {"fuse_qkv": True}}).performance_settings()
    with caplog.at_level("INFO", logger="workers.speed"):
        Speed(settings, "cpu", nf4_plan()).apply({"transformer": transformer})
    assert not transformer.transformer_blocks[0].attn.fused_projections
    assert [record.getMessage() for record in caplog.records if "fused" in record.getMessage()] == [
        "q/k/v projections left unfused in transformer: bitsandbytes quantises nf4 while loading, before any fusion "
        "could run"
    ]


def test_attention_on_a_cpu_worker() -> None:
    assert choose_attention("auto", "cpu") == "native"
    assert choose_attention("native", "cpu") == "native"
    with pytest.raises(SpeedSetupError, match="flash3 needs a CUDA GPU; cpu has none"):
        choose_attention("flash3", "cpu")
    assert attention_problems("sage", ["cpu", "cpu"]) == [
        "cpu: performance.attention: sage is a CUDA kernel; a CPU worker cannot run it (use native)"
    ]
    assert attention_problems("flash", ["cuda:0"]) == [] and attention_problems("auto", ["cpu"]) == []


def test_the_vae_decodes_in_tiles_above_the_threshold(embedded: Any) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(embedded.base, subfolder="vae")
    config = Config.model_validate({"performance": {"vae_tiling_above": 1536}})
    speed = Speed(config.performance_settings(), "cpu", plan=None)  # type: ignore[arg-type]  # no plan needed here
    speed.apply({"vae": vae})
    speed.before_job(2048, 2048, "text2img")
    assert vae.use_tiling
    speed.before_job(1024, 1536, "text2img")
    assert not vae.use_tiling
    speed.before_job(1600, 1536, "fill")
    assert vae.use_tiling


def test_a_size_outside_the_warmed_set_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    config = Config.model_validate({"performance": {"compile": "transformer", "warmup_sizes": [[64, 64]]}})
    speed = Speed(config.performance_settings(), "cpu", plan=None)  # type: ignore[arg-type]  # no plan needed here
    warmed: list[tuple[str, int, int]] = []
    stats = speed.warm_up(lambda pipeline, width, height: warmed.append((pipeline, width, height)), ["text2img"])
    assert warmed == [("text2img", 64, 64)] and stats.warmup_s >= 0
    with caplog.at_level("INFO", logger="workers.speed"):
        speed.before_job(64, 64, "text2img")
        speed.before_job(96, 80, "text2img")
        speed.before_job(96, 80, "text2img")
        speed.before_job(64, 64, "text2img", batch=2)  # warm-up runs single images: a batch is another shape
        speed.before_job(64, 64, "text2img", batch=2)
    assert [record.getMessage() for record in caplog.records] == [
        "text2img at 96x80 was not warmed up: it may compile once now",
        "text2img at 64x64 in a batch of 2 was not warmed up: it may compile once now",
    ]
