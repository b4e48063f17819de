"""Pipeline loading and execution inside a worker process.

First the memory plan (genserve.memory_plan: from the folders' configs and the device's free memory, before a byte
of weights is read), then every model is loaded as planned (workers.loading: quantised, on the GPU or the host).
All pipelines are built once and kept for the worker's life, sharing those models:
- text2img: ``FluxPipeline`` over the base folder's models;
- img2img: ``FluxImg2ImgPipeline`` over the base's own modules (no extra memory);
- fill: ``FluxFillPipeline`` with the FLUX.1-Fill transformer, sharing the base's text encoders and VAE;
- controlnet: ``FluxControlNetPipeline`` over the base's modules plus the ControlNet, and the ControlNet img2img
  variant used when a job also carries an input image.
The embedded random-weight model goes through exactly the same ``from_pretrained`` code as real FLUX.1-dev.
Prompts are encoded by the worker (``encode_prompt``, where the text encoders live) and the pipelines get the
embeddings: the same call the pipeline would make, so text encoders kept on the CPU cost nothing else.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from genserve.images import image_file_to_pil
from genserve.library_noise import quiet_library_noise
from genserve.memory_plan import (
    TORCH_DTYPE_NAMES,
    component_folders,
    cpu_device_info,
    cuda_device_info,
    describe,
    one_line,
    plan_memory,
    shapes_from_folders,
)
from genserve.messages import AdaptersChanged, FailureKind, ImageFile, JobRequest, MemoryPlan, Mode, WorkerSpec
from workers.adapters import Adapters
from workers.loading import ModelPaths, Offloader, execution_device, load_models
from workers.redux import ReduxEncoder, load_redux
from workers.speed import WARMUP_STEPS, CompileStats, Speed

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass(frozen=True)
class JobOutput:
    """What a pipeline call gives back: the decoded image, not yet encoded (workers.encoder encodes and writes it)."""

    image: Image.Image  # the job's output, on the host
    pipeline_s: float  # seconds inside the pipeline call (prompt encoding, denoising, VAE decode)


def _redux_device(plan: MemoryPlan, device: str) -> str:
    """Where the Redux image models run: with the text encoders (their component follows them in the plan)."""
    placement = {component.name: component.placement for component in plan.components}.get("redux_image_encoder")
    return device if placement in (None, "device") else "cpu"


def _per_image(file: ImageFile, batch: int) -> Image.Image | list[Image.Image]:
    """The input picture, once per image of a batch: the pipelines then encode it with each image's own generator
    (the VAE samples its latent), as a job alone would, instead of drawing every image's from the first seed; and
    ControlNet img2img does not repeat a single control image to the batch itself."""
    picture = image_file_to_pil(file)
    return picture if batch == 1 else [picture] * batch


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


class MemoryPlanRefusedError(Exception):
    """The models do not fit this device (or it cannot run what the config asks); retrying cannot help."""

    def __init__(self, plan: MemoryPlan) -> None:
        super().__init__(f"{plan.device}: the models do not fit: {one_line(plan)}\n{describe(plan)}")
        self.plan = plan


def _model_paths(spec: WorkerSpec) -> tuple[ModelPaths, bool]:
    """The folders to load (the embedded model's, built here on first use, when none is configured)."""
    if spec.model_path:
        fill = Path(spec.fill_path) if "fill" in spec.modes and spec.fill_path else None
        controlnet = Path(spec.controlnet_path) if "controlnet" in spec.modes and spec.controlnet_path else None
        redux = Path(spec.redux_path) if "redux" in spec.modes and spec.redux_path else None
        return ModelPaths(base=Path(spec.model_path), fill=fill, controlnet=controlnet, redux=redux), False
    from workers.embedded import ensure_embedded_model

    built = ensure_embedded_model(Path(spec.embedded_cache_dir))
    log.warning(
        "serving the EMBEDDED RANDOM-WEIGHT TEST MODEL from %s: images are noise. "
        "Set model.path to a FLUX.1-dev folder for real images.",
        built.base,
    )
    return (
        ModelPaths(
            base=built.base,
            fill=built.fill if "fill" in spec.modes else None,
            controlnet=built.controlnet if "controlnet" in spec.modes else None,
            redux=built.redux if "redux" in spec.modes else None,
        ),
        True,
    )


def make_plan(spec: WorkerSpec, paths: ModelPaths, dtype: torch.dtype) -> MemoryPlan:
    """The worker's memory plan, from its folders' configs and its device's free memory (no weight read)."""
    folders = component_folders(paths.base, paths.fill, paths.controlnet, redux_path=paths.redux)
    shapes = shapes_from_folders(folders)
    if spec.device.startswith("cuda"):
        device = cuda_device_info(spec.device, spec.memory.device_memory_gb)
    else:
        device = cpu_device_info(spec.memory.device_memory_gb)
    return plan_memory(spec.memory, shapes, device, TORCH_DTYPE_NAMES[str(dtype).removeprefix("torch.")])


class PipelineSet:
    """Every enabled pipeline of one worker, on one device."""

    def __init__(
        self,
        device: str,
        modes: tuple[Mode, ...],
        pipes: dict[str, Any],
        embedded: bool,
        plan: MemoryPlan,
        offloader: Offloader,
        speed: Speed,
        adapters: Adapters,
        redux: ReduxEncoder | None = None,
    ) -> None:
        self.device = device
        self.modes = modes
        self.embedded = embedded
        self.plan = plan
        self._pipes = pipes
        self._offloader = offloader
        self._speed = speed
        self._adapters = adapters
        self._redux = redux
        self.compile_stats = CompileStats(warmup_s=0.0, cache_hits=0, cache_misses=0)

    @classmethod
    def load(
        cls,
        spec: WorkerSpec,
        on_plan: Callable[[MemoryPlan], None],
        on_adapters: Callable[[AdaptersChanged], None] = lambda change: None,
    ) -> PipelineSet:
        """Plan, then load every enabled pipeline as planned; ``on_plan`` hears the plan before any weight loads,
        ``on_adapters`` each change of the LoRA adapters held.

        Raises MemoryPlanRefusedError when the plan does not fit."""
        quiet_library_noise()
        from diffusers import (
            FluxControlNetImg2ImgPipeline,
            FluxControlNetPipeline,
            FluxFillPipeline,
            FluxImg2ImgPipeline,
        )
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        device = spec.device
        if device == "cpu" and spec.cpu_threads:
            torch.set_num_threads(spec.cpu_threads)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dtype = resolve_dtype(spec.dtype, device)
        paths, embedded = _model_paths(spec)
        plan = make_plan(spec, paths, dtype)
        on_plan(plan)
        if not plan.fits:
            raise MemoryPlanRefusedError(plan)
        log.info("%s", describe(plan))

        # Fusing a quantised transformer drops its separate q/k/v, which LoRAs adapt: only without LoRAs.
        fuse_quantised = spec.performance.fuse_qkv and not spec.loras.enabled
        models = load_models(paths, plan, device, dtype, fuse_qkv=fuse_quantised)
        base = models.base
        pipes: dict[str, Any] = {"text2img": base}
        # The other pipelines are built from the base's very modules (no copy, no cast): cheaper than from_pipe,
        # which walks and casts every shared module again for each pipeline it makes. A quantised transformer is
        # shared quantised.
        shared = {name: getattr(base, name) for name in _SHARED_COMPONENTS}
        if "img2img" in spec.modes:
            pipes["img2img"] = FluxImg2ImgPipeline(**shared, transformer=base.transformer)
        if models.fill_transformer is not None:
            pipes["fill"] = FluxFillPipeline(**shared, transformer=models.fill_transformer)
        if models.controlnet is not None:
            controlnet = models.controlnet
            pipes["controlnet"] = FluxControlNetPipeline(**shared, transformer=base.transformer, controlnet=controlnet)
            pipes["controlnet_img2img"] = FluxControlNetImg2ImgPipeline(
                **shared, transformer=base.transformer, controlnet=controlnet
            )
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        redux = None
        if paths.redux is not None:
            # Redux makes the prompt embeddings; the base pipeline denoises with them (no pipeline of its own).
            redux = load_redux(paths.redux, base, _redux_device(plan, device), dtype)
            pipes["redux"] = base
        by_name = {
            "text_encoder": base.text_encoder,
            "text_encoder_2": base.text_encoder_2,
            "vae": base.vae,
            "transformer": base.transformer,
            "fill": models.fill_transformer,
            "controlnet": models.controlnet,
        }
        # Fusing and compiling come before the offload hooks: group offloading must see the final parameters.
        speed = Speed(spec.performance, device, plan)
        speed.apply(by_name)
        offloader = Offloader(plan, device, spec.memory.group_offload_blocks)
        offloader.install(by_name)
        modes = tuple(mode for mode in spec.modes if mode in pipes)
        adapters = Adapters(pipes, spec.loras, on_adapters, spec.slot)
        pipelines = cls(
            redux=redux,
            device=device,
            modes=modes,
            pipes=pipes,
            embedded=embedded,
            plan=plan,
            offloader=offloader,
            speed=speed,
            adapters=adapters,
        )
        pipelines.compile_stats = speed.warm_up(pipelines.warm_up_job, pipelines.warm_up_pipelines())
        return pipelines

    @property
    def attention(self) -> str:
        return self._speed.attention

    def warm_up_pipelines(self) -> list[str]:
        """One pipeline per distinct compiled graph set: ControlNet img2img shares the ControlNet's."""
        return [name for name in ("text2img", "img2img", "fill", "controlnet", "redux") if name in self._pipes]

    def warm_up_job(self, pipeline: str, width: int, height: int) -> None:
        """A two-step job of ``pipeline``'s mode at width x height on grey inputs, through the normal job path."""
        with tempfile.TemporaryDirectory(prefix="genserve-warmup-") as folder:
            grey = Path(folder) / "grey.raw"
            grey.write_bytes(bytes([128]) * (width * height * 3))
            white = Path(folder) / "mask.raw"
            white.write_bytes(bytes([255]) * (width * height))
            picture = ImageFile(path=str(grey), width=width, height=height, mode="RGB")
            mask = ImageFile(path=str(white), width=width, height=height, mode="L")
            job = JobRequest(
                job_id=f"warm-up-{pipeline}-{width}x{height}",
                mode=pipeline,  # type: ignore[arg-type]  # the four warm-up pipelines are named as their modes
                prompt="warm-up",
                width=width,
                height=height,
                num_inference_steps=WARMUP_STEPS,
                guidance_scale=3.5,
                seed=0,
                strength=1.0,
                input_image=picture if pipeline in ("img2img", "fill", "redux") else None,
                mask_image=mask if pipeline == "fill" else None,
                control_image=picture if pipeline == "controlnet" else None,
                control_mode=0,
                controlnet_conditioning_scale=0.7,
                output_path=str(Path(folder) / "out.png"),
            )
            self.run([job], lambda step, total: None)

    def run(self, jobs: Sequence[JobRequest], on_step: StepCallback) -> list[JobOutput]:
        """Run one job, or the images of one request as one batched call (a JobBatch: the jobs differ only in seed
        and output); one output per job, in order. ``on_step`` may raise to stop the denoising loop at once.

        A batch encodes the prompt once and denoises one latent per job, each drawn from its own seed's generator,
        so each image is the one its seed gives alone (up to the rounding of a batched matmul)."""
        first = jobs[0]
        pipe_name, kwargs = self._arguments(first, len(jobs))
        pipe = self._pipes[pipe_name]

        def step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            # Raising here (rather than setting pipe._interrupt) leaves the loop at once and also skips the
            # VAE decode of a picture nobody will receive.
            on_step(step + 1, int(getattr(pipeline, "num_timesteps", 0) or first.num_inference_steps))
            return callback_kwargs

        generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in jobs]
        began = time.perf_counter()
        self._offloader.before_job(pipe)
        self._speed.before_job(first.width, first.height, pipe_name, len(jobs))
        self._adapters.activate(first.mode, first.loras)
        with torch.inference_mode():
            prompt_embeds, pooled_prompt_embeds = self._embeddings(pipe, first, len(jobs))
            images = pipe(
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                width=first.width,
                height=first.height,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                generator=generators[0] if len(jobs) == 1 else generators,
                callback_on_step_end=step_end,
                output_type="pil",
                **kwargs,
            ).images
        pipeline_s = time.perf_counter() - began
        return [JobOutput(image=image, pipeline_s=pipeline_s) for image in images]

    def _embeddings(self, pipe: Any, job: JobRequest, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the transformer is conditioned on: the prompt's embeddings, or (redux) the input image's."""
        if job.mode != "redux":
            return self._encode_prompt(pipe, job.prompt, copies)
        assert self._redux is not None and job.input_image is not None
        prompt_embeds, pooled = self._redux.encode(
            image_file_to_pil(job.input_image),
            job.prompt,
            job.prompt_embeds_scale,
            job.pooled_prompt_embeds_scale,
            copies=copies,
        )
        target, dtype = execution_device(pipe), pipe.transformer.dtype
        return prompt_embeds.to(target, dtype), pooled.to(target, dtype)

    def _encode_prompt(self, pipe: Any, prompt: str, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 and CLIP embeddings of the prompt, computed once where the text encoders live, moved to where the job
        runs and repeated for each image of a batch (the same encode_prompt call the pipeline would make itself;
        diffusers' Flux pipelines do not repeat embeddings that are passed in, so num_images_per_prompt cannot)."""
        prompt_embeds, pooled_prompt_embeds, _text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self._offloader.encode_device(pipe), max_sequence_length=512
        )
        target = execution_device(pipe)
        dtype = pipe.transformer.dtype
        return (
            prompt_embeds.to(target, dtype).repeat(copies, 1, 1),
            pooled_prompt_embeds.to(target, dtype).repeat(copies, 1),
        )

    def _arguments(self, job: JobRequest, batch: int) -> tuple[str, dict[str, Any]]:
        """Which pipeline runs the job (or a batch of ``batch`` like it), and the mode-specific keyword arguments."""
        if job.mode in ("text2img", "redux"):  # redux: the base pipeline, on the image's embeddings
            return job.mode, {}
        if job.mode == "img2img":
            assert job.input_image is not None
            return "img2img", {"image": _per_image(job.input_image, batch), "strength": job.strength}
        if job.mode == "fill":
            assert job.input_image is not None and job.mask_image is not None
            return "fill", {
                "image": _per_image(job.input_image, batch),
                "mask_image": _per_image(job.mask_image, batch),
            }
        assert job.control_image is not None
        kwargs: dict[str, Any] = {
            "control_image": _per_image(job.control_image, batch),
            "controlnet_conditioning_scale": job.controlnet_conditioning_scale,
        }
        union = getattr(self._pipes["controlnet"].controlnet.config, "num_mode", None)
        kwargs["control_mode"] = job.control_mode if union else None
        if job.input_image is not None:
            kwargs.update(image=_per_image(job.input_image, batch), strength=job.strength)
            if union and batch > 1:  # this pipeline, unlike the other, does not repeat the mode over the batch
                kwargs["control_mode"] = [job.control_mode] * batch
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
