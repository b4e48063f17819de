"""The speed path of a worker: what runs between loading and ready, and per job. Worker process only.

After loading (workers.loading), in this order:
1. attention backend: diffusers' attention dispatcher on every transformer (``performance.attention``); ``auto`` picks
   FlashAttention 3 on a Hopper GPU that has it, else FlashAttention 2 if installed, else PyTorch's own SDPA
   (``native``, which already runs fused kernels on CUDA). A backend that is not available is a startup error that
   names what is missing;
2. fused q/k/v projections (``performance.fuse_qkv``): one matmul instead of three. An unquantised transformer is
   fused here: diffusers keeps the separate projections beside the fused one (to unfuse later); here they become
   views of the fused weight, so fusing costs no memory (the plan needs none). A torchao-quantised one (fp8, int8)
   was fused before quantising, while loading (workers.loading, ``fuse_qkv_to_quantise``), and is recognised here
   and left as it is; an nf4 one (bitsandbytes quantises while loading) stays unfused;
3. channels-last VAE on CUDA (``performance.channels_last_vae``);
4. torch.compile (``performance.compile``), with inductor's caches on disk (``performance.compile_cache_dir``): a
   respawned worker loads compiled kernels instead of compiling again. Regional compilation (each repeated block
   compiled once, ``compile_repeated_blocks``) unless the mode is max-autotune, whose CUDA graphs want the whole
   model;
5. warm-up: one two-step job per served mode and ``performance.warmup_sizes`` entry, so no request pays a compile.

Per job: the VAE decodes in tiles above ``performance.vae_tiling_above`` squared pixels (2048² then fits), and a size
outside the warmed set is logged once (it may compile once).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from genserve.messages import Attention, MemoryPlan, PerformanceSettings

log = logging.getLogger(__name__)

# performance.attention -> diffusers' AttentionBackendName value
BACKENDS: dict[str, str] = {"native": "native", "flash": "flash", "flash3": "_flash_3", "sage": "sage"}
WARMUP_STEPS = 2


class SpeedSetupError(Exception):
    """The device cannot run what the performance section asks (a missing attention kernel); retrying cannot help."""


@dataclass(frozen=True)
class CompileStats:
    """What warming up cost, and whether the on-disk caches were used (a respawn should hit them)."""

    warmup_s: float  # seconds spent in warm-up jobs (compiling, or loading compiled kernels from the cache)
    cache_hits: int  # inductor FX graphs loaded from the on-disk cache
    cache_misses: int  # FX graphs compiled from scratch


def attention_available(backend: str) -> str | None:
    """Why diffusers cannot use a backend here (None when it can)."""
    from diffusers.models import attention_dispatch

    try:
        attention_dispatch._check_attention_backend_requirements(attention_dispatch.AttentionBackendName(backend))
    except (RuntimeError, ImportError) as exc:
        return str(exc)
    return None


def choose_attention(requested: Attention, device: str) -> str:
    """The diffusers backend to use; raises SpeedSetupError when the requested one cannot run on this device."""
    if requested == "native":
        return "native"
    if not device.startswith("cuda"):
        if requested == "auto":
            return "native"
        raise SpeedSetupError(f"performance.attention: {requested} needs a CUDA GPU; {device} has none (use native)")
    if requested == "auto":
        major, _minor = torch.cuda.get_device_capability(torch.device(device))
        candidates = (["flash3"] if major == 9 else []) + ["flash"]
        for name in candidates:
            if attention_available(BACKENDS[name]) is None:
                return BACKENDS[name]
        return "native"
    problem = attention_available(BACKENDS[requested])
    if problem is not None:
        raise SpeedSetupError(f"performance.attention: {requested} is not available: {problem}")
    return BACKENDS[requested]


# fused projection -> the separate ones diffusers fuses into it (self-attention, then the added text stream)
_FUSED_FROM: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)


def _views_of_fused(attention: Any) -> None:
    """Point q/k/v (and the added ones) at row slices of the fused weight: the separate copies are freed."""
    for fused_name, names in _FUSED_FROM:
        fused = getattr(attention, fused_name, None)
        if fused is None:
            continue
        rows = 0
        for name in names:
            linear = getattr(attention, name)
            width = linear.out_features
            linear.weight = torch.nn.Parameter(fused.weight[rows : rows + width], requires_grad=False)
            if linear.bias is not None and fused.bias is not None:
                linear.bias = torch.nn.Parameter(fused.bias[rows : rows + width], requires_grad=False)
            rows += width


def _drop_separate(attention: Any) -> None:
    """Delete q/k/v (and the added ones) once fused. Safe because a fused FluxAttention's processor reads only
    to_qkv / to_added_qkv (diffusers' ``_get_qkv_projections`` branches on ``fused_projections``); views would not
    do before quantising: quantize_ would quantise each view into a copy of its own and keep the fused
    unquantised storage alive beneath them."""
    for fused_name, names in _FUSED_FROM:
        if getattr(attention, fused_name, None) is None:
            continue
        for name in names:
            if hasattr(attention, name):
                delattr(attention, name)


def fusable_attentions(model: Any) -> list[Any]:
    from diffusers.models.attention import AttentionModuleMixin

    return [
        module
        for module in model.modules()
        if isinstance(module, AttentionModuleMixin) and getattr(module, "_supports_qkv_fusion", False)
    ]


def is_fused(model: Any) -> bool:
    """Whether every fusable attention of ``model`` is fused already (as loading leaves a quantised transformer)."""
    attentions = fusable_attentions(model)
    return bool(attentions) and all(getattr(attention, "fused_projections", False) for attention in attentions)


def _fuse_each(model: Any, then: Callable[[Any], None]) -> int:
    """Fuse the attentions not fused yet one at a time (the peak is one layer's copy), ``then`` each; how many."""
    fused = 0
    with torch.no_grad():
        for attention in fusable_attentions(model):
            if getattr(attention, "fused_projections", False):
                continue  # fused before (at load): its separate projections may be gone
            attention.fuse_projections()
            then(attention)
            fused += 1
    return fused


def fuse_qkv(model: Any) -> int:
    """Fuse every fusable attention of an unquantised ``model``, the separate projections as views; how many."""
    return _fuse_each(model, _views_of_fused)


def fuse_qkv_to_quantise(model: Any) -> int:
    """Fuse every fusable attention of an unquantised ``model`` that is about to be quantised, dropping the separate
    projections (no unquantised copy is left for quantize_ to find or keep alive); how many."""
    return _fuse_each(model, _drop_separate)


def _is_quantized(plan: MemoryPlan, name: str) -> bool:
    return dict(plan.quantize).get(name, "none") != "none"


def _why_unfused(plan: MemoryPlan, names: list[str]) -> str:
    """Why quantised transformers reached the speed settings unfused (their weights are quantised tensors by now)."""
    quantization = dict(plan.quantize)
    if all(quantization.get(name) == "nf4" for name in names):
        return "bitsandbytes quantises nf4 while loading, before any fusion could run"
    return "quantised while loading, not fused first (load_models was not asked to fuse)"


def _compile(model: Any, name: str, settings: PerformanceSettings) -> None:
    whole = settings.compile_mode == "max-autotune" or not getattr(model, "_repeated_blocks", None)
    log.info(
        "compiling %s (%s, mode %s)", name, "whole model" if whole else "each repeated block", settings.compile_mode
    )
    if whole:
        model.compile(mode=settings.compile_mode)
    else:
        model.compile_repeated_blocks(mode=settings.compile_mode)


def use_compile_cache(settings: PerformanceSettings) -> None:
    """Inductor reads its cache folder from the environment: set it before anything compiles."""
    os.makedirs(settings.compile_cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.compile_cache_dir
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


class Speed:
    """Applies the performance settings to one worker's models, then serves per-job decisions."""

    def __init__(self, settings: PerformanceSettings, device: str, plan: MemoryPlan) -> None:
        self.settings = settings
        self.device = device
        self.plan = plan
        self.attention = "native"
        self._warmed: set[tuple[str, int, int, int]] = set()  # (pipeline, width, height, batch) run since start
        self._vae: Any = None
        self._tiling = False

    def apply(self, models: dict[str, Any]) -> None:
        """Attention, fusion, channels-last and compile on the loaded models (name -> module, None if not served)."""
        present = {name: model for name, model in models.items() if model is not None}
        self._vae = present.get("vae")
        self.attention = choose_attention(self.settings.attention, self.device)
        transformers: dict[str, Any] = {
            name: present[name] for name in ("transformer", "fill", "controlnet") if name in present
        }
        if self.attention != "native":
            for model in transformers.values():
                model.set_attention_backend(self.attention)
        log.info("attention backend: %s", self.attention)
        if self.settings.fuse_qkv:
            self._fuse(transformers)
        if self.settings.channels_last_vae and self.device.startswith("cuda") and self._vae is not None:
            self._vae.to(memory_format=torch.channels_last)
        if self.settings.compile != "off":
            use_compile_cache(self.settings)
            for name, model in transformers.items():
                _compile(model, name, self.settings)
            if self.settings.compile == "all" and self._vae is not None:
                _compile(self._vae.decoder, "VAE decoder", self.settings)

    def _fuse(self, transformers: dict[str, Any]) -> None:
        unfused: list[str] = []
        for name, model in transformers.items():
            if is_fused(model):
                # Fused before quantising, while loading: nothing left to fuse (and no separate weights to view).
                log.info("%s: q/k/v projections already fused (before quantising, at load)", name)
            elif _is_quantized(self.plan, name):
                unfused.append(name)
            else:
                log.info("fused q/k/v projections of %d attention layers in %s", fuse_qkv(model), name)
        if unfused:
            log.info("q/k/v projections left unfused in %s: %s", ", ".join(unfused), _why_unfused(self.plan, unfused))

    def warm_up(self, run: Callable[[str, int, int], None], pipelines: Iterable[str]) -> CompileStats:
        """With compile on: one short job per pipeline and warm-up size, through ``run(pipeline, width, height)``."""
        from torch._dynamo.utils import counters

        began = time.perf_counter()
        if self.settings.compile != "off":
            for width, height in self.settings.warmup_sizes:
                for pipeline in pipelines:
                    log.info("warming up %s at %dx%d", pipeline, width, height)
                    self._warmed.add((pipeline, width, height, 1))
                    run(pipeline, width, height)
        inductor = counters["inductor"]
        return CompileStats(
            warmup_s=time.perf_counter() - began,
            cache_hits=int(inductor.get("fxgraph_cache_hit", 0)),
            cache_misses=int(inductor.get("fxgraph_cache_miss", 0)),
        )

    def before_job(self, width: int, height: int, pipeline: str, batch: int = 1) -> None:
        """Per pipeline call: VAE tiling by image size; a compiled shape (size and batch) outside the warmed set is
        logged once (warm-up runs single images: the first batch of each size may compile once)."""
        self._set_tiling(width, height)
        if self.settings.compile != "off" and (pipeline, width, height, batch) not in self._warmed:
            self._warmed.add((pipeline, width, height, batch))
            shape = f"{width}x{height}" + (f" in a batch of {batch}" if batch > 1 else "")
            log.info("%s at %s was not warmed up: it may compile once now", pipeline, shape)

    def _set_tiling(self, width: int, height: int) -> None:
        threshold = self.settings.vae_tiling_above
        tile = bool(threshold) and width * height > threshold * threshold
        if self._vae is None or tile == self._tiling:
            return
        if tile:
            self._vae.enable_tiling()
        else:
            self._vae.disable_tiling()
        self._tiling = tile
