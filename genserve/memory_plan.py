"""The memory plan: how a worker fits its models on its device, decided before it loads a byte.

Inputs: each enabled model's shape (from its folder's config.json, instantiated on the meta device, so no weight is
read; or from genserve.flux_family's public configs when no weights are configured), the operator's memory
settings and the device (free memory, fp8 support, which quantisation libraries are installed). Output: a
MemoryPlan (genserve.messages) that says where each model lives and at what precision, and whether it fits.

Models: the FLUX.1-dev pipeline (CLIP and T5 text encoders, VAE, transformer), the Fill and ControlNet transformers
when those modes are served, and with redux the FLUX.1-Redux models: its SigLIP vision encoder and its embedder
(image features to T5-wide prompt tokens). The Redux models run once per job before denoising, as the text encoders
do, so they are placed like them (REDUX_LIKE: on the host under offload text_encoders, model or group, with
group offload streaming SigLIP as it streams T5 and keeping the small embedder on the device as it keeps CLIP) and
never quantised (memory.quantize cannot name them). Their activations (SigLIP at 384 px: 729 tokens) are far below
the denoising phase's, which they never overlap.

The strategies:
- ``auto`` walks the ladder and takes the first setting that fits: everything pinned → quantise the Fill and
  ControlNet transformers → quantise the base transformer too → text encoders on the CPU → model CPU offload →
  group offload. What the operator set explicitly (a component's quantisation, an offload) holds on every rung.
- ``pinned`` / ``quantized`` / ``offload`` take exactly one setting; when it does not fit, the worker refuses to
  start and the plan's note names the first setting that would.

Bytes, per model: parameters of ``nn.Linear`` layers (what quantisers convert) at the quantised width plus their
scales, everything else (biases, norms, embeddings, convolutions) at the model dtype. Quantised widths: int8 and
fp8 1 byte per weight plus a scale (and for int8 a zero point) per output row (torchao); nf4 half a byte per weight
plus one 4-byte absmax per block of 64 (bitsandbytes without double quantisation).

The activation reserve (``memory.reserve_gb`` overrides it) is sized for the largest output the service accepts
(limits.max_size squared) and is the larger of the two phases, which never overlap:
- denoising: one transformer block's live activations, about RESERVE_BLOCK_WIDTHS times its hidden width per token
  (qkv, attention output, the 4x MLP and the concatenation of a single-stream block), plus the ControlNet's
  residuals (one hidden-wide tensor per ControlNet block, kept across the transformer call);
- VAE decode: about RESERVE_VAE_MAPS feature maps of the decoder's full-resolution width alive at once, for at most
  performance.vae_tiling_above squared pixels (larger images decode in tiles);
plus, on CUDA, RESERVE_CUDA_FIXED for cuBLAS/attention workspaces and the caching allocator's slack. These factors
are estimates checked against measured peaks by tools/gpu_check.sh.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from genserve.library_noise import quiet_library_noise
from genserve.messages import (
    OFFLOAD_ORDER,
    QUANTIZABLE,
    ComponentPlan,
    MemoryPlan,
    MemorySettings,
    Mode,
    Offload,
    Quantization,
)

log = logging.getLogger(__name__)

GIB = 2**30  # every size here is in GiB, as nvidia-smi counts (its MiB) and as cards are sold ("24 GB" = 24 GiB)
CUDA_CONTEXT_BYTES = GIB // 2  # what the CUDA context and driver take before a worker plans (the plan CLI's guess)
RESERVE_CUDA_FIXED = 1 * GIB  # workspaces, the CUDA caching allocator's slack
RESERVE_BLOCK_WIDTHS = 16  # live activations of one transformer block, in hidden widths per token
RESERVE_VAE_MAPS = 6  # full-resolution decoder feature maps alive at once
TEXT_TOKENS = 512  # T5 tokens that join the image tokens in every transformer block
# Per output row of a quantised Linear: int8 (torchao) keeps a float32 scale and an int8 zero point, fp8 (per-row
# granularity) a float32 scale. nf4 (bitsandbytes) keeps a float32 absmax per block of NF4_BLOCK weights.
INT8_ROW_BYTES = 5
FP8_ROW_BYTES = 4
NF4_BLOCK = 64
NF4_BLOCK_BYTES = 4
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
REDUX = ("redux_image_encoder", "redux_image_embedder")  # FLUX.1-Redux: SigLIP vision tower, ReduxImageEncoder
# The Redux models run once per job before denoising, like the text encoders, and are placed like them: SigLIP
# (0.43 B, 27 layers) as T5, which group offload streams; the embedder (0.06 B, two Linears) as CLIP, kept.
REDUX_LIKE = {"redux_image_encoder": "text_encoder_2", "redux_image_embedder": "text_encoder"}
ENCODERS = TEXT_ENCODERS + REDUX  # on the host under offload: text_encoders
TRANSFORMERS = ("transformer", "fill", "controlnet")
# Models kept on the device under group offload: too small to be worth streaming (the Redux embedder too: REDUX_LIKE).
GROUP_PINNED = ("text_encoder", "vae")


class PlanError(Exception):
    """The plan cannot be made (a folder without a readable config); the message says which."""


@dataclass(frozen=True)
class ComponentShape:
    """What the planner knows of one model without loading it."""

    name: str  # transformer, fill, controlnet, text_encoder, text_encoder_2, vae, redux_image_encoder/_embedder
    linear_params: int  # weights of nn.Linear layers: what quantisation converts
    linear_rows: int  # their output features, summed: one scale each when quantised to int8/fp8
    other_params: int  # every other parameter (biases, norms, embeddings, convolutions)
    buffer_bytes: int  # registered buffers, at their own dtypes
    blocks: int  # repeated blocks (group offload streams them); 1 for a model without
    hidden: int  # hidden width of a transformer (sizes the activation reserve); 0 for other models
    first_channels: int  # the VAE decoder's full-resolution width (sizes the reserve); 0 for other models

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def bytes_at(self, precision: Quantization, dtype_bytes: int) -> int:
        other = self.other_params * dtype_bytes + self.buffer_bytes
        if precision == "none":
            return self.linear_params * dtype_bytes + other
        if precision == "nf4":
            blocks = -(-self.linear_params // NF4_BLOCK)
            return self.linear_params // 2 + blocks * NF4_BLOCK_BYTES + other
        row_bytes = INT8_ROW_BYTES if precision == "int8" else FP8_ROW_BYTES
        return self.linear_params + self.linear_rows * row_bytes + other


@dataclass(frozen=True)
class DeviceInfo:
    """The device a plan is made for, and what it can do."""

    name: str  # cuda:N or cpu (the plan CLI: "N GB card")
    is_cuda: bool
    available_bytes: int  # free device memory (host memory available, for a CPU worker)
    host_available_bytes: int  # host memory for offloaded models; 0: not checked
    has_fp8: bool  # compute capability 8.9 or newer (Ada, Hopper, Blackwell)
    capability: str  # "9.0", or "" when unknown / CPU
    has_torchao: bool
    has_bitsandbytes: bool


@dataclass(frozen=True)
class Setting:
    """One way of placing the models: a rung of the ladder, or the one setting a strategy asks for."""

    label: str
    quantize: dict[str, Quantization]
    offload: Offload


# --- shapes ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_model_construction() -> Iterator[None]:
    """Instantiating on the meta device logs and warns about things that only matter with weights."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _meta_model(config: dict[str, Any]) -> Any:
    """The model a config describes, its parameters on the meta device (no memory, no weights read)."""
    quiet_library_noise()
    from accelerate import init_empty_weights

    with _quiet_model_construction(), init_empty_weights():
        class_name = config.get("_class_name")
        if class_name:
            import diffusers

            model_class = getattr(diffusers, class_name, None)
            if model_class is None:
                raise PlanError(f"unknown diffusers model class {class_name!r}")
            return model_class.from_config(config)
        import transformers

        architectures = config.get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None or "model_type" not in config:
            raise PlanError(f"config names no known model class (architectures={architectures!r})")
        fields = {key: value for key, value in config.items() if key not in ("architectures", "model_type")}
        return model_class(transformers.AutoConfig.for_model(config["model_type"], **fields))


