"""From a parsed request to a job a worker can run without checking anything: defaults, configured limits, size
snapping, the images each mode needs (decoded, validated, resized), seed resolution.

Runs in the API process, in a worker thread (image decoding is CPU work the event loop must not do). Raises
BadRequest / PayloadTooLarge naming the field; nothing is queued until this returns.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from genserve.config import CONTROL_MODES, Config
from genserve.errors import BadRequest, NotFound
from genserve.fetch import FetchPolicy, fetch_url, is_url
from genserve.images import DecodedImage, RawImage, decode_base64_field, decode_image, to_raw_mask, to_raw_rgb
from genserve.loras import LoraCatalogue
from genserve.messages import JobRequest, LoraUse, Mode
from genserve.schemas import MAX_SEED, GenerateRequest, LoraRequest
from genserve.webhooks import WebhookSpec, webhook_spec

# Images each mode cannot run without. controlnet takes input_image too (ControlNet img2img) but does not need it.
REQUIRED_IMAGES: dict[Mode, tuple[str, ...]] = {
    "text2img": (),
    "img2img": ("input_image",),
    "fill": ("input_image", "mask_image"),
    "controlnet": ("control_image",),
    "redux": ("input_image",),
}
USED_IMAGES: dict[Mode, tuple[str, ...]] = {
    "text2img": (),
    "img2img": ("input_image",),
    "fill": ("input_image", "mask_image"),
    "controlnet": ("control_image", "input_image"),
    "redux": ("input_image",),
}

SIZE_MULTIPLE = 16
_SCHEME = re.compile(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*://")  # FLUX packs 2×2 latent patches of an 8× VAE


@dataclass(frozen=True)
class PreparedJob:
    request: JobRequest  # output_path and image files still empty: the job manager fills them in at submission
    images: dict[str, RawImage]  # the decoded inputs by field (input_image, mask_image, control_image)
    priority: int
    model_id: str
    params: dict[str, Any]  # the effective request as recorded and shown (no image bytes)
    timeout_s: float | None = None  # the request's own deadline, if it asked for one (capped when submitted)
    num_images: int = 1  # images asked for: this job and num_images - 1 siblings with the next seeds (sync routes)
    group: str | None = None  # with siblings: the first job's id, shared by all; the supervisor may batch a group
    webhook: WebhookSpec | None = None  # where to POST the job's events (each sibling sends its own)


EncodedImages = Mapping[str, "bytes | str"]  # field -> raw upload bytes, or base64 / data-URI text


def snap_size(value: int) -> int:
    """Round down to a multiple of 16, as FLUX needs."""
    return value - value % SIZE_MULTIPLE


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}, got {value}")


def resolve_model_id(requested: str | None, config: Config) -> str:
    if requested is None or requested in (config.model.id, config.model.name):
        return config.model.id
    raise BadRequest(f"unknown model_id {requested!r}; this server serves {config.model.id!r}")


def resolve_control_mode(controlnet_type: str | None, config: Config) -> int:
    name = (controlnet_type or config.defaults.controlnet_type).strip().lower()
    if name not in CONTROL_MODES:
        raise BadRequest(f"unknown controlnet_type {name!r}; use one of {', '.join(CONTROL_MODES)}")
    return CONTROL_MODES[name]


def resolve_seed(seed: int | None, config: Config) -> int:
    seed = config.defaults.seed if seed is None else seed
    return random.randint(0, MAX_SEED) if seed == -1 else seed


def url_policy(config: Config) -> FetchPolicy:
    return FetchPolicy(
        allow_private=config.inputs.allow_private_urls,
        timeout_s=config.inputs.url_timeout_s,
        max_bytes=config.limits.max_upload_bytes,
        max_redirects=config.inputs.url_max_redirects,
    )


def _image_bytes(value: bytes | str, field: str, config: Config) -> bytes:
    """An upload as is; text as an http(s) URL to fetch, or base64 / a data: URI to decode."""
    if isinstance(value, bytes):
        return value
    if is_url(value) or _SCHEME.match(value[:32]):  # any scheme://: fetch_url says why file:// etc. are refused
        return fetch_url(value, field, url_policy(config))
    return decode_base64_field(value, field, config.limits.max_upload_bytes)


def _decode_images(mode: Mode, images: EncodedImages, config: Config) -> dict[str, DecodedImage]:
    limits = config.limits
    decoded: dict[str, DecodedImage] = {}
    for field in USED_IMAGES[mode]:
        value = images.get(field)
        if value is None or (isinstance(value, (str, bytes)) and len(value) == 0):
            continue
        data = _image_bytes(value, field, config)
        decoded[field] = decode_image(
            data, field, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_input_pixels
        )
    return decoded


def _default_cfg(mode: Mode, config: Config) -> float:
    defaults = config.defaults
    return {"fill": defaults.fill_cfg, "redux": defaults.redux_cfg}.get(mode, defaults.cfg)


def resolve_loras(
    requested: list[LoraRequest] | None, mode: Mode, config: Config, catalogue: LoraCatalogue | None
) -> tuple[LoraUse, ...]:
    """The request's LoRAs, each a file of the catalogue that fits the transformer ``mode`` runs on."""
    if not requested:
        return ()
    settings = config.loras
    if not settings.enabled or catalogue is None:
        raise BadRequest("LoRAs are turned off on this server (loras.enabled: false)", param="loras")
    if len(requested) > settings.max_per_request:
        raise BadRequest(
            f"at most {settings.max_per_request} LoRAs per request (loras.max_per_request), got {len(requested)}",
            param="loras",
        )
    names = [lora.name for lora in requested]
    if len(set(names)) != len(names):
        raise BadRequest(f"each LoRA may be named once, got {', '.join(names)}", param="loras")
    return tuple(_lora_use(lora, mode, config, catalogue) for lora in requested)


