"""GenServe configuration: one typed tree, loaded once at start in the API process.

Sources, later ones winning:
1. the defaults below (every field has one and a one-line description);
2. a YAML file: ``--config PATH``, else ``GENSERVE_CONFIG``, else ``./config.yaml`` when present;
3. environment variables.

Environment rule: ``GENSERVE_<SECTION>__<FIELD>`` sets one field (double underscore between section and field,
value parsed as a YAML scalar or list), e.g. ``GENSERVE_QUEUE__MAX_SIZE=10``. A few common fields also have short
names, listed in ``ENV_SHORTCUTS``. Unknown keys in the file and unknown ``GENSERVE_*`` variables are errors that
name the key, so a typo never silently falls back to a default.

This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genserve.messages import (
    ALL_MODES,
    QUANTIZABLE,
    Attention,
    Compile,
    CompileMode,
    LoraSettings,
    MemorySettings,
    Mode,
    Offload,
    PerformanceSettings,
    Quantization,
    Strategy,
)

# Control modes of a union FLUX ControlNet (InstantX / Shakker-Labs Union order), by controlnet_type.
CONTROL_MODES: dict[str, int] = {
    "canny": 0,
    "tile": 1,
    "depth": 2,
    "blur": 3,
    "pose": 4,
    "openpose": 4,
    "gray": 5,
    "lq": 6,
    "low_quality": 6,
}

ENV_PREFIX = "GENSERVE_"
# Short names for the fields people set most; everything else uses GENSERVE_<SECTION>__<FIELD>.
ENV_SHORTCUTS: dict[str, tuple[str, str]] = {
    "GENSERVE_HOST": ("server", "host"),
    "GENSERVE_PORT": ("server", "port"),
    "GENSERVE_LOG_LEVEL": ("server", "log_level"),
    "GENSERVE_MODEL_PATH": ("model", "path"),
    "GENSERVE_FILL_PATH": ("fill", "path"),
    "GENSERVE_CONTROLNET_PATH": ("controlnet", "path"),
    "GENSERVE_REDUX_PATH": ("redux", "path"),
    "GENSERVE_CPU_WORKERS": ("workers", "cpu_workers"),
    "GENSERVE_DEVICES": ("workers", "devices"),
    "GENSERVE_RESULTS_DIR": ("results", "dir"),
    "GENSERVE_ALLOW_PRIVATE_URLS": ("inputs", "allow_private_urls"),
    "GENSERVE_PUBLIC_BASE_URL": ("openai", "public_base_url"),
    "GENSERVE_MAX_QUEUE_SIZE": ("queue", "max_size"),
    "GENSERVE_API_KEYS_FILE": ("auth", "keys_file"),
    "GENSERVE_WEBHOOK_SECRET": ("webhooks", "secret"),
    "GENSERVE_REDIS_URL": ("cluster", "redis_url"),
    "GENSERVE_ROLE": ("cluster", "role"),
    "GENSERVE_NODE_ID": ("cluster", "node_id"),
}
# GENSERVE_API_KEYS="name:key:scope,scope;name2:key2:scope" adds keys (parsed below, never logged).
ENV_API_KEYS = "GENSERVE_API_KEYS"
# Read by load_config itself, not mapped to a field.
ENV_CONFIG_FILE = "GENSERVE_CONFIG"


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(12411, ge=1, le=65535, description="TCP port of the HTTP server.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins a browser front end may call the API from (CORS), e.g. https://studio.example; "
        "empty: none (same-origin only); ['*']: any.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (for a log collector)."
    )
    access_log: bool = Field(
        True,
        description="One log line per request: method, path, status, duration, request id, key name (never the key).",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve Prometheus /metrics on this port of server.host too (no key needed there; firewall it); "
        "0: only on the main port, behind the 'metrics' scope once keys exist.",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM/SIGINT, how long in-flight requests may finish before they are failed.",
    )
    max_request_mb: float = Field(
        220.0,
        gt=0,
        description="Largest request body accepted (JSON with base64 images, or a multipart upload).",
    )
    max_header_kb: float = Field(
        64.0,
        gt=0,
        description="Largest request head (request line and headers) in KiB; beyond it the client gets 431.",
    )
    max_headers: int = Field(100, ge=1, description="Most headers a request may carry; beyond it the client gets 431.")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a client may take to send a request's headers before its connection is closed.",
    )

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


class ModelConfig(_Section):
    id: str = Field("flux1-dev", min_length=1, description="model_id clients send and /models reports.")
    name: str = Field("FLUX.1-dev", description="Human-readable model name for /models.")
    path: str = Field(
        "",
        description="Local diffusers folder of FLUX.1-dev. Empty: build and use the embedded tiny test model.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype. auto: bfloat16 on CUDA, float32 on CPU."
    )
    modes: list[Mode] = Field(
        default_factory=lambda: list(ALL_MODES),
        min_length=1,
        description="Modes each worker loads and serves; text2img is always loaded (the others share its weights).",
    )
    embedded_cache_dir: str = Field(
        "~/.cache/genserve/embedded", description="Where the embedded test model is built once and reused."
    )

    @field_validator("modes")
    @classmethod
    def _unique_modes(cls, modes: list[Mode]) -> list[Mode]:
        return list(dict.fromkeys(modes))


class FillConfig(_Section):
    path: str = Field(
        "",
        description="FLUX.1-Fill-dev folder (with transformer/) or a bare Fill transformer folder. "
        "Empty: the embedded model's when model.path is empty; fill disabled otherwise.",
    )


class ControlNetConfig(_Section):
    path: str = Field(
        "",
        description="FLUX ControlNet folder (a union ControlNet for controlnet_type). "
        "Empty: the embedded model's when model.path is empty; controlnet disabled otherwise.",
    )
    conditioning_scale: float = Field(0.7, ge=0, le=2, description="controlnet_conditioning_scale of each job.")


class ReduxConfig(_Section):
    path: str = Field(
        "",
        description="FLUX.1-Redux-dev folder (image_encoder, feature_extractor, image_embedder). "
        "Empty: the embedded model's when model.path is empty; redux disabled otherwise.",
    )


class WorkersConfig(_Section):
    devices: Literal["auto"] | list[str] = Field(
        "auto",
        description='"auto": every CUDA device, else cpu_workers CPU workers; or a list like [cuda:0, cuda:2].',
    )
    cpu_workers: int = Field(1, ge=1, le=64, description="Number of CPU workers when no CUDA device is used.")
    cpu_threads: int = Field(0, ge=0, description="torch threads per CPU worker; 0 shares the cores out evenly.")
    ready_timeout_s: float = Field(
        900.0,
        gt=0,
        description="How long a worker may take to load its pipelines before it is killed and retried.",
    )
    heartbeat_interval_s: float = Field(2.0, gt=0, description="How often a worker says it is alive.")
    restart_backoff_s: float = Field(0.1, ge=0, description="Delay before the first respawn of a dead worker.")
    restart_backoff_max_s: float = Field(30.0, ge=0, description="Cap of the doubling respawn delay.")
    max_restarts: int = Field(
        10,
        ge=0,
        description="Respawns per slot within restart_window_s at the doubling backoff; beyond it see on_budget_spent.",
    )
    on_budget_spent: Literal["retry", "exit"] = Field(
        "retry",
        description="A slot that spent its restart budget: retry every restart_backoff_max_s (/ready says degraded), "
        "or exit the service non-zero so an orchestrator restarts the container.",
    )
    start_method: Literal["forkserver", "spawn"] = Field(
        "forkserver",
        description="forkserver: workers fork from a process with torch/diffusers imported (fast respawn); "
        "spawn: a fresh interpreter per worker.",
    )
    parallel_loads: int = Field(
        1,
        ge=0,
        description="Workers loading weights at once (host memory peaks at this many copies); 0: all at once.",
    )
    restart_window_s: float = Field(600.0, gt=0, description="Sliding window for max_restarts.")
    shutdown_timeout_s: float = Field(
        10.0, ge=0, description="At shutdown, how long a worker may take to exit before terminate, then kill."
    )
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="A worker whose heartbeats stop for this long is hung: killed and respawned."
    )
    first_step_timeout_s: float = Field(
        600.0, gt=0, description="A job with no finished step after this long (prompt encoding included) is a hang."
    )
    stall_timeout_s: float = Field(
        120.0, gt=0, description="After the first step, the least silence between steps that counts as a hang."
    )
    stall_pace_factor: float = Field(
        5.0, ge=1, description="…or this many times the job's slowest step so far, if longer: a slow step is no hang."
    )
    max_consecutive_oom: int = Field(
        3, ge=1, description="Out-of-memory failures in a row after which the worker restarts to get clean memory."
    )
    device_memory_gb: float = Field(
        0.0,
        ge=0,
        description="Device memory each worker plans against, in GiB (a '24 GB' card has 24); 0: what it reports free.",
    )

    @field_validator("devices")
    @classmethod
    def _valid_devices(cls, devices: Literal["auto"] | list[str]) -> Literal["auto"] | list[str]:
        if devices == "auto":
            return devices
        if not devices:
            raise ValueError('give at least one device, or "auto"')
        for device in devices:
            if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
                raise ValueError(f"device {device!r} is neither 'cpu' nor 'cuda:N'")
        return devices


class QuantizeConfig(_Section):
    transformer: Quantization = Field("none", description="The base FLUX transformer (text2img, img2img, controlnet).")
    fill: Quantization = Field("none", description="The FLUX.1-Fill transformer.")
    controlnet: Quantization = Field("none", description="The ControlNet.")
    text_encoder_2: Quantization = Field("none", description="The T5-XXL text encoder.")


class MemoryConfig(_Section):
    strategy: Strategy = Field(
        "auto",
        description="auto: take the first setting of the ladder that fits (pinned bf16 → quantise Fill and "
        "ControlNet → quantise the base transformer → text encoders on the CPU → model CPU offload → group "
        "offload); pinned: everything on the device as quantize says, or refuse to start; quantized: the "
        "transformers quantised (auto_quantization) on the device, or refuse; offload: offload (model when none).",
    )
    quantize: QuantizeConfig = Field(
        default_factory=QuantizeConfig,
        description="Per component: none | fp8 (torchao, GPUs with fp8) | int8 (torchao weight-only) | nf4 "
        "(bitsandbytes, CUDA). auto and quantized fill in only the components left at none.",
    )
    offload: Offload = Field(
        "none",
        description="none | text_encoders (T5 and CLIP on the CPU) | model (enable_model_cpu_offload) | group "
        "(group offloading with CUDA streams). CUDA workers only; auto may offload more.",
    )
    auto_quantization: Literal["auto", "fp8", "int8", "nf4"] = Field(
        "auto", description="What auto and quantized quantise with; auto: fp8 on GPUs that have it, else int8."
    )
    reserve_gb: float = Field(
        0.0,
        ge=0,
        description="Device memory (GiB) kept for activations; 0: computed for limits.max_size (see memory_plan.py).",
    )
    group_offload_blocks: int = Field(1, ge=1, description="Transformer blocks per group under group offload.")

    @model_validator(mode="after")
    def _consistent(self) -> MemoryConfig:
        if self.strategy == "pinned" and self.offload != "none":
            raise ValueError(
                f"strategy pinned keeps every model on the device: offload must be none, not {self.offload}"
            )
        return self


class PerformanceConfig(_Section):
    compile: Compile = Field(
        "off",
        description="torch.compile: off | transformer (base, Fill and ControlNet transformers) | all (and the VAE "
        "decoder). Workers compile while warming up, before they report ready.",
    )
    compile_mode: CompileMode = Field(
        "default", description="torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune."
    )
    compile_cache_dir: str = Field(
        "~/.cache/genserve/inductor",
        description="Inductor's on-disk caches: a respawned worker reuses what an earlier one compiled.",
    )
    warmup_sizes: list[list[int]] = Field(
        default_factory=lambda: [[1024, 1024]],
        description="Sizes ([width, height]) each worker runs once per mode before ready when compile is on.",
    )
    attention: Attention = Field(
        "auto",
        description="Attention backend (diffusers' dispatcher): native | flash | flash3 | sage | auto (the fastest "
        "available on the device). An unavailable one stops the start with a message.",
    )
    fuse_qkv: bool = Field(
        True,
        description="Fuse each attention's q/k/v projections into one matmul; fp8/int8 transformers are fused "
        "before they are quantised (nf4 ones stay unfused).",
    )
    channels_last_vae: bool = Field(True, description="Run the VAE in channels-last memory format on CUDA.")
    vae_tiling_above: int = Field(
        1536,
        ge=0,
        description="Decode in tiles when an image is larger than this squared (pixels): 2048² fits; 0: never tile.",
    )
    overlap_encoding: bool = Field(
        True, description="Encode and write each PNG on a thread of the worker while its next job denoises."
    )
    max_batch: int = Field(
        4,
        ge=1,
        le=16,
        description="Most images of one request (n / num_images) one pipeline call runs together when there are "
        "fewer idle workers than images; 1: never batch. A batch never holds more pixels than one limits.max_size² "
        "image, the size the memory plan reserves activations for.",
    )
    batch_pixels: int = Field(
        1024 * 1024,
        ge=1,
        description="Most pixels (width × height × images) in one batch. Batching pays where one image leaves the "
        "device underused; at about a megapixel a FLUX image fills a GPU, and on a CPU a larger batch was slower "
        "than one image after another (tools/bench_batching.py).",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("warmup_sizes")
    @classmethod
    def _pairs(cls, sizes: list[list[int]]) -> list[list[int]]:
        for size in sizes:
            if len(size) != 2 or any(side < 16 for side in size):
                raise ValueError(f"each warm-up size is [width, height], at least 16 each; not {size}")
        return sizes


class QueueConfig(_Section):
    max_size: int = Field(
        100, ge=1, description="Jobs waiting in the global queue; beyond it requests get 429 with Retry-After."
    )
    task_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest a job may take from submission to result (and the cap of a request's own timeout); "
        "past it a queued job leaves the queue, a running one is stopped, and a waiting client gets 408.",
    )
    cancel_abandoned: bool = Field(
        True, description="Cancel a synchronous request's job when its client hangs up while the job is still queued."
    )


class ResultsConfig(_Section):
    dir: str = Field("results", description="Folder of the result store: images and the SQLite job records.")
    max_age_hours: float = Field(168.0, gt=0, description="Jobs and images older than this are deleted.")
    max_total_gb: float = Field(20.0, gt=0, description="Oldest images are deleted while the store is larger.")
    cleanup_interval_s: float = Field(600.0, gt=0, description="How often retention runs.")
    backend: Literal["local", "redis"] = Field(
        "local",
        description="Where finished images live with cluster.backend redis: 'local' is results.dir (in a cluster, a "
        "folder every node mounts at the same path), 'redis' stores each image in Redis for results.max_age_hours.",
    )
    embed_parameters: bool = Field(
        True,
        description="Write the generation parameters into each image: a PNG 'parameters' text chunk (the convention "
        "A1111 and many viewers read), kept as EXIF UserComment when /image re-encodes to JPEG or WEBP.",
    )


Scope = Literal["generate", "read", "metrics", "admin"]


def _default_scopes() -> list[Scope]:
    return ["generate", "read"]


class ApiKeyConfig(_Section):
    name: str = Field(min_length=1, description="Who holds the key (logged and shown; the key itself never is).")
    key: str = Field(min_length=16, description="The secret, at least 16 characters.")
    scopes: list[Scope] = Field(
        default_factory=_default_scopes,
        min_length=1,
        description="generate, read, metrics (GET /metrics), admin (= all, and every key's jobs).",
    )


class AuthConfig(_Section):
    keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="API keys; once any key exists, every route but /health and /ready needs one."
    )
    keys_file: str = Field(
        "", description="YAML file of hashed keys: {keys: [{name, sha256, scopes}]} (python -m genserve.auth hashes)."
    )
    max_jobs_per_key: int = Field(0, ge=0, description="Jobs one key may have queued or running at once; 0: no cap.")
    public_docs: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json without a key even when keys exist."
    )


class WebhooksConfig(_Section):
    secret: str = Field(
        "",
        description="Signing secret of webhook deliveries (Standard Webhooks: 'whsec_' + base64, or any string of "
        "16+ characters); empty: requests that ask for a webhook are refused.",
    )
    max_attempts: int = Field(5, ge=1, le=20, description="Deliveries tried per event before giving up.")
    backoff_s: float = Field(1.0, gt=0, description="Wait before the first retry; doubles on each further retry.")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest wait between two attempts.")
    timeout_s: float = Field(10.0, gt=0, description="One delivery attempt, connection and answer included.")
    progress_interval_s: float = Field(
        1.0, ge=0, description="Least time between two 'progress' deliveries of one job (steps come faster)."
    )


class InputsConfig(_Section):
    allow_private_urls: bool = Field(
        False,
        description="Let image URLs reach loopback, private, link-local or reserved addresses (trusted networks only).",
    )
    url_timeout_s: float = Field(10.0, gt=0, description="Whole fetch of one image URL, redirects included.")
    url_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed when fetching an image URL.")


class OpenAIConfig(_Section):
    max_n: int = Field(4, ge=1, le=16, description="Largest n (images per request) on /v1/images routes.")
    public_base_url: str = Field(
        "",
        description="Base of image URLs that /v1 and /process return (https://img.example.com); empty: the request's.",
    )
    model_aliases: list[str] = Field(
        default_factory=lambda: ["black-forest-labs/flux.1-dev", "flux.1-dev", "flux-1-dev", "flux"],
        description="Extra names accepted in 'model' besides model.id and model.name (case-insensitive).",
    )
    variation_prompt: str = Field(
        "a variation of this image, same subject and style",
        min_length=1,
        description="Prompt of /v1/images/variations.",
    )
    variation_strength: float = Field(0.6, gt=0, le=1, description="img2img strength of a variation.")
    variation_mode: Literal["redux", "img2img"] = Field(
        "redux",
        description="What makes /v1/images/variations and /process variations: redux (FLUX.1-Redux, from the "
        "image's embedding) when the server serves it, else img2img (variation_prompt at variation_strength).",
    )
    process_response: Literal["b64_json", "url"] = Field(
        "b64_json",
        description="What POST /process returns: base64 (the default, as the Flux Imaging API without FILE_SERVER) "
        "or a URL.",
    )

    @field_validator("public_base_url")
    @classmethod
    def _http_base(cls, url: str) -> str:
        if url and not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class DefaultsConfig(_Section):
    width: int = Field(1024, description="Output width when a request gives none.")
    height: int = Field(1024, description="Output height when a request gives none.")
    num_inference_steps: int = Field(50, description="Denoising steps when a request gives none.")
    cfg: float = Field(3.5, ge=0, description="Guidance scale when a request gives none.")
    fill_cfg: float = Field(
        30.0, ge=0, description="Guidance scale of fill jobs when a request gives none (as FLUX.1-Fill)."
    )
    redux_cfg: float = Field(
        2.5, ge=0, description="Guidance scale of redux jobs when a request gives none (as FLUX.1-Redux's card)."
    )
    seed: int = Field(42, ge=-1, le=2**63 - 1, description="Seed when a request gives none; -1 picks a random one.")
    strength: float = Field(0.8, gt=0, le=1, description="img2img strength when a request gives none.")
    priority: int = Field(0, description="Priority when a request gives none; lower runs first.")
    controlnet_type: str = Field("canny", description="controlnet_type when a request gives none.")

    @field_validator("controlnet_type")
    @classmethod
    def _known_control_type(cls, name: str) -> str:
        if name.strip().lower() not in CONTROL_MODES:
            raise ValueError(f"unknown controlnet_type {name!r}; use one of {', '.join(CONTROL_MODES)}")
        return name.strip().lower()


class LimitsConfig(_Section):
    min_size: int = Field(64, ge=16, description="Smallest width/height accepted.")
    max_size: int = Field(2048, ge=16, description="Largest width/height accepted.")
    min_steps: int = Field(1, ge=1, description="Fewest denoising steps accepted.")
    max_steps: int = Field(100, ge=1, description="Most denoising steps accepted.")
    max_cfg: float = Field(50.0, gt=0, description="Largest guidance scale accepted.")
    max_upload_mb: float = Field(50.0, gt=0, description="Largest image accepted, per image, after base64 decoding.")
    max_input_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest input image (width × height) accepted: guards against decompression bombs.",
    )
    max_prompt_chars: int = Field(20000, ge=1, description="Longest prompt accepted.")
    max_images: int = Field(4, ge=1, le=16, description="Most images one native request may ask for (num_images).")

    @model_validator(mode="after")
    def _ordered(self) -> LimitsConfig:
        if self.min_size > self.max_size:
            raise ValueError("limits.min_size must not exceed limits.max_size")
        if self.min_steps > self.max_steps:
            raise ValueError("limits.min_steps must not exceed limits.max_steps")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class LorasConfig(_Section):
    enabled: bool = Field(
        True,
        description="Per-request LoRAs. Off: requests naming LoRAs get 400, and fp8/int8 transformers are fused "
        "before quantising (LoRAs need their separate q/k/v projections, so with LoRAs on they stay unfused).",
    )
    dir: str = Field(
        "loras",
        description="Folder of the LoRA catalogue: each NAME.safetensors in it is the LoRA NAME; uploads land here.",
    )
    max_per_request: int = Field(4, ge=1, description="Most LoRAs one request may apply at once.")
    max_loaded: int = Field(
        8, ge=1, description="LoRAs each worker keeps loaded at once; beyond it the least recently used is unloaded."
    )
    max_upload_mb: float = Field(512.0, gt=0, description="Largest LoRA file POST /loras accepts.")
    max_weight: float = Field(
        4.0, gt=0, description="A request's LoRA weights must lie within [-max_weight, max_weight]."
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ClusterConfig(_Section):
    backend: Literal["local", "redis"] = Field(
        "local",
        description="'local': one machine, the in-process queue and SQLite. 'redis': the queue, job records, events "
        "and cancellation live in Redis (cluster.redis_url), so many nodes share them.",
    )
    role: Literal["all", "api", "worker"] = Field(
        "all",
        description="'api' serves HTTP only; 'worker' runs a supervisor and its workers, with HTTP for its own "
        "health; 'all' is both. 'api' and 'worker' imply backend redis (only 'all' exists with backend local).",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The cluster's Redis (GENSERVE_REDIS_URL).")
    prefix: str = Field(
        "genserve:", min_length=1, description="Prefix of every Redis key: clusters sharing one Redis differ in it."
    )
    node_id: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_.:-]{0,64}$",
        description="This node's name in /status and on its leases; empty: the host name and process id.",
    )
    lease_s: float = Field(
        5.0,
        ge=0.5,
        description="A running job's lease: its node renews it every lease_s/3; a node silent for lease_s is dead "
        "and its jobs go back to the queue (once).",
    )
    node_report_s: float = Field(1.0, gt=0, description="How often a worker node publishes its pool for /status.")
    socket_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait on one Redis command before it counts as down."
    )


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    fill: FillConfig = Field(default_factory=FillConfig)
    controlnet: ControlNetConfig = Field(default_factory=ControlNetConfig)
    redux: ReduxConfig = Field(default_factory=ReduxConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    loras: LorasConfig = Field(default_factory=LorasConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _roles_need_redis(self) -> Config:
        if self.cluster.role != "all" and "backend" not in self.cluster.model_fields_set:
            self.cluster.backend = "redis"  # --role api / worker only exist in a cluster: say so once, not twice
        if self.cluster.backend == "local" and self.cluster.role != "all":
            raise ValueError(
                f"cluster.role {self.cluster.role!r} needs cluster.backend redis: one machine runs API and workers"
            )
        if self.cluster.backend == "local" and self.results.backend == "redis":
            raise ValueError("results.backend redis needs cluster.backend redis")
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Config:
        d, lim = self.defaults, self.limits
        for name in ("width", "height"):
            value = getattr(d, name)
            if not lim.min_size <= value <= lim.max_size:
                raise ValueError(f"defaults.{name}={value} is outside limits {lim.min_size}..{lim.max_size}")
        if not lim.min_steps <= d.num_inference_steps <= lim.max_steps:
            raise ValueError(f"defaults.num_inference_steps={d.num_inference_steps} is outside the step limits")
        for name in ("cfg", "fill_cfg"):
            if getattr(d, name) > lim.max_cfg:
                raise ValueError(f"defaults.{name}={getattr(d, name)} is above limits.max_cfg={lim.max_cfg}")
        return self

    def memory_settings(self) -> MemorySettings:
        memory = self.memory
        return MemorySettings(
            strategy=memory.strategy,
            quantize=tuple((name, getattr(memory.quantize, name)) for name in QUANTIZABLE),
            offload=memory.offload,
            auto_quantization=memory.auto_quantization,
            reserve_gb=memory.reserve_gb,
            device_memory_gb=self.workers.device_memory_gb,
            max_width=self.limits.max_size,
            max_height=self.limits.max_size,
            vae_tiling_above=self.performance.vae_tiling_above,
            group_offload_blocks=memory.group_offload_blocks,
        )

    def performance_settings(self) -> PerformanceSettings:
        performance = self.performance
        return PerformanceSettings(
            compile=performance.compile,
            compile_mode=performance.compile_mode,
            compile_cache_dir=str(expand_path(performance.compile_cache_dir)),
            warmup_sizes=tuple((width, height) for width, height in performance.warmup_sizes),
            attention=performance.attention,
            fuse_qkv=performance.fuse_qkv,
            channels_last_vae=performance.channels_last_vae,
            vae_tiling_above=performance.vae_tiling_above,
            overlap_encoding=performance.overlap_encoding,
        )

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(enabled=self.loras.enabled, max_loaded=self.loras.max_loaded)

    @property
    def clustered(self) -> bool:
        return self.cluster.backend == "redis"

    @property
    def serves_api(self) -> bool:
        return self.cluster.role in ("all", "api")

    @property
    def runs_workers(self) -> bool:
        return self.cluster.role in ("all", "worker")

    @property
    def uses_embedded_model(self) -> bool:
        return not self.model.path

    def served_modes(self) -> tuple[tuple[Mode, ...], list[str]]:
        """Modes the workers will serve, and why any listed mode is left out (a real model without its weights)."""
        modes: list[Mode] = []
        notes: list[str] = []
        for mode in self.model.modes:
            if mode == "fill" and not self.uses_embedded_model and not self.fill.path:
                notes.append("fill is disabled: set fill.path to a FLUX.1-Fill-dev folder to serve it")
            elif mode == "controlnet" and not self.uses_embedded_model and not self.controlnet.path:
                notes.append("controlnet is disabled: set controlnet.path to a FLUX ControlNet folder to serve it")
            elif mode == "redux" and not self.uses_embedded_model and not self.redux.path:
                notes.append("redux is disabled: set redux.path to a FLUX.1-Redux-dev folder to serve it")
            else:
                modes.append(mode)
        return tuple(modes), notes


def _parse_env_value(raw: str) -> Any:
    """Env values are YAML scalars or flow lists, so `8`, `true`, `[cuda:0, cuda:1]` all mean what they say."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _is_text_field(annotation: Any) -> bool:
    if annotation is str:
        return True
    return get_origin(annotation) is Literal and all(isinstance(arg, str) for arg in get_args(annotation))


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG_FILE, ENV_API_KEYS):
            continue
        if name in ENV_SHORTCUTS:
            section, field = ENV_SHORTCUTS[name]
        elif "__" in name:
            section, _, field = name[len(ENV_PREFIX) :].lower().partition("__")
        else:
            known = ", ".join(sorted([*ENV_SHORTCUTS, ENV_CONFIG_FILE]))
            raise ConfigError(f"unknown environment variable {name}: use GENSERVE_<SECTION>__<FIELD> or one of {known}")
        section_model = Config.model_fields.get(section)
        if section_model is None or section_model.annotation is None:
            raise ConfigError(f"environment variable {name}: no config section {section!r}")
        if field not in section_model.annotation.model_fields:
            raise ConfigError(f"environment variable {name}: section {section!r} has no field {field!r}")
        annotation = section_model.annotation.model_fields[field].annotation
        # Text fields take the value verbatim ("::", "FLUX #1", "123" stay strings); others are YAML scalars/lists.
        value = raw if _is_text_field(annotation) else _parse_env_value(raw)
        overrides.setdefault(section, {})[field] = value
    return overrides


