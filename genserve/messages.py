"""Every message that crosses the API-process / worker-process boundary.

Each is a frozen dataclass sent whole over the worker's duplex ``multiprocessing`` pipe (pickled), and every one is
small: input images never ride the pipe (the API process writes their pixels to files in the job's input folder
and the message names the files), output images neither (the worker writes the PNG into the result store and
reports its path). Errors cross as an outcome enum, a type name and a message, never as pickled exceptions (a CUDA
exception may not unpickle in the other process).

Direction:  API → worker: WorkerSpec (at spawn), then WorkerInbound: JobRequest, JobBatch, CancelJob, Shutdown.
            worker → API: WorkerOutbound: WorkerPlanned, WorkerReady, WorkerStartupFailed, AdaptersChanged,
            Heartbeat, JobStarted, JobProgress, JobDenoised, JobResult, JobFailure.
Both ends dispatch on the unions with ``match`` and ``assert_never``, so mypy flags a message nobody handles.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Mode = Literal["text2img", "img2img", "fill", "controlnet", "redux"]
ALL_MODES: tuple[Mode, ...] = ("text2img", "img2img", "fill", "controlnet", "redux")


class FailureKind(StrEnum):
    """Why a worker reports a job without an image; decides what the supervisor does with the job and the slot."""

    CANCELED = "canceled"  # stopped at a step because CancelJob (or Shutdown) arrived
    OUT_OF_MEMORY = "out_of_memory"  # device or host memory ran out; the worker frees its cache and serves on
    DEVICE_FATAL = "device_error"  # the device context is poisoned (illegal access, device assert): worker exits
    ERROR = "error"  # the pipeline raised; the worker is fine and takes the next job


class CancelReason(StrEnum):
    """Why a job was asked to stop; the value is what clients read in ``cancel_reason``."""

    CLIENT = "canceled by client"  # POST /jobs/{id}/cancel or DELETE /jobs/{id}
    DISCONNECTED = "client disconnected"  # a sync client hung up while its job still waited (queue.cancel_abandoned)
    ABANDONED = "request abandoned"  # the request task itself was cancelled (server-side)
    SIBLING_FAILED = "another image of the same request failed"  # n > 1: no partial answers
    TIMEOUT = "timeout"  # its deadline passed: it ends failed (408), not canceled
    SHUTDOWN = "service shutting down"  # the grace period ran out while it ran: it ends failed (503)


@dataclass(frozen=True)
class ImageFile:
    """Decoded, validated pixels the API process wrote for the worker, already resized to the job's output size."""

    path: str  # raw row-major pixel bytes, width * height * channels long (the job's input folder)
    width: int  # pixels
    height: int  # pixels
    mode: Literal["RGB", "L"]  # PIL mode: RGB for pictures, L (8-bit grey) for masks


Quantization = Literal["none", "fp8", "int8", "nf4"]
QUANTIZABLE = ("transformer", "fill", "controlnet", "text_encoder_2")  # components memory.quantize can name
Offload = Literal["none", "text_encoders", "model", "group"]
OFFLOAD_ORDER: tuple[Offload, ...] = ("none", "text_encoders", "model", "group")  # least to most memory saved
Strategy = Literal["auto", "pinned", "quantized", "offload"]


@dataclass(frozen=True)
class MemorySettings:
    """The operator's memory section, as the worker's planner needs it (see genserve.memory_plan)."""

    strategy: Strategy  # auto walks the ladder; the others take exactly one setting or refuse to start
    quantize: tuple[tuple[str, Quantization], ...]  # (component, quantization) for each of QUANTIZABLE
    offload: Offload  # the least offload to use
    auto_quantization: Literal["auto", "fp8", "int8", "nf4"]  # what the ladder quantises with; auto: fp8 or int8
    reserve_gb: float  # activation reserve; 0: computed for the largest allowed size
    device_memory_gb: float  # memory to plan against; 0: what the device reports free
    max_width: int  # largest output the service accepts (limits.max_size): sizes the activation reserve
    max_height: int
    vae_tiling_above: int  # images larger than this squared decode in tiles (performance.vae_tiling_above); 0: never
    group_offload_blocks: int  # transformer blocks per group under group offload

    def quantization_of(self, component: str) -> Quantization:
        return dict(self.quantize).get(component, "none")