def _lora_use(lora: LoraRequest, mode: Mode, config: Config, catalogue: LoraCatalogue) -> LoraUse:
    limit = config.loras.max_weight
    _check_range(f"weight of LoRA '{lora.name}'", lora.weight, -limit, limit)
    try:
        info = catalogue.get(lora.name)
        stat = info.path.stat()
    except NotFound as exc:  # a field naming nothing is the request's fault: 400, not 404
        raise BadRequest(exc.message, param="loras") from None
    except FileNotFoundError:
        raise BadRequest(f"LoRA '{lora.name}' was removed just now", param="loras") from None
    fill = mode == "fill"
    if not (info.fits_fill if fill else info.fits_transformer):
        which = "the Fill transformer" if fill else "the base transformer"
        why = info.problem if not fill and info.problem else "its target modules are not all in it"
        raise BadRequest(f"LoRA '{lora.name}' does not fit {which} that mode {mode!r} runs on: {why}", param="loras")
    version = f"{stat.st_size}:{stat.st_mtime_ns}"
    return LoraUse(name=info.name, path=str(info.path), version=version, weight=lora.weight)


def prepare_job(
    req: GenerateRequest,
    images: EncodedImages,
    config: Config,
    enabled_modes: tuple[Mode, ...],
    loras: LoraCatalogue | None = None,
) -> PreparedJob:
    """Validate ``req`` against the configuration (its LoRAs against ``loras``) and build the worker's JobRequest."""
    defaults, limits = config.defaults, config.limits
    model_id = resolve_model_id(req.model_id, config)
    mode = req.mode
    if mode not in enabled_modes:
        raise BadRequest(f"mode {mode!r} is not enabled on this server (enabled: {', '.join(enabled_modes)})")
    if len(req.prompt) > limits.max_prompt_chars:
        raise BadRequest(f"prompt is {len(req.prompt)} characters, more than the limit of {limits.max_prompt_chars}")

    width = defaults.width if req.width is None else req.width
    height = defaults.height if req.height is None else req.height
    _check_range("width", width, limits.min_size, limits.max_size)
    _check_range("height", height, limits.min_size, limits.max_size)
    width, height = snap_size(width), snap_size(height)
    steps = defaults.num_inference_steps if req.num_inference_steps is None else req.num_inference_steps
    _check_range("num_inference_steps", steps, limits.min_steps, limits.max_steps)
    cfg = req.cfg if req.cfg is not None else _default_cfg(mode, config)
    _check_range("cfg", cfg, 0, limits.max_cfg)
    strength = defaults.strength if req.strength is None else req.strength
    control_mode = resolve_control_mode(req.controlnet_type, config) if mode == "controlnet" else None
    lora_uses = resolve_loras(req.loras, mode, config, loras)
    webhook = webhook_spec(req.webhook_url, req.webhook_events, config)  # resolves the host: after the cheap checks

    missing = [field for field in REQUIRED_IMAGES[mode] if not images.get(field)]
    if missing:
        raise BadRequest(f"mode {mode!r} requires {' and '.join(missing)}")
    decoded = _decode_images(mode, images, config)
    if mode == "fill":
        input_size, mask_size = decoded["input_image"].image.size, decoded["mask_image"].image.size
        if input_size != mask_size:
            raise BadRequest(
                f"mask_image is {mask_size[0]}x{mask_size[1]} but input_image is {input_size[0]}x{input_size[1]}; "
                "they must match"
            )

    raw: dict[str, RawImage] = {
        field: (to_raw_mask if field == "mask_image" else to_raw_rgb)(image, width, height)
        for field, image in decoded.items()
    }
    request = JobRequest(
        job_id=uuid.uuid4().hex,
        mode=mode,
        prompt=req.prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=float(cfg),
        seed=resolve_seed(req.seed, config),
        strength=float(strength),
        input_image=None,  # written to files by the job manager: images never ride the worker's pipe
        mask_image=None,
        control_image=None,
        control_mode=control_mode,
        controlnet_conditioning_scale=config.controlnet.conditioning_scale,
        output_path="",
        loras=lora_uses,
        prompt_embeds_scale=req.prompt_embeds_scale,
        pooled_prompt_embeds_scale=req.pooled_prompt_embeds_scale,
    )
    priority = defaults.priority if req.priority is None else req.priority
    params: dict[str, Any] = {
        "prompt": request.prompt,
        "mode": mode,
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "cfg": request.guidance_scale,
        "seed": request.seed,
        "priority": priority,
        "images": sorted(decoded),
    }
    if "input_image" in raw and mode in ("img2img", "controlnet"):  # fill repaints, redux embeds: no strength
        params["strength"] = request.strength
    if mode == "redux":
        params["prompt_embeds_scale"] = req.prompt_embeds_scale
        params["pooled_prompt_embeds_scale"] = req.pooled_prompt_embeds_scale
    if lora_uses:
        params["loras"] = [{"name": lora.name, "weight": lora.weight} for lora in lora_uses]
    if mode == "controlnet":
        params["controlnet_type"] = (req.controlnet_type or defaults.controlnet_type).strip().lower()
    num_images = 1 if req.num_images is None else req.num_images
    _check_range("num_images", num_images, 1, limits.max_images)
    if config.results.embed_parameters:
        request = replace(request, parameters=parameters_text(params, model_id))
    return PreparedJob(
        request=request,
        images=raw,
        priority=priority,
        model_id=model_id,
        params=params,
        timeout_s=req.timeout,
        num_images=num_images,
        webhook=webhook,
    )


