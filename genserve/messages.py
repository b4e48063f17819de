"""Every message that crosses the API-process / worker-process boundary.

Each is a frozen dataclass sent whole over the worker's duplex ``multiprocessing`` pipe (pickled). Errors cross as
a type name plus a message, never as pickled exceptions (a CUDA exception may not unpickle in the other process);
input images cross as raw pixel bytes, never as PIL objects; output images cross as a file path (the worker
writes the PNG into the result store itself).

Direction:  API → worker: WorkerSpec (at spawn), JobRequest, CancelJob, Shutdown.
            worker → API: WorkerReady, WorkerStartupFailed, Heartbeat, JobStarted, JobProgress, JobResult, JobFailure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["text2img", "img2img", "fill", "controlnet"]
ALL_MODES: tuple[Mode, ...] = ("text2img", "img2img", "fill", "controlnet")


@dataclass(frozen=True)
class RawImage:
    """Decoded, validated pixels, already resized to the job's output size by the API process."""

    width: int  # pixels
    height: int  # pixels
    mode: Literal["RGB", "L"]  # PIL mode: RGB for pictures, L (8-bit grey) for masks
    data: bytes  # row-major pixel bytes, width * height * channels long


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to start; passed as the spawn target's argument."""

    slot: int  # index of the worker in the pool; a respawn reuses it
    device: str  # "cuda:N" or "cpu"
    model_path: str  # diffusers FluxPipeline folder (the embedded model's when none is configured)
    fill_path: str  # Fill transformer folder, "" when fill is disabled
    controlnet_path: str  # ControlNet folder, "" when controlnet is disabled
    embedded_cache_dir: str  # where to build the embedded model; "" when a real model is configured
    modes: tuple[Mode, ...]  # modes to load and serve
    dtype: str  # "auto", "bfloat16", "float16" or "float32"
    cpu_threads: int  # torch threads on a CPU device; 0 leaves torch's default
    heartbeat_interval_s: float  # how often to send Heartbeat
    max_consecutive_oom: int  # out-of-memory failures in a row after which the worker exits to restart clean
    log_level: str  # logging level name for the worker's own log lines


@dataclass(frozen=True)
class JobRequest:
    """One generation job, fully validated by the API process: the worker trusts every field."""

    job_id: str  # task id the client sees
    mode: Mode  # which pipeline runs it
    prompt: str  # text prompt, non-empty
    width: int  # output width, a multiple of 16
    height: int  # output height, a multiple of 16
    num_inference_steps: int  # denoising steps
    guidance_scale: float  # FLUX guidance (GenServe's cfg)
    seed: int  # 0 .. 2**63-1; the API resolves -1 to a random seed before sending
    strength: float  # img2img / ControlNet img2img strength, 0 < strength <= 1
    input_image: RawImage | None  # img2img, fill, ControlNet img2img
    mask_image: RawImage | None  # fill: white = repaint
    control_image: RawImage | None  # controlnet conditioning image
    control_mode: int | None  # union ControlNet mode index; None for a single-type ControlNet
    controlnet_conditioning_scale: float  # weight of the ControlNet residuals
    output_path: str  # where the worker writes the PNG (atomically); the API process never holds image bytes


@dataclass(frozen=True)
class CancelJob:
    """Stop job_id at its next denoising step (ignored if the worker runs another job by then)."""

    job_id: str  # the job to stop


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more: exit after the current step."""

    reason: str  # logged by the worker


@dataclass(frozen=True)
class WorkerReady:
    """All enabled pipelines are loaded; the worker takes jobs from now on."""

    slot: int  # pool index
    pid: int  # worker process id
    device: str  # device the pipelines live on
    modes: tuple[Mode, ...]  # modes actually loaded
    embedded_model: bool  # True when serving the random-weight test model
    load_time_s: float  # seconds from process start to ready


@dataclass(frozen=True)
class WorkerStartupFailed:
    """Loading failed (bad model path, missing files …); the worker exits right after sending this."""

    slot: int  # pool index
    error_type: str  # exception class name
    message: str  # exception text


@dataclass(frozen=True)
class Heartbeat:
    """Sent every heartbeat_interval_s from a thread of its own, busy or idle: silence means a hang or death."""

    slot: int  # pool index
    sent_at: float  # worker's time.time()


@dataclass(frozen=True)
class JobStarted:
    """The worker took job_id off its pipe and begins it."""

    job_id: str  # the job
    started_at: float  # worker's time.time() when it began


@dataclass(frozen=True)
class JobProgress:
    """One denoising step finished."""

    job_id: str  # the job
    step: int  # steps done so far, 1-based
    total_steps: int  # steps the pipeline will run (img2img runs fewer than asked, by strength)
    elapsed_s: float  # seconds since the job started on the worker


@dataclass(frozen=True)
class JobResult:
    """The job finished; the worker has written the PNG to the job's output_path."""

    job_id: str  # the job
    image_path: str  # the PNG file (the job's output_path)
    image_bytes: int  # its size
    width: int  # output width
    height: int  # output height
    seed: int  # seed used
    started_at: float  # worker's time.time() when the job began
    pipeline_s: float  # seconds inside the diffusers pipeline call
    encode_s: float  # seconds to encode and write the PNG


@dataclass(frozen=True)
class JobFailure:
    """The job did not produce an image; the worker itself is fine and takes the next job."""

    job_id: str  # the job
    error_type: str  # "canceled", "out_of_memory", or the exception class name
    message: str  # human-readable reason


# Exit code of a worker that left on purpose after workers.max_consecutive_oom out-of-memory failures in a row.
EXIT_AFTER_OOM = 75  # EX_TEMPFAIL

WorkerInbound = JobRequest | CancelJob | Shutdown
WorkerOutbound = WorkerReady | WorkerStartupFailed | Heartbeat | JobStarted | JobProgress | JobResult | JobFailure