def _tied_names(model: Any) -> set[str]:
    """Parameters that from_pretrained ties to another (T5's encoder.embed_tokens is its shared embedding)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    return set(tied) if isinstance(tied, dict) else set()


def _block_count(config: dict[str, Any]) -> int:
    for keys in (("num_layers", "num_single_layers"), ("num_hidden_layers",)):
        if any(key in config for key in keys):
            return max(1, sum(int(config.get(key) or 0) for key in keys))
    return 1


def shape_from_config(name: str, config: dict[str, Any]) -> ComponentShape:
    """Count a model's parameters by kind from its config alone."""
    import torch

    model = _meta_model(config)
    tied = _tied_names(model)
    parameters = {key: value for key, value in model.named_parameters() if key not in tied}
    linear_params = linear_rows = 0
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{module_name}.weight" in parameters:
            linear_params += module.weight.numel()
            linear_rows += module.out_features
    total = sum(parameter.numel() for parameter in parameters.values())
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    is_transformer = name in TRANSFORMERS
    hidden = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
    channels = config.get("block_out_channels") or [0]
    return ComponentShape(
        name=name,
        linear_params=linear_params,
        linear_rows=linear_rows,
        other_params=total - linear_params,
        buffer_bytes=buffers,
        blocks=_block_count(config),
        hidden=hidden if is_transformer else 0,
        first_channels=int(channels[0]) if name == "vae" else 0,
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise PlanError(f"{path} does not hold a JSON object")
    return loaded


def transformer_folder(path: Path) -> Path:
    """A FLUX.1-Fill-dev repo folder keeps the transformer in transformer/; a bare transformer folder works too."""
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def component_folders(
    model_path: Path, fill_path: Path | None, controlnet_path: Path | None, redux_path: Path | None = None
) -> dict[str, Path]:
    """Where each enabled model's config.json lives (fill / controlnet / redux only when given; a FLUX.1-Redux-dev
    folder keeps SigLIP in image_encoder/ and the embedder in image_embedder/)."""
    folders = {name: model_path / name for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    if fill_path is not None:
        folders["fill"] = transformer_folder(fill_path)
    if controlnet_path is not None:
        folders["controlnet"] = controlnet_path
    if redux_path is not None:
        folders["redux_image_encoder"] = redux_path / "image_encoder"
        folders["redux_image_embedder"] = redux_path / "image_embedder"
    return folders


def enabled_components(modes: Iterable[Mode]) -> list[str]:
    modes = set(modes)
    names = ["text_encoder", "text_encoder_2", "vae", "transformer"]
    if "fill" in modes:
        names.append("fill")
    if "controlnet" in modes:
        names.append("controlnet")
    if "redux" in modes:
        names.extend(REDUX)
    return names


def shapes_from_folders(folders: dict[str, Path]) -> dict[str, ComponentShape]:
    return {name: shape_from_config(name, _read_config(folder)) for name, folder in folders.items()}


def shapes_from_family(names: Iterable[str]) -> dict[str, ComponentShape]:
    from genserve.flux_family import FAMILY

    return {name: shape_from_config(name, FAMILY[name]) for name in names}


# --- devices -----------------------------------------------------------------------------------------------------


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_device_info(device: str, override_gb: float) -> DeviceInfo:
    """The worker's own CUDA device (call in the worker: this creates its CUDA context)."""
    import psutil
    import torch

    index = torch.device(device).index or 0
    free, _total = torch.cuda.mem_get_info(index)
    major, minor = torch.cuda.get_device_capability(index)
    return DeviceInfo(
        name=device,
        is_cuda=True,
        available_bytes=int(override_gb * GIB) if override_gb else int(free),
        host_available_bytes=int(psutil.virtual_memory().available),
        has_fp8=(major, minor) >= (8, 9),
        capability=f"{major}.{minor}",
        has_torchao=installed("torchao"),
        has_bitsandbytes=installed("bitsandbytes"),
    )


def cpu_device_info(override_gb: float) -> DeviceInfo:
    import psutil

    available = int(override_gb * GIB) if override_gb else int(psutil.virtual_memory().available)
    return DeviceInfo(
        name="cpu",
        is_cuda=False,
        available_bytes=available,
        host_available_bytes=0,
        has_fp8=False,
        capability="",
        has_torchao=installed("torchao"),
        has_bitsandbytes=installed("bitsandbytes"),
    )


def card_device_info(memory_gb: float, fp8: bool = True, host_gb: float = 0.0) -> DeviceInfo:
    """A hypothetical N-GiB CUDA card, for ``python -m genserve plan`` (no GPU touched): a worker would find
    about CUDA_CONTEXT_BYTES less than that free."""
    return DeviceInfo(
        name=f"{memory_gb:g} GB card",
        is_cuda=True,
        available_bytes=int(memory_gb * GIB) - CUDA_CONTEXT_BYTES,
        host_available_bytes=int(host_gb * GIB),
        has_fp8=fp8,
        capability="",
        has_torchao=True,
        has_bitsandbytes=True,
    )


# --- settings ----------------------------------------------------------------------------------------------------


def _auto_method(settings: MemorySettings, device: DeviceInfo) -> Quantization:
    if settings.auto_quantization != "auto":
        return settings.auto_quantization
    return "fp8" if device.has_fp8 else "int8"


def _more_offload(first: Offload, second: Offload) -> Offload:
    return max(first, second, key=OFFLOAD_ORDER.index)


def _explicit(settings: MemorySettings) -> dict[str, Quantization]:
    return {name: settings.quantization_of(name) for name in QUANTIZABLE}


def _with_quantized(
    base: dict[str, Quantization], names: Iterable[str], method: Quantization
) -> dict[str, Quantization]:
    """``names`` quantised with ``method`` where the operator left them at none."""
    return {name: (method if name in names and value == "none" else value) for name, value in base.items()}


def ladder(settings: MemorySettings, device: DeviceInfo) -> list[Setting]:
    """The auto strategy's rungs, least memory saved first (the operator's explicit choices hold on each)."""
    method = _auto_method(settings, device)
    explicit = _explicit(settings)
    side = _with_quantized(explicit, ("fill", "controlnet"), method)
    every = _with_quantized(explicit, TRANSFORMERS, method)
    rungs = [
        Setting("everything pinned", explicit, settings.offload),
        Setting(f"Fill and ControlNet quantised ({method})", side, settings.offload),
        Setting(f"all transformers quantised ({method})", every, settings.offload),
    ]
    if device.is_cuda:
        offloads: tuple[tuple[Offload, str], ...] = (
            ("text_encoders", "text encoders on the CPU"),
            ("model", "model CPU offload"),
            ("group", "group offload"),
        )
        for offload, label in offloads:
            rungs.append(Setting(f"{rungs[2].label} + {label}", every, _more_offload(settings.offload, offload)))
    unique: list[Setting] = []
    for rung in rungs:  # explicit settings can make rungs identical: keep the first of each
        if not any(rung.quantize == seen.quantize and rung.offload == seen.offload for seen in unique):
            unique.append(rung)
    return unique


def requested_setting(settings: MemorySettings, device: DeviceInfo) -> Setting:
    """The one setting a non-auto strategy asks for."""
    explicit = _explicit(settings)
    if settings.strategy == "quantized":
        method = _auto_method(settings, device)
        return Setting(f"transformers quantised ({method})", _with_quantized(explicit, TRANSFORMERS, method), "none")
    if settings.strategy == "offload":
        offload: Offload = settings.offload if settings.offload != "none" else "model"
        return Setting(f"offload: {offload}", explicit, offload)
    return Setting("everything pinned", explicit, settings.offload)


def unsupported(setting: Setting, device: DeviceInfo, names: Iterable[str]) -> list[str]:
    """Why this device cannot run a setting (empty when it can)."""
    problems: list[str] = []
    for name in names:
        quantization = setting.quantize.get(name, "none")
        on_cpu = not device.is_cuda or (name in ENCODERS and setting.offload == "text_encoders")
        where = "a CPU worker" if not device.is_cuda else f"{name} on the CPU (offload: text_encoders)"
        if quantization == "fp8":
            if on_cpu:
                problems.append(f"fp8 ({name}) needs a CUDA GPU; {where} cannot run it")
            elif not device.has_fp8:
                capability = f" (compute capability {device.capability})" if device.capability else ""
                problems.append(
                    f"fp8 ({name}) needs a GPU with compute capability 8.9 or newer (Ada, Hopper); "
                    f"{device.name}{capability} has none: use int8"
                )
        if quantization == "nf4":
            if on_cpu:
                problems.append(f"nf4 ({name}) needs a CUDA GPU (bitsandbytes); {where} cannot run it")
            elif not device.has_bitsandbytes:
                problems.append(f"nf4 ({name}) needs the bitsandbytes package: pip install bitsandbytes")
        if quantization in ("fp8", "int8") and not device.has_torchao:
            problems.append(f"{quantization} ({name}) needs the torchao package: pip install torchao")
    if setting.offload != "none" and not device.is_cuda:
        problems.append(f"offload: {setting.offload} moves models between host and GPU; a CPU worker has no GPU")
    return list(dict.fromkeys(problems))


def startup_problems(settings: MemorySettings, devices: Iterable[str]) -> list[str]:
    """What the API process can refuse before any worker starts: fp8, nf4 or offload asked of CPU workers, and a
    missing quantisation package. (A GPU's fp8 support is checked by its worker, which owns the device.)"""
    problems: list[str] = []
    for name in dict.fromkeys(devices):
        is_cuda = name.startswith("cuda")
        device = DeviceInfo(
            name=name,
            is_cuda=is_cuda,
            available_bytes=0,
            host_available_bytes=0,
            has_fp8=is_cuda,
            capability="",
            has_torchao=installed("torchao"),
            has_bitsandbytes=installed("bitsandbytes"),
        )
        setting = (
            Setting("as configured", _explicit(settings), settings.offload)
            if settings.strategy == "auto"
            else requested_setting(settings, device)
        )
        problems.extend(f"{name}: {problem}" for problem in unsupported(setting, device, QUANTIZABLE))
    return list(dict.fromkeys(problems))


# --- bytes -------------------------------------------------------------------------------------------------------


def activation_reserve_bytes(
    shapes: dict[str, ComponentShape], width: int, height: int, act_bytes: int, is_cuda: bool, tiling_above: int = 0
) -> int:
    """Peak activation memory of one job at width x height (see the module docstring for the model). Above
    ``tiling_above`` squared pixels the VAE decodes in tiles, so its phase never needs more than that size's."""
    image_tokens = (width // 16) * (height // 16)
    hidden = max((shapes[name].hidden for name in ("transformer", "fill") if name in shapes), default=0)
    denoise = (image_tokens + TEXT_TOKENS) * hidden * RESERVE_BLOCK_WIDTHS * act_bytes
    if "controlnet" in shapes:
        denoise += shapes["controlnet"].blocks * image_tokens * hidden * act_bytes
    vae = shapes["vae"].first_channels if "vae" in shapes else 0
    decoded_pixels = min(width * height, tiling_above * tiling_above) if tiling_above else width * height
    decode = decoded_pixels * vae * RESERVE_VAE_MAPS * act_bytes
    return max(denoise, decode) + (RESERVE_CUDA_FIXED if is_cuda else 0)


def _placement(name: str, offload: Offload) -> str:
    name = REDUX_LIKE.get(name, name)  # the Redux models go where their text-encoder counterparts go
    if offload == "text_encoders" and name in TEXT_ENCODERS:
        return "cpu"
    if offload == "model":
        return "offload"
    if offload == "group" and name not in GROUP_PINNED:
        return "group"
    return "device"


def _device_weight_bytes(components: list[ComponentPlan], shapes: dict[str, ComponentShape], offload: Offload) -> int:
    """Weights on the device at the worst moment of a job."""
    sizes = {component.name: component.bytes for component in components}
    resident = sum(c.bytes for c in components if c.placement == "device")
    if offload == "model":  # one model at a time, except the ControlNet, which stays beside the transformer
        controlnet = sizes.get("controlnet", 0)
        return max(
            *(sizes.get(name, 0) for name in ENCODERS),
            sizes.get("transformer", 0) + controlnet,
            sizes.get("fill", 0),
            sizes.get("vae", 0) + controlnet,
        )
    if offload == "group":  # the group that runs and the one being prefetched
        streamed = [c for c in components if c.placement == "group"]
        group = max((2 * c.bytes // shapes[c.name].blocks for c in streamed), default=0)
        return resident + group
    return resident


def evaluate(
    setting: Setting,
    shapes: dict[str, ComponentShape],
    device: DeviceInfo,
    dtype: str,
    reserve_bytes: int,
    strategy: str,
) -> MemoryPlan:
    """The plan for one setting: where every model goes, what it takes, and whether that fits."""
    dtype_bytes = DTYPE_BYTES[dtype]
    components = [
        ComponentPlan(
            name=name,
            params=shape.params,
            precision=(q if (q := setting.quantize.get(name, "none")) != "none" else dtype),
            placement=_placement(name, setting.offload) if device.is_cuda else "device",  # type: ignore[arg-type]
            bytes=shape.bytes_at(setting.quantize.get(name, "none"), dtype_bytes),
        )
        for name, shape in shapes.items()
    ]
    device_bytes = _device_weight_bytes(components, shapes, setting.offload) + reserve_bytes
    host_bytes = sum(c.bytes for c in components if c.placement != "device")
    problems = unsupported(setting, device, shapes)
    fits = (
        not problems
        and device_bytes <= device.available_bytes
        and (not device.host_available_bytes or host_bytes <= device.host_available_bytes)
    )
    return MemoryPlan(
        device=device.name,
        strategy=strategy,  # type: ignore[arg-type]
        setting=setting.label,
        fits=fits,
        quantize=tuple((name, setting.quantize.get(name, "none")) for name in QUANTIZABLE),
        offload=setting.offload,
        components=tuple(components),
        device_bytes=device_bytes,
        reserve_bytes=reserve_bytes,
        device_available_bytes=device.available_bytes,
        host_bytes=host_bytes,
        host_available_bytes=device.host_available_bytes,
        note="; ".join(problems),
    )


def _shortfall(plan: MemoryPlan) -> str:
    if plan.note:
        return plan.note
    if plan.device_bytes > plan.device_available_bytes:
        return (
            f"needs {plan.device_bytes / GIB:.1f} GiB on {plan.device}, "
            f"{plan.device_available_bytes / GIB:.1f} GiB available"
        )
    return f"needs {plan.host_bytes / GIB:.1f} GiB of host memory, {plan.host_available_bytes / GIB:.1f} GiB available"


def _reserve(settings: MemorySettings, shapes: dict[str, ComponentShape], device: DeviceInfo, dtype: str) -> int:
    if settings.reserve_gb:
        return int(settings.reserve_gb * GIB)
    return activation_reserve_bytes(
        shapes,
        settings.max_width,
        settings.max_height,
        DTYPE_BYTES[dtype],
        device.is_cuda,
        settings.vae_tiling_above,
    )


def plan_ladder(
    settings: MemorySettings, shapes: dict[str, ComponentShape], device: DeviceInfo, dtype: str
) -> list[MemoryPlan]:
    """Every rung of the auto ladder, evaluated (the plan CLI shows them all)."""
    reserve = _reserve(settings, shapes, device, dtype)
    return [evaluate(rung, shapes, device, dtype, reserve, "auto") for rung in ladder(settings, device)]


def plan_memory(
    settings: MemorySettings, shapes: dict[str, ComponentShape], device: DeviceInfo, dtype: str
) -> MemoryPlan:
    """The plan a worker follows; ``fits`` is False (and ``note`` says why and what would fit) when none does."""
    rungs = plan_ladder(settings, shapes, device, dtype)
    first_fit = next((rung for rung in rungs if rung.fits), None)
    if settings.strategy == "auto":
        if first_fit is not None:
            return first_fit
        last = rungs[-1]
        return replace(last, note=f"no setting fits, not even {last.setting!r}: {_shortfall(last)}")
    reserve = _reserve(settings, shapes, device, dtype)
    plan = evaluate(requested_setting(settings, device), shapes, device, dtype, reserve, settings.strategy)
    if plan.fits:
        return plan
    if first_fit is not None:
        what = f"memory.strategy: auto would take {first_fit.setting!r} ({first_fit.device_bytes / GIB:.1f} GiB)"
    else:
        what = "no setting fits this device"
    return replace(plan, note=f"{_shortfall(plan)}; {what}")


# --- words -------------------------------------------------------------------------------------------------------


def describe(plan: MemoryPlan) -> str:
    """The plan as an operator reads it in the log and in the plan CLI."""
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    host = f", host {plan.host_bytes / GIB:.1f} GiB" if plan.host_bytes else ""
    lines = [
        f"memory plan for {plan.device}: strategy {plan.strategy} -> {plan.setting}: {verdict}: "
        f"{plan.device_bytes / GIB:.1f} GiB of {plan.device_available_bytes / GIB:.1f} GiB "
        f"(activation reserve {plan.reserve_bytes / GIB:.1f} GiB){host}",
        f"  {'component':<22}{'params':>10}  {'precision':<10}{'placement':<10}{'GiB':>8}",
    ]
    for c in plan.components:
        lines.append(f"  {c.name:<22}{c.params / 1e6:>9.0f}M  {c.precision:<10}{c.placement:<10}{c.bytes / GIB:>8.2f}")
    if plan.note:
        lines.append(f"  {plan.note}")
    return "\n".join(lines)


def one_line(plan: MemoryPlan) -> str:
    """The plan's gist, for /ready's reason and error messages."""
    gist = (
        f"{plan.setting} needs {plan.device_bytes / GIB:.1f} GiB, {plan.device_available_bytes / GIB:.1f} GiB available"
    )
    return f"{gist} ({plan.note})" if plan.note else gist
