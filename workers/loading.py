"""Loading a worker's models the way its memory plan says: precision, placement, offload. Worker process only.

Each model is loaded on its own, so each gets its own quantisation config and its own place:
- quantisation goes through diffusers' and transformers' own configs: torchao (fp8 with dynamic per-row activation
  scales; int8 weight-only) and bitsandbytes (nf4, bf16 compute);
- ``device``: loaded straight onto the worker's GPU (device_map), no full host copy;
- ``cpu``: loaded and run on the host (text encoders under ``offload: text_encoders``);
- ``offload`` / ``group``: kept on the host and moved to the GPU while they run. A quantised one is quantised on the
  GPU first (torchao's fp8 kernels and bitsandbytes need it there), then moved to the host.
With ``performance.fuse_qkv``, a transformer (base, Fill, ControlNet) planned for torchao (fp8, int8) is fused before
it is quantised: loaded unquantised on the host, its q/k/v projections fused (the separate ones dropped), then
quantised with torchao's ``quantize_`` and the same config, layer by layer onto its place. Fusing keeps the Linear
rows, so the plan's bytes stay right. nf4 is left unfused: bitsandbytes quantises while loading (workers.speed says so).
Offload hooks are installed by ``Offloader`` once the pipelines exist (they share these very modules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from genserve.memory_plan import transformer_folder
from genserve.messages import MemoryPlan, Quantization
from workers.speed import fuse_qkv_to_quantise

log = logging.getLogger(__name__)

Library = Literal["diffusers", "transformers"]


@dataclass(frozen=True)
class ModelPaths:
    base: Path  # FluxPipeline folder
    fill: Path | None  # Fill transformer (repo or bare transformer folder), when fill is served
    controlnet: Path | None  # ControlNet folder, when controlnet is served
    redux: Path | None = None  # FLUX.1-Redux folder, when redux is served


@dataclass
class LoadedModels:
    base: Any  # FluxPipeline over the models below
    fill_transformer: Any | None
    controlnet: Any | None


# The models fusion applies to (attention with q/k/v projections), and the quantisations it can come before.
TRANSFORMERS = ("transformer", "fill", "controlnet")
TORCHAO_QUANTIZATIONS: tuple[Quantization, ...] = ("fp8", "int8")


def torchao_config(quantization: Quantization) -> Any:
    """torchao's own config for fp8 (dynamic per-row activation scales, per-row weights) or int8 (weight-only)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

    if quantization == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Int8WeightOnlyConfig()


def quantization_config(library: Library, quantization: Quantization, dtype: torch.dtype) -> Any | None:
    """The from_pretrained quantization_config for one model, or None for none."""
    if quantization == "none":
        return None
    import diffusers
    import transformers

    module: Any = diffusers if library == "diffusers" else transformers
    if quantization == "nf4":
        return module.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    quant_type = torchao_config(quantization)
    return module.TorchAoConfig(quant_type) if library == "diffusers" else module.TorchAoConfig(quant_type=quant_type)


HOST_HEADROOM = 1.15  # the unquantised model plus room for the rest of the worker while it is fused and quantised


class _Placer:
    """from_pretrained arguments and the move after loading, per model, from the plan."""

    def __init__(self, plan: MemoryPlan, device: str, dtype: torch.dtype, fuse_qkv: bool = False) -> None:
        self.device = device
        self.dtype = dtype
        self._placement = {component.name: component.placement for component in plan.components}
        self._quantize = dict(plan.quantize)
        self._params = {component.name: component.params for component in plan.components}
        self._fuse_qkv = fuse_qkv
        self._fuses: dict[str, bool] = {}  # decided once per model, before it loads

    def quantization(self, name: str) -> Quantization:
        return self._quantize.get(name, "none")

    def fuses_before_quantising(self, name: str) -> bool:
        if name not in self._fuses:
            wanted = self._fuse_qkv and name in TRANSFORMERS and self.quantization(name) in TORCHAO_QUANTIZATIONS
            self._fuses[name] = wanted and self._host_holds_unquantised(name)
        return self._fuses[name]

    def _host_holds_unquantised(self, name: str) -> bool:
        """Fusing first loads the model unquantised on the host: with too little host memory for that, it loads
        quantised as it would without fusion (q/k/v stay unfused) rather than run the host out of memory."""
        import psutil

        needed = self._params.get(name, 0) * self.dtype.itemsize * HOST_HEADROOM
        free = psutil.virtual_memory().available
        if needed <= free:
            return True
        log.warning(
            "%s: fusing q/k/v before quantising needs the unquantised model on the host (%.1f GiB with headroom), "
            "%.1f GiB is free: loading it quantised, q/k/v unfused",
            name,
            needed / 2**30,
            free / 2**30,
        )
        return False

    def load_kwargs(self, name: str, library: Library) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.fuses_before_quantising(name):
            return kwargs  # unquantised, on the host: fuse_then_quantise quantises it and puts it in place
        config = quantization_config(library, self.quantization(name), self.dtype)
        if config is not None:
            kwargs["quantization_config"] = config
        if self._loads_on_gpu(name):
            kwargs["device_map"] = self.device
        return kwargs

    def fuse_then_quantise(self, name: str, model: Any) -> Any:
        """Fuse q/k/v of a model loaded unquantised on the host, then quantise it with torchao, as loading would have.

        quantize_ moves each Linear to ``device`` just before quantising it (and every other module after its
        children), so the device peak is the quantised model plus one unquantised layer. The host peak is the whole
        unquantised transformer (bf16: 2 bytes a parameter, about 24 GB for FLUX.1-dev) plus one layer's q/k/v while
        it is fused; the host copy is freed layer by layer as quantize_ moves it. A model the plan keeps on the host
        but quantises is quantised on the GPU like this, then moved by ``settle``, as any quantised one is."""
        from torchao.quantization import quantize_

        fused = fuse_qkv_to_quantise(model)
        target = self.device if self._loads_on_gpu(name) else None
        quantize_(model, torchao_config(self.quantization(name)), device=target)
        log.info(
            "fused q/k/v of %d attention layers in %s, then quantised it (%s)", fused, name, self.quantization(name)
        )
        return model

    def settle(self, name: str, model: Any) -> Any:
        """After loading: a model quantised on the GPU but planned for the host goes there now."""
        placement = self._placement.get(name, "device")
        if self._loads_on_gpu(name) and placement in ("offload", "group"):
            model.to("cpu")
        return model

    def _loads_on_gpu(self, name: str) -> bool:
        if not self.device.startswith("cuda"):
            return False
        placement = self._placement.get(name, "device")
        return placement == "device" or (placement in ("offload", "group") and self.quantization(name) != "none")