Compile = Literal["off", "transformer", "all"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs", "max-autotune"]
Attention = Literal["native", "flash", "flash3", "sage", "auto"]


@dataclass(frozen=True)
class PerformanceSettings:
    """The operator's performance section, as the worker applies it after loading (workers/speed.py)."""

    compile: Compile  # torch.compile: nothing, the transformers (base, Fill, ControlNet), or those and the VAE decoder
    compile_mode: CompileMode  # torch.compile's mode
    compile_cache_dir: str  # inductor's on-disk caches, shared by every worker start (a respawn reuses them)
    warmup_sizes: tuple[tuple[int, int], ...]  # (width, height) run once per mode before ready, so no request compiles
    attention: Attention  # diffusers' attention backend; auto picks the fastest available on the device
    fuse_qkv: bool  # fuse q/k/v projections into one matmul (fp8/int8 transformers before quantising; nf4 never)
    channels_last_vae: bool  # the VAE in channels-last memory format (CUDA)
    vae_tiling_above: int  # decode in tiles when width x height exceeds this squared (pixels); 0: never
    overlap_encoding: bool  # encode and write each PNG on a thread while the next job denoises


@dataclass(frozen=True)
class ComponentPlan:
    """One model of the worker, as the memory plan places it."""

    name: str  # transformer, fill, controlnet, text_encoder, text_encoder_2, vae
    params: int  # parameters
    precision: str  # bf16, fp16, fp32, or the quantisation: int8, fp8, nf4
    # device: pinned on the worker's device; cpu: kept and run on the host (text encoders); offload: kept on the host,
    # moved whole to the device while it runs (model CPU offload); group: streamed to the device block group by group
    placement: Literal["device", "cpu", "offload", "group"]
    bytes: int  # its weights' bytes at that precision


@dataclass(frozen=True)
class MemoryPlan:
    """How a worker fits its models on its device; made before a byte is loaded, shown in /status and /models."""

    device: str  # cuda:N or cpu
    strategy: Strategy  # what the operator asked for
    setting: str  # the rung taken (auto) or the setting asked for, in words
    fits: bool  # False: the worker refuses to load (the plan is its error)
    quantize: tuple[tuple[str, Quantization], ...]  # effective quantisation per component
    offload: Offload  # effective offload
    components: tuple[ComponentPlan, ...]  # every enabled model
    device_bytes: int  # peak device memory the plan needs: resident weights + reserve
    reserve_bytes: int  # of which: activations of the largest allowed size, workspace, allocator slack
    device_available_bytes: int  # what the device had free (or workers.device_memory_gb)
    host_bytes: int  # host memory for weights kept on the CPU (0 when everything is on the device)
    host_available_bytes: int  # host memory available when planned (0: not checked)
    note: str  # why it does not fit and what would, or ""

    def as_dict(self) -> dict[str, object]:
        gib = 2**30
        return {
            "device": self.device,
            "strategy": self.strategy,
            "setting": self.setting,
            "fits": self.fits,
            "quantize": dict(self.quantize),
            "offload": self.offload,
            "device_gib": round(self.device_bytes / gib, 2),
            "reserve_gib": round(self.reserve_bytes / gib, 2),
            "device_available_gib": round(self.device_available_bytes / gib, 2),
            "host_gib": round(self.host_bytes / gib, 2),
            "host_available_gib": round(self.host_available_bytes / gib, 2) if self.host_available_bytes else None,
            "components": [
                {
                    "name": c.name,
                    "params_m": round(c.params / 1e6, 1),
                    "precision": c.precision,
                    "placement": c.placement,
                    "gib": round(c.bytes / gib, 3),
                    "bytes": c.bytes,
                }
                for c in self.components
            ],
            "note": self.note or None,
        }


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to start; passed as the process target's argument."""

    slot: int  # index of the worker in the pool; a respawn reuses it
    api_pid: int  # the API process: a worker whose API process is gone exits (no orphan holds GPU memory)
    device: str  # "cuda:N" or "cpu"
    model_path: str  # diffusers FluxPipeline folder (the embedded model's when none is configured)
    fill_path: str  # Fill transformer folder, "" when fill is disabled
    controlnet_path: str  # ControlNet folder, "" when controlnet is disabled
    redux_path: str  # FLUX.1-Redux folder (image_encoder, feature_extractor, image_embedder), "" when redux is off
    embedded_cache_dir: str  # where to build the embedded model; "" when a real model is configured
    modes: tuple[Mode, ...]  # modes to load and serve
    dtype: str  # "auto", "bfloat16", "float16" or "float32"
    memory: MemorySettings  # how to fit the models on the device (planned before loading)
    performance: PerformanceSettings  # compile, attention, fusions and VAE tiling, applied after loading
    loras: LoraSettings  # per-request LoRA adapters
    cpu_threads: int  # torch threads on a CPU device; 0 leaves torch's default
    heartbeat_interval_s: float  # how often to send Heartbeat
    max_consecutive_oom: int  # out-of-memory failures in a row after which the worker exits to restart clean
    log_level: str  # logging level name for the worker's own log lines
    log_format: str = "text"  # text | json (server.log_format), as the API process's lines


@dataclass(frozen=True)
class LoraUse:
    """One LoRA a job applies: a file of the catalogue, checked to fit the mode's transformer by the API process."""

    name: str  # catalogue name
    path: str  # its .safetensors file
    version: str  # "size:mtime_ns" of that file when the job was made: a re-uploaded LoRA is loaded again
    weight: float  # adapter weight, within ±loras.max_weight

    @property
    def key(self) -> str:
        """What a worker holds it as (the affinity key): a LoRA replaced under the same name is another one."""
        return f"{self.name}@{self.version}"


def adapter_target(mode: Mode) -> Literal["base", "fill"]:
    """The transformer a mode's LoRAs go into: Fill has its own; every other mode runs the base transformer."""
    return "fill" if mode == "fill" else "base"


def adapter_key(mode: Mode, lora: LoraUse) -> str:
    """What a worker reports holding once ``lora`` is loaded for ``mode`` (see AdaptersChanged)."""
    return f"{adapter_target(mode)}/{lora.key}"


@dataclass(frozen=True)
class LoraSettings:
    """The operator's loras section, as the worker needs it."""

    enabled: bool  # False: no adapter is ever loaded, and quantised transformers may be fused before quantising
    max_loaded: int  # adapters a worker keeps loaded; beyond it the least recently used is unloaded


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
    input_image: ImageFile | None  # img2img, fill, ControlNet img2img
    mask_image: ImageFile | None  # fill: white = repaint
    control_image: ImageFile | None  # controlnet conditioning image
    control_mode: int | None  # union ControlNet mode index; None for a single-type ControlNet
    controlnet_conditioning_scale: float  # weight of the ControlNet residuals
    output_path: str  # where the worker writes the PNG (atomically); the API process never holds image bytes
    loras: tuple[LoraUse, ...] = ()  # adapters to apply, in order; none: the base model (LoRAs off)
    parameters: str = ""  # written into the PNG's "parameters" text chunk; "" writes none (results.embed_parameters)
    prompt_embeds_scale: float = 1.0  # redux: scales the embeddings (image tokens and the prompt's, if any)
    pooled_prompt_embeds_scale: float = 1.0  # redux: scales the pooled embedding
    request_id: str = ""  # X-Request-ID of the submitting request: the worker's log lines for this job carry it


@dataclass(frozen=True)
class JobBatch:
    """Several images of one request (n / num_images) run as one batched pipeline call: the prompt is encoded once
    and the denoising runs on a batch of latents, one per job, each from its own seed.

    The jobs differ only in job_id, seed, output_path and their (identical) input files. Each is still reported on
    its own (JobStarted, JobProgress, JobDenoised, JobResult or JobFailure per job id), and CancelJob stops just that
    one: it is answered canceled at the next step while the others go on (the call stops when none is left)."""

    jobs: tuple[JobRequest, ...]  # two or more; the first one's prompt, size, steps and inputs are the batch's


@dataclass(frozen=True)
class CancelJob:
    """Stop job_id at its next denoising step (ignored if the worker runs another job by then)."""

    job_id: str  # the job to stop


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more: stop the current job at its next step, then exit (the service is stopping)."""

    reason: str  # logged by the worker


@dataclass(frozen=True)
class WorkerPlanned:
    """The worker made its memory plan (before loading a byte); a plan that does not fit is followed by
    WorkerStartupFailed with permanent=True."""

    slot: int  # pool index
    plan: MemoryPlan  # the plan


@dataclass(frozen=True)
class WorkerReady:
    """All enabled pipelines are loaded; the worker takes jobs from now on."""

    slot: int  # pool index
    pid: int  # worker process id
    device: str  # device the pipelines live on
    modes: tuple[Mode, ...]  # modes actually loaded
    embedded_model: bool  # True when serving the random-weight test model
    load_time_s: float  # seconds from process start to ready
    peak_rss_mb: float  # the worker's peak resident host memory while loading (MiB)
    device_memory_mb: float  # device memory its tensors hold once loaded (MiB; 0 on a CPU device)
    attention: str  # the attention backend in use (diffusers' name)
    warmup_s: float  # seconds of warm-up jobs before ready (compiling, or loading compiled kernels)
    compile_cache_hits: int  # compiled graphs loaded from inductor's on-disk cache during warm-up
    compile_cache_misses: int  # graphs compiled from scratch (a respawn with a warm cache has none)


@dataclass(frozen=True)
class WorkerStartupFailed:
    """Loading failed (bad model path, missing files …); the worker exits right after sending this."""

    slot: int  # pool index
    error_type: str  # exception class name
    message: str  # exception text
    permanent: bool = False  # True: retrying cannot help (the models do not fit, the hardware cannot do what the
    # config asks): the slot is not respawned, so a worker never reloads tens of GB in a loop for nothing


@dataclass(frozen=True)
class AdaptersChanged:
    """The worker loaded (or unloaded) LoRA adapters for a job: what it holds now. Sent before that job's first step,
    so the supervisor's affinity sees it by the time the job ends."""

    slot: int  # pool index
    held: tuple[str, ...]  # LoraUse.key of each adapter loaded, least recently used first
    loads: int  # adapters loaded since the worker started
    unloads: int  # adapters unloaded (least recently used, past loras.max_loaded) since it started
    adapter_bytes: int  # memory the held adapters' weights take


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
class JobDenoised:
    """The pipeline call of job_id returned (performance.overlap_encoding): its image waits for the worker's encoder
    thread, and the worker's main loop is free for the next job. JobResult (or JobFailure) follows for this job,
    and from now on CancelJob no longer stops it."""

    job_id: str  # the job
    pipeline_s: float  # seconds inside the diffusers pipeline call


@dataclass(frozen=True)
class JobResult:
    """The job finished; the worker has written the PNG to the job's output_path. Sent by the main loop, or by the
    encoder thread after JobDenoised (in the order the jobs were denoised)."""

    job_id: str  # the job
    image_path: str  # the PNG file (the job's output_path)
    image_bytes: int  # its size
    width: int  # output width
    height: int  # output height
    seed: int  # seed used
    started_at: float  # worker's time.time() when the job began
    pipeline_s: float  # seconds inside the diffusers pipeline call
    encode_s: float  # seconds to encode and write the PNG
    batch_size: int = 1  # images the pipeline call made together (a JobBatch); pipeline_s is that whole call's


@dataclass(frozen=True)
class JobFailure:
    """The job did not produce an image. After DEVICE_FATAL the worker exits; otherwise it takes the next job.

    After JobDenoised only the encoder sends one for that job: its PNG could not be encoded or written (ERROR, or
    OUT_OF_MEMORY for host memory)."""

    job_id: str  # the job
    kind: FailureKind  # what sort of failure: decides the job's error and the slot's fate
    error_type: str  # the exception's class name (or "canceled"), for the log and the client's message
    message: str  # human-readable reason


# Exit codes of a worker that left on purpose (the supervisor names the reason in /status).
EXIT_AFTER_OOM = 75  # EX_TEMPFAIL: workers.max_consecutive_oom out-of-memory failures in a row
EXIT_DEVICE_FATAL = 76  # a fatal device error poisoned the CUDA context; only a fresh process can use the GPU again

WorkerInbound = JobRequest | JobBatch | CancelJob | Shutdown
WorkerOutbound = (
    WorkerPlanned
    | WorkerReady
    | WorkerStartupFailed
    | AdaptersChanged
    | Heartbeat
    | JobStarted
    | JobProgress
    | JobDenoised
    | JobResult
    | JobFailure
)
