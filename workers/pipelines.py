"""Pipeline loading and execution inside a worker process.

All pipelines are loaded once and kept ("pinned") for the worker's life, sharing weights:
- text2img: ``FluxPipeline.from_pretrained(model path)``;
- img2img: ``FluxImg2ImgPipeline`` over the base's own modules (no extra memory);
- fill: ``FluxFillPipeline`` with the FLUX.1-Fill transformer, sharing the base's text encoders and VAE;
- controlnet: ``FluxControlNetPipeline`` over the base's modules plus the ControlNet, and the ControlNet img2img
  variant used when a job also carries an input image.
The embedded random-weight model goes through exactly the same ``from_pretrained`` code as real FLUX.1-dev.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.images import encode_png, image_file_to_pil
from genserve.messages import FailureKind, JobRequest, Mode, WorkerSpec

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass(frozen=True)
class JobOutput:
    image_bytes: int  # size of the PNG written to the job's output_path
    width: int
    height: int
    pipeline_s: float
    encode_s: float


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the whole file or none: write a temporary sibling, then rename over the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _transformer_folder(path: Path) -> tuple[Path, str | None]:
    """A FLUX.1-Fill-dev repo folder keeps the transformer in transformer/; a bare transformer folder works too."""
    if (path / "transformer" / "config.json").is_file():
        return path, "transformer"
    return path, None


def quiet_library_noise() -> None:
    """Silence messages that say nothing to an operator (must run before diffusers is imported)."""
    # transformers: "CLIPImageProcessor requires torchvision" — Flux never uses an image processor.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    # diffusers: "modules that should be kept in float32: []" on every from_pipe (an always-true check).
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars, one per module
    except ImportError:
        pass


# Messages of CUDA errors after which the context is unusable: every later kernel launch fails too.
_FATAL_DEVICE_MESSAGES = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "cuda error: uncorrectable ecc error",
    "cudaerrorlaunchfailure",
)


def classify_error(exc: BaseException) -> FailureKind:
    """What a job's exception means for the worker: out of memory (serve on), a poisoned device (exit), or neither."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return FailureKind.OUT_OF_MEMORY
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return FailureKind.DEVICE_FATAL
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _FATAL_DEVICE_MESSAGES):
        return FailureKind.DEVICE_FATAL
    return FailureKind.ERROR


# What every Flux pipeline of a worker shares with the base: only the transformer (and a ControlNet) differ.
_SHARED_COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _pipeline_placement(device: str) -> dict[str, Any]:
    """from_pretrained arguments that put a pipeline's weights straight on a CUDA device (no full host copy).

    diffusers accepts a device type for a pipeline's device_map; torch.cuda.set_device has made ours current."""
    return {"device_map": "cuda"} if device.startswith("cuda") else {}


def _model_placement(device: str) -> dict[str, Any]:
    """The same for a single model, which takes the exact device."""
    return {"device_map": device} if device.startswith("cuda") else {}