def _env_api_keys(environ: Mapping[str, str]) -> list[dict[str, Any]]:
    """GENSERVE_API_KEYS="name:key:scope,scope;…" → key entries. Errors name the entry, never the key."""
    raw = environ.get(ENV_API_KEYS, "")
    keys: list[dict[str, Any]] = []
    for index, entry in enumerate(part.strip() for part in raw.split(";")):
        if not entry:
            continue
        pieces = entry.split(":")
        if len(pieces) not in (2, 3) or not pieces[0] or not pieces[1]:
            raise ConfigError(f"{ENV_API_KEYS} entry {index + 1} must be name:key or name:key:scope,scope")
        scopes = [scope.strip() for scope in pieces[2].split(",") if scope.strip()] if len(pieces) == 3 else None
        keys.append({"name": pieces[0], "key": pieces[1], **({"scopes": scopes} if scopes else {})})
    return keys


def _merge(base: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    merged = dict(base)
    for section, fields in overrides.items():
        current = merged.get(section) or {}
        if not isinstance(current, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        merged[section] = {**current, **fields}
    return merged


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{key}: {message}")
    return "invalid configuration: " + "; ".join(problems)


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    environ = os.environ if environ is None else environ
    if cli_path:
        return Path(cli_path)
    if environ.get(ENV_CONFIG_FILE):
        return Path(environ[ENV_CONFIG_FILE])
    default = Path("config.yaml")
    return default if default.is_file() else None


def load_config(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None, role: str | None = None
) -> Config:
    """Load and validate the configuration. Raises ConfigError naming the bad key. ``role``: the command line's
    --role, which wins over the file and the environment."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded
    data = _merge(data, _env_overrides(environ))
    if role is not None:
        data = _merge(data, {"cluster": {"role": role}})
    env_keys = _env_api_keys(environ)
    if env_keys:  # added to the file's keys, not instead of them
        auth = dict(data.get("auth") or {})
        auth["keys"] = [*(auth.get("keys") or []), *env_keys]
        data["auth"] = auth
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def expand_path(value: str) -> Path:
    return Path(value).expanduser()