def load_models(
    paths: ModelPaths, plan: MemoryPlan, device: str, dtype: torch.dtype, fuse_qkv: bool = False
) -> LoadedModels:
    """Every model of the worker, as the plan says. ``fuse_qkv`` (performance.fuse_qkv): fuse the torchao-quantised
    transformers' q/k/v before quantising them (the speed settings fuse the unquantised ones after loading)."""
    from diffusers import AutoencoderKL, FluxControlNetModel, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    placer = _Placer(plan, device, dtype, fuse_qkv)
    base_path = paths.base

    def load(name: str, library: Library, model_class: Any, folder: Path, subfolder: str | None) -> Any:
        log.info("loading %s from %s (%s)", name, folder / (subfolder or ""), _described(plan, name))
        model = model_class.from_pretrained(folder, subfolder=subfolder, **placer.load_kwargs(name, library))
        if placer.fuses_before_quantising(name):
            model = placer.fuse_then_quantise(name, model)
        return placer.settle(name, model)

    models = {
        "text_encoder": load("text_encoder", "transformers", CLIPTextModel, base_path, "text_encoder"),
        "text_encoder_2": load("text_encoder_2", "transformers", T5EncoderModel, base_path, "text_encoder_2"),
        "vae": load("vae", "diffusers", AutoencoderKL, base_path, "vae"),
        "transformer": load("transformer", "diffusers", FluxTransformer2DModel, base_path, "transformer"),
    }
    # Tokenizers and the scheduler come from the folder; the models above are taken as they are (no copy, no cast).
    base = FluxPipeline.from_pretrained(base_path, dtype=dtype, **models)
    fill = controlnet = None
    if paths.fill is not None:
        folder = transformer_folder(paths.fill)
        fill = load("fill", "diffusers", FluxTransformer2DModel, folder, None)
    if paths.controlnet is not None:
        controlnet = load("controlnet", "diffusers", FluxControlNetModel, paths.controlnet, None)
    return LoadedModels(base=base, fill_transformer=fill, controlnet=controlnet)


def _described(plan: MemoryPlan, name: str) -> str:
    for component in plan.components:
        if component.name == name:
            return f"{component.precision}, {component.placement}"
    return "not planned"


class Offloader:
    """Puts the plan's offload into effect over the pipelines, which share their modules.

    - ``text_encoders``: nothing to hook: the encoders live on the CPU and prompts are encoded there
      (``encode_device``); the embeddings move to the GPU.
    - ``model``: diffusers' enable_model_cpu_offload, on the pipeline that runs the job: its hooks live on the
      shared modules, so switching pipelines re-installs them (cheap: between jobs every model is on the host).
    - ``group``: diffusers' group offloading (block level, CUDA streams) on each streamed model, once: those hooks
      belong to the modules, not to a pipeline. CLIP and the VAE stay on the GPU (too small to stream).
    """

    def __init__(self, plan: MemoryPlan, device: str, blocks_per_group: int) -> None:
        self.offload = plan.offload
        self.device = device
        self._blocks = blocks_per_group
        self._placement = {component.name: component.placement for component in plan.components}
        self._active: Any = None  # the pipeline whose model-offload hooks are installed

    def install(self, modules: dict[str, Any]) -> None:
        """Once, after loading: group hooks; for the other modes nothing until a job runs."""
        if self.offload != "group":
            return
        from diffusers.hooks import apply_group_offloading

        for name, module in modules.items():
            if module is None:
                continue
            if self._placement.get(name) != "group":
                module.to(self.device)
                continue
            # Block level needs the blocks as a ModuleList child of the module itself, as diffusers' transformers
            # have them; T5's sit one level down (encoder.block), so it streams leaf by leaf instead.
            block_level = hasattr(module, "transformer_blocks")
            log.info(
                "group offloading %s (%s, CUDA streams)",
                name,
                f"{self._blocks} block(s) per group" if block_level else "leaf modules",
            )
            apply_group_offloading(
                module,
                onload_device=torch.device(self.device),
                offload_device=torch.device("cpu"),
                offload_type="block_level" if block_level else "leaf_level",
                num_blocks_per_group=self._blocks if block_level else None,
                use_stream=True,
            )

    def before_job(self, pipe: Any) -> None:
        if self.offload == "model" and pipe is not self._active:
            pipe.enable_model_cpu_offload(device=torch.device(self.device))
            self._active = pipe

    def encode_device(self, pipe: Any) -> torch.device:
        """Where the prompt is encoded: on the CPU when the text encoders live there, else where the job runs."""
        if self.offload == "text_encoders":
            return torch.device("cpu")
        return execution_device(pipe)


def execution_device(pipe: Any) -> torch.device:
    device: torch.device = pipe._execution_device  # diffusers' own answer, offload hooks included
    return device