class PipelineSet:
    """Every enabled pipeline of one worker, on one device."""

    def __init__(self, device: str, modes: tuple[Mode, ...], pipes: dict[str, Any], embedded: bool) -> None:
        self.device = device
        self.modes = modes
        self.embedded = embedded
        self._pipes = pipes

    @classmethod
    def load(cls, spec: WorkerSpec) -> PipelineSet:
        quiet_library_noise()
        from diffusers import (
            FluxControlNetImg2ImgPipeline,
            FluxControlNetModel,
            FluxControlNetPipeline,
            FluxFillPipeline,
            FluxImg2ImgPipeline,
            FluxPipeline,
            FluxTransformer2DModel,
        )
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        device = spec.device
        if device == "cpu" and spec.cpu_threads:
            torch.set_num_threads(spec.cpu_threads)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dtype = resolve_dtype(spec.dtype, device)

        model_path, fill_path, controlnet_path = spec.model_path, spec.fill_path, spec.controlnet_path
        embedded = not model_path
        if embedded:
            from workers.embedded import ensure_embedded_model

            paths = ensure_embedded_model(Path(spec.embedded_cache_dir))
            model_path, fill_path, controlnet_path = str(paths.base), str(paths.fill), str(paths.controlnet)
            log.warning(
                "serving the EMBEDDED RANDOM-WEIGHT TEST MODEL from %s: images are noise. "
                "Set model.path to a FLUX.1-dev folder for real images.",
                model_path,
            )

        log.info("loading FLUX base pipeline from %s (%s, %s)", model_path, device, dtype)
        # Placed on the device as it loads (device_map on CUDA; CPU is where weights load anyway), so no .to():
        # that would walk every module again for nothing.
        base = FluxPipeline.from_pretrained(model_path, dtype=dtype, **_pipeline_placement(device))
        pipes: dict[str, Any] = {"text2img": base}
        # The other pipelines are built from the base's very modules (no copy, no cast): cheaper than from_pipe,
        # which walks and casts every shared module again for each pipeline it makes.
        shared = {name: getattr(base, name) for name in _SHARED_COMPONENTS}
        if "img2img" in spec.modes:
            pipes["img2img"] = FluxImg2ImgPipeline(**shared, transformer=base.transformer)
        if "fill" in spec.modes:
            folder, subfolder = _transformer_folder(Path(fill_path))
            log.info("loading Fill transformer from %s", folder / (subfolder or ""))
            fill_transformer = FluxTransformer2DModel.from_pretrained(
                folder, subfolder=subfolder, dtype=dtype, **_model_placement(device)
            )
            pipes["fill"] = FluxFillPipeline(**shared, transformer=fill_transformer)
        if "controlnet" in spec.modes:
            log.info("loading ControlNet from %s", controlnet_path)
            controlnet = FluxControlNetModel.from_pretrained(controlnet_path, dtype=dtype, **_model_placement(device))
            pipes["controlnet"] = FluxControlNetPipeline(**shared, transformer=base.transformer, controlnet=controlnet)
            pipes["controlnet_img2img"] = FluxControlNetImg2ImgPipeline(
                **shared, transformer=base.transformer, controlnet=controlnet
            )
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        modes = tuple(mode for mode in spec.modes if mode in pipes)
        return cls(device=device, modes=modes, pipes=pipes, embedded=embedded)

    def run(self, job: JobRequest, on_step: StepCallback) -> JobOutput:
        """Run one job; ``on_step`` may raise to stop the denoising loop at once."""
        pipe_name, kwargs = self._arguments(job)
        pipe = self._pipes[pipe_name]

        def step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            # Raising here (rather than setting pipe._interrupt) leaves the loop at once and also skips the
            # VAE decode of a picture nobody will receive.
            on_step(step + 1, int(getattr(pipeline, "num_timesteps", 0) or job.num_inference_steps))
            return callback_kwargs

        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        began = time.perf_counter()
        with torch.inference_mode():
            image = pipe(
                prompt=job.prompt,
                width=job.width,
                height=job.height,
                num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale,
                generator=generator,
                callback_on_step_end=step_end,
                output_type="pil",
                **kwargs,
            ).images[0]
        pipeline_s = time.perf_counter() - began
        png = encode_png(image)
        write_atomically(Path(job.output_path), png)
        return JobOutput(
            image_bytes=len(png),
            width=image.width,
            height=image.height,
            pipeline_s=pipeline_s,
            encode_s=time.perf_counter() - began - pipeline_s,
        )

    def _arguments(self, job: JobRequest) -> tuple[str, dict[str, Any]]:
        """Which pipeline runs the job, and the mode-specific keyword arguments."""
        if job.mode == "text2img":
            return "text2img", {}
        if job.mode == "img2img":
            assert job.input_image is not None
            return "img2img", {"image": image_file_to_pil(job.input_image), "strength": job.strength}
        if job.mode == "fill":
            assert job.input_image is not None and job.mask_image is not None
            return "fill", {
                "image": image_file_to_pil(job.input_image),
                "mask_image": image_file_to_pil(job.mask_image),
            }
        assert job.control_image is not None
        kwargs: dict[str, Any] = {
            "control_image": image_file_to_pil(job.control_image),
            "controlnet_conditioning_scale": job.controlnet_conditioning_scale,
        }
        union = getattr(self._pipes["controlnet"].controlnet.config, "num_mode", None)
        kwargs["control_mode"] = job.control_mode if union else None
        if job.input_image is not None:
            kwargs.update(image=image_file_to_pil(job.input_image), strength=job.strength)
            return "controlnet_img2img", kwargs
        return "controlnet", kwargs

    def device_memory_mb(self) -> float:
        """Device memory held by tensors once loaded (0 on a CPU device)."""
        if not self.device.startswith("cuda"):
            return 0.0
        return torch.cuda.memory_allocated(torch.device(self.device)) / 2**20

    def free_memory(self) -> None:
        """After an out-of-memory failure: drop what the failed job left behind, give cached blocks back."""
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