def parameters_text(params: dict[str, Any], model_id: str) -> str:
    """The image's generation parameters as A1111 writes them (and viewers read): the prompt, then a settings line."""
    settings = [
        f"Steps: {params['num_inference_steps']}",
        f"CFG scale: {params['cfg']:g}",
        f"Seed: {params['seed']}",
        f"Size: {params['width']}x{params['height']}",
        f"Model: {model_id}",
        f"Mode: {params['mode']}",
    ]
    if "strength" in params:
        settings.append(f"Denoising strength: {params['strength']:g}")
    if "controlnet_type" in params:
        settings.append(f"ControlNet: {params['controlnet_type']}")
    if params.get("loras"):
        settings.append("LoRAs: " + " ".join(f"{lora['name']}:{lora['weight']:g}" for lora in params["loras"]))
    return f"{params['prompt']}\n" + ", ".join(settings)


def sibling(prepared: PreparedJob, index: int) -> PreparedJob:
    """The index-th image of a request for several: the same job (images shared, not copied) with another id and
    the seed ``index`` further on."""
    seed = (prepared.request.seed + index) % (MAX_SEED + 1)
    params = {**prepared.params, "seed": seed}
    parameters = parameters_text(params, prepared.model_id) if prepared.request.parameters else ""
    request = replace(prepared.request, job_id=uuid.uuid4().hex, seed=seed, parameters=parameters)
    return replace(prepared, request=request, params=params)


def with_siblings(prepared: PreparedJob, count: int) -> list[PreparedJob]:
    """The job and its count - 1 siblings, one group when there are several."""
    if count == 1:
        return [prepared]
    first = replace(prepared, group=prepared.request.job_id)
    return [first] + [sibling(first, index) for index in range(1, count)]
