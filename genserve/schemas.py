"""Request and response bodies of the native GenServe API with the FLUX.1 DEV API's field aliases.

Only bounds that do not depend on configuration live here; the configured limits (size, steps, prompt length) are
checked in ``genserve.prepare`` so the message can quote them.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from genserve.messages import Mode
from genserve.webhooks import EVENTS_HELP, URL_HELP, WebhookEvent, parse_events_field

MAX_SEED = 2**63 - 1
IMAGE_FIELDS = ("input_image", "mask_image", "control_image")

# Request examples for the API docs (genserve.docs puts them in Swagger's "Try it out"): each one runs as is against
# a server with the default config. EXAMPLE_MODEL_ID is config model.id's default; the docs show the configured one.
EXAMPLE_MODEL_ID = "flux1-dev"
EXAMPLE_PROMPT = "a red fox in a snowy birch forest at golden hour, soft light, photorealistic"
# Modest on purpose: "Try it out" answers in about a second on a GPU, and the docs test runs every example with the
# embedded model on a CPU (~0.7 s each at 512² and 20 steps, ~5 s at FLUX.1-dev's usual 1024² and 28).
EXAMPLE_SIZE = 512
EXAMPLE_STEPS = 20
EXAMPLE_PNG_BASE64 = (  # an 8x8 gradient: the smallest useful img2img input (it is resized to width x height)
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAGUlEQVR42mNkSGBQYMCCWBgYFBiwgcEpAQBPTwI+VaZqUwAAAABJRU5ErkJggg=="
)
TEXT2IMG_EXAMPLE: dict[str, Any] = {
    "prompt": EXAMPLE_PROMPT,
    "model_id": EXAMPLE_MODEL_ID,
    "mode": "text2img",
    "width": EXAMPLE_SIZE,
    "height": EXAMPLE_SIZE,
    "num_inference_steps": EXAMPLE_STEPS,
    "cfg": 3.5,
    "seed": 42,
}
IMG2IMG_EXAMPLE: dict[str, Any] = {
    **TEXT2IMG_EXAMPLE,
    "prompt": "the same scene as a watercolor painting",
    "mode": "img2img",
    "strength": 0.8,
    "input_image": EXAMPLE_PNG_BASE64,
}


class LoraRequest(BaseModel):
    """One LoRA a request applies: {"name": ..., "weight": 0.8} (``scale`` is accepted for ``weight``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="A LoRA of the catalogue (GET /loras).")
    weight: float = Field(
        1.0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("weight", "scale"),
        description="Adapter weight (alias scale), within ±loras.max_weight; 0 gives the base image.",
    )


def parse_loras_field(value: Any) -> Any:
    """A form-data field carries the list as JSON text; JSON bodies carry it as a list."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError('loras must be a JSON list like [{"name": "style", "weight": 0.8}]') from None
    return value


def _is_redux(mode: Any) -> bool:
    return isinstance(mode, str) and mode.strip().lower() == "redux"


class GenerateRequest(BaseModel):
    """Fields of POST /generate (JSON) and POST /generate/img2img (form-data). Unset fields take config defaults."""

    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, json_schema_extra={"examples": [TEXT2IMG_EXAMPLE, IMG2IMG_EXAMPLE]}
    )

    # mode comes first: the prompt's check reads it (redux may go without a prompt)
    mode: Mode = Field("text2img", description="text2img | img2img | fill | controlnet | redux.")
    prompt: str = Field(description="Text prompt; redux may omit it (the image alone guides it).")
    model_id: str | None = Field(None, description="Model to use; the server's model when omitted.")
    width: int | None = Field(None, description="Output width; snapped down to a multiple of 16.")
    height: int | None = Field(None, description="Output height; snapped down to a multiple of 16.")
    num_inference_steps: int | None = Field(
        None,
        validation_alias=AliasChoices("num_inference_steps", "steps"),
        description="Denoising steps (alias steps).",
    )
    cfg: float | None = Field(
        None,
        allow_inf_nan=False,
        ge=0,
        validation_alias=AliasChoices("cfg", "guidance_scale"),
        description="Guidance scale (alias guidance_scale). Default 3.5, 30 for fill.",
    )
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Random seed; -1 picks one and reports it.")
    priority: int | None = Field(None, ge=-(2**31), le=2**31 - 1, description="Lower runs first; FIFO within one.")
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="img2img strength, (0, 1].")
    controlnet_type: str | None = Field(None, description="canny | tile | depth | blur | openpose | gray | lq.")
    timeout: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Seconds this request may take; capped by queue.task_timeout_s."
    )
    num_images: int | None = Field(
        None,
        ge=1,
        description="Images to make (1 to limits.max_images; seeds seed, seed+1, …): spread over idle workers. "
        "Above 1 the response adds an images list; /jobs takes one image per job.",
    )
    loras: list[LoraRequest] | None = Field(
        None,
        description='LoRAs to apply: [{"name": "style", "weight": 0.8}] (a JSON string in form-data); at most '
        "loras.max_per_request.",
    )
    input_image: str | None = Field(None, description="Base64 or data: URI (JSON); a file (form-data).")
    mask_image: str | None = Field(None, description="Fill mask, white = repaint; same size as input_image.")
    control_image: str | None = Field(None, description="ControlNet conditioning image.")
    prompt_embeds_scale: float = Field(
        1.0, ge=0, le=10, allow_inf_nan=False, description="redux: scale of the image (and prompt) embeddings."
    )
    pooled_prompt_embeds_scale: float = Field(
        1.0, ge=0, le=10, allow_inf_nan=False, description="redux: scale of the pooled embedding."
    )
    webhook_url: str | None = Field(None, description=URL_HELP)
    webhook_events: list[WebhookEvent] | None = Field(None, description=EVENTS_HELP)

    @model_validator(mode="before")
    @classmethod
    def _redux_prompt_optional(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("prompt") is None and _is_redux(data.get("mode")):
            return {**data, "prompt": ""}
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str, info: ValidationInfo) -> str:
        if not prompt.strip() and info.data.get("mode") != "redux":
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_case(cls, mode: Any) -> Any:
        return mode.strip().lower() if isinstance(mode, str) else mode

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_json(cls, value: Any) -> Any:
        return parse_loras_field(value)

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _webhook_events(cls, value: Any) -> Any:
        return parse_events_field(value)


class GeneratedImage(BaseModel):
    """One image of a request for several (num_images): each is its own job with its own seed."""

    task_id: str
    image_base64: str
    seed: int
    width: int
    height: int
    gpu_id: str | None = Field(description="Device that ran this image's job.")


class GenerateResponse(BaseModel):
    """GenServe's response, plus the effective parameters and timings. Errors keep the shape with success false."""

    success: bool
    task_id: str | None
    image_base64: str | None
    error: str | None
    elapsed_time: float = Field(description="Seconds from request to response, on the server.")
    gpu_id: str | None = Field(description="Device that ran the job (cuda:N, or cpu).")
    model_id: str | None
    mode: str | None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    cfg: float | None = None
    strength: float | None = None
    priority: int | None = None
    loras: list[dict[str, Any]] | None = Field(None, description="The LoRAs applied: [{name, weight}].")
    worker_id: int | None = None
    timings: dict[str, float] | None = Field(
        None,
        description="queue_s (submit to start), pipeline_s, encode_s (worker-measured), batch_size (images made in "
        "the same pipeline call; pipeline_s is that call's), total_s; started_at (epoch s).",
    )
    images: list[GeneratedImage] | None = Field(
        None,
        description="With num_images above 1: every image (the first is also the top-level image_base64 and seed).",
    )
