"""prepare_job (request + images + config → JobRequest), GenerateRequest's own validation, and
describe_validation_errors."""

from __future__ import annotations

import base64
import io
import math

import pytest
from PIL import Image
from pydantic import ValidationError

from genserve.config import Config
from genserve.errors import BadRequest
from genserve.http_errors import describe_validation_errors
from genserve.images import raw_to_pil
from genserve.messages import ALL_MODES, Mode
from genserve.prepare import PreparedJob, prepare_job, snap_size
from genserve.schemas import MAX_SEED, GenerateRequest

CONFIG = Config()


def png(width: int, height: int, color: object = (200, 30, 60), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")  # type: ignore[arg-type]
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prepare(
    images: dict[str, bytes | str] | None = None,
    config: Config = CONFIG,
    modes: tuple[Mode, ...] = ALL_MODES,
    **fields: object,
) -> PreparedJob:
    fields.setdefault("prompt", "a red fox in the snow")
    return prepare_job(GenerateRequest(**fields), images or {}, config, modes)  # type: ignore[arg-type]


def small_size(**fields: object) -> dict[str, object]:
    """Keep resize work tiny: 80x64 output (64 is the smallest size allowed)."""
    return {"width": 80, "height": 64, **fields}


# --- sizes, defaults and limits ----


@pytest.mark.parametrize(("value", "snapped"), [(1024, 1024), (1000, 992), (64, 64), (79, 64), (80, 80), (2047, 2032)])
def test_snap_size_rounds_down_to_a_multiple_of_16(value: int, snapped: int) -> None:
    assert snap_size(value) == snapped


def test_width_and_height_are_snapped_in_the_job() -> None:
    job = prepare(width=1000, height=79).request
    assert (job.width, job.height) == (992, 64)


def test_text2img_defaults() -> None:
    prepared = prepare()
    job = prepared.request
    assert job.mode == "text2img"
    assert job.prompt == "a red fox in the snow"
    assert (job.width, job.height) == (1024, 1024)
    assert job.num_inference_steps == 50
    assert job.guidance_scale == 3.5
    assert job.seed == 42
    assert job.strength == 0.8
    assert job.control_mode is None
    assert job.controlnet_conditioning_scale == 0.7
    assert (job.input_image, job.mask_image, job.control_image) == (None, None, None)
    assert prepared.priority == 0
    assert prepared.model_id == "flux1-dev"


def test_request_values_override_defaults() -> None:
    prepared = prepare(width=512, height=768, steps=20, cfg=7.0, seed=5, priority=-3)
    job = prepared.request
    assert (job.width, job.height, job.num_inference_steps) == (512, 768, 20)
    assert (job.guidance_scale, job.seed, prepared.priority) == (7.0, 5, -3)


def test_each_job_gets_its_own_id() -> None:
    first, second = prepare().request.job_id, prepare().request.job_id
    assert first != second
    assert len(first) == 32 and int(first, 16) >= 0


@pytest.mark.parametrize(
    ("fields", "name", "limits"),
    [
        ({"width": 63}, "width", "between 64 and 2048"),
        ({"width": 2049}, "width", "between 64 and 2048"),
        ({"height": 0}, "height", "between 64 and 2048"),
        ({"height": 4096}, "height", "between 64 and 2048"),
        ({"steps": 0}, "num_inference_steps", "between 1 and 100"),
        ({"steps": 101}, "num_inference_steps", "between 1 and 100"),
        ({"cfg": 50.5}, "cfg", "between 0 and 50"),
    ],
)
def test_out_of_range_values_name_the_field_and_limits(fields: dict[str, object], name: str, limits: str) -> None:
    with pytest.raises(BadRequest) as info:
        prepare(**fields)
    assert info.value.message.startswith(name)
    assert limits in info.value.message
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    "fields",
    [{"width": 64, "height": 64}, {"width": 2048, "height": 2048}, {"steps": 1}, {"steps": 100}, {"cfg": 0}],
)
def test_values_at_the_limits_are_accepted(fields: dict[str, object]) -> None:
    prepare(**fields)


def test_configured_limits_are_enforced_and_quoted() -> None:
    config = Config(
        limits={"max_size": 512, "max_steps": 8},
        defaults={"width": 512, "height": 512, "num_inference_steps": 4},
    )  # type: ignore[arg-type]
    job = prepare(config=config).request
    assert (job.width, job.num_inference_steps) == (512, 4)
    with pytest.raises(BadRequest, match="width must be between 64 and 512, got 640"):
        prepare(config=config, width=640)
    with pytest.raises(BadRequest, match="num_inference_steps must be between 1 and 8, got 9"):
        prepare(config=config, steps=9)


def test_prompt_longer_than_the_limit_is_rejected() -> None:
    config = Config(limits={"max_prompt_chars": 10})  # type: ignore[arg-type]
    assert prepare(config=config, prompt="x" * 10).request.prompt == "x" * 10
    with pytest.raises(BadRequest, match="prompt is 11 characters") as info:
        prepare(config=config, prompt="x" * 11)
    assert "10" in info.value.message


# --- model and mode ----


@pytest.mark.parametrize("model_id", [None, "flux1-dev", "FLUX.1-dev"])
def test_model_id_or_model_name_is_accepted(model_id: str | None) -> None:
    assert prepare(model_id=model_id).model_id == "flux1-dev"


def test_unknown_model_id_is_rejected_by_name() -> None:
    with pytest.raises(BadRequest, match="unknown model_id 'sdxl'") as info:
        prepare(model_id="sdxl")
    assert "flux1-dev" in info.value.message


def test_mode_not_enabled_is_rejected() -> None:
    with pytest.raises(BadRequest, match="'fill' is not enabled") as info:
        prepare(
            {"input_image": png(80, 64), "mask_image": png(80, 64)},
            modes=("text2img", "img2img"),
            mode="fill",
            **small_size(),
        )
    assert "text2img, img2img" in info.value.message


# --- images each mode needs ----


@pytest.mark.parametrize(
    ("mode", "images", "message"),
    [
        ("img2img", {}, "mode 'img2img' requires input_image"),
        ("img2img", {"input_image": ""}, "mode 'img2img' requires input_image"),
        ("img2img", {"control_image": "x"}, "mode 'img2img' requires input_image"),
        ("fill", {}, "mode 'fill' requires input_image and mask_image"),
        ("fill", {"input_image": "x"}, "mode 'fill' requires mask_image"),
        ("fill", {"mask_image": "x"}, "mode 'fill' requires input_image"),
        ("controlnet", {}, "mode 'controlnet' requires control_image"),
        ("controlnet", {"input_image": "x"}, "mode 'controlnet' requires control_image"),
    ],
)
def test_missing_image_is_rejected_naming_the_field(mode: str, images: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequest) as info:
        prepare(images, mode=mode, **small_size())  # type: ignore[arg-type]
    assert info.value.message == message


def test_fill_mask_of_another_size_is_rejected_naming_both_sizes() -> None:
    with pytest.raises(BadRequest, match="mask_image is 32x16 but input_image is 40x24"):
        prepare({"input_image": png(40, 24), "mask_image": png(32, 16, 255, "L")}, mode="fill", **small_size())


def test_an_undecodable_image_is_rejected_naming_its_field() -> None:
    with pytest.raises(BadRequest, match="input_image is not valid base64"):
        prepare({"input_image": "!!!"}, mode="img2img", **small_size())
    with pytest.raises(BadRequest, match="control_image is not a decodable image"):
        prepare({"control_image": b"definitely not an image"}, mode="controlnet", **small_size())


def test_img2img_input_is_resized_to_the_output_size() -> None:
    prepared = prepare({"input_image": b64(png(40, 24, (10, 20, 30)))}, mode="img2img", strength=0.3, **small_size())
    raw = prepared.images["input_image"]
    assert (raw.width, raw.height, raw.mode) == (80, 64, "RGB")
    assert raw.data == bytes([10, 20, 30]) * (80 * 64)
    assert prepared.request.strength == 0.3
    assert sorted(prepared.images) == ["input_image"]
    # Pixels never ride the worker's pipe: the job manager writes them to files and fills these in.
    assert (prepared.request.input_image, prepared.request.mask_image, prepared.request.control_image) == (None,) * 3


def test_fill_images_have_the_right_modes_and_sizes() -> None:
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (20, 0, 40, 24))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    images: dict[str, bytes | str] = {"input_image": png(40, 24), "mask_image": buffer.getvalue()}
    prepared = prepare(images, mode="fill", **small_size())
    image, mask = prepared.images["input_image"], prepared.images["mask_image"]
    assert (image.width, image.height, image.mode) == (80, 64, "RGB")
    assert (mask.width, mask.height, mask.mode) == (80, 64, "L")
    assert len(mask.data) == 80 * 64
    resized_mask = raw_to_pil(mask)
    assert resized_mask.getpixel((0, 32)) == 0
    assert resized_mask.getpixel((79, 32)) == 255


def test_form_bytes_and_json_base64_give_the_same_job_images() -> None:
    data = png(40, 24, (1, 2, 3))
    from_form = prepare({"input_image": data}, mode="img2img", seed=1, **small_size()).images
    from_json = prepare({"input_image": "data:image/png;base64," + b64(data)}, mode="img2img", seed=1, **small_size())
    assert from_form == from_json.images


def test_controlnet_keeps_an_input_image_for_controlnet_img2img() -> None:
    images: dict[str, bytes | str] = {
        "control_image": png(40, 24, (0, 0, 0)),
        "input_image": png(40, 24, (9, 9, 9)),
    }
    prepared = prepare(images, mode="controlnet", **small_size())
    control, image = prepared.images["control_image"], prepared.images["input_image"]
    assert (control.width, control.height, control.mode) == (80, 64, "RGB")
    assert control.data == bytes(80 * 64 * 3)
    assert image.data == bytes([9]) * (80 * 64 * 3)
    assert "mask_image" not in prepared.images


def test_controlnet_without_input_image_is_plain_controlnet() -> None:
    assert sorted(prepare({"control_image": png(40, 24)}, mode="controlnet", **small_size()).images) == [
        "control_image"
    ]


def test_text2img_drops_stray_images() -> None:
    images: dict[str, bytes | str] = {
        "input_image": png(8, 8),
        "mask_image": png(8, 8),
        "control_image": png(8, 8),
    }
    assert prepare(images, **small_size()).images == {}


def test_text2img_ignores_even_an_invalid_stray_image() -> None:
    assert prepare({"input_image": "!!!"}, **small_size()).images == {}


def test_img2img_drops_stray_mask_and_control_images() -> None:
    images: dict[str, bytes | str] = {
        "input_image": png(8, 8),
        "mask_image": png(8, 8),
        "control_image": png(8, 8),
    }
    assert sorted(prepare(images, mode="img2img", **small_size()).images) == ["input_image"]


# --- cfg, seed, controlnet type ----


def fill_images() -> dict[str, bytes | str]:
    return {"input_image": png(40, 24), "mask_image": png(40, 24, 255, "L")}


def test_fill_without_cfg_uses_fill_cfg_and_other_modes_use_cfg() -> None:
    assert prepare(fill_images(), mode="fill", **small_size()).request.guidance_scale == 30.0
    assert prepare(**small_size()).request.guidance_scale == 3.5
    assert prepare({"input_image": png(8, 8)}, mode="img2img", **small_size()).request.guidance_scale == 3.5


def test_fill_with_explicit_cfg_keeps_it() -> None:
    assert prepare(fill_images(), mode="fill", cfg=4.0, **small_size()).request.guidance_scale == 4.0
    assert prepare(fill_images(), mode="fill", guidance_scale=0, **small_size()).request.guidance_scale == 0.0


def test_seed_minus_one_resolves_to_a_random_seed() -> None:
    seeds = [prepare(seed=-1).request.seed for _ in range(3)]
    assert all(0 <= seed <= 2**63 - 1 for seed in seeds)
    assert len(set(seeds)) == 3  # collisions in 2**63 are practically impossible


def test_default_seed_minus_one_is_random_too() -> None:
    config = Config(defaults={"seed": -1})  # type: ignore[arg-type]
    seeds = {prepare(config=config).request.seed for _ in range(3)}
    assert len(seeds) == 3
    assert all(0 <= seed <= MAX_SEED for seed in seeds)


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1])
def test_explicit_seed_is_kept(seed: int) -> None:
    assert prepare(seed=seed).request.seed == seed


@pytest.mark.parametrize(
    ("controlnet_type", "control_mode"),
    [
        (None, 0),
        ("canny", 0),
        ("tile", 1),
        ("depth", 2),
        ("openpose", 4),
        ("pose", 4),
        (" Depth ", 2),
        ("lq", 6),
    ],
)
def test_controlnet_type_maps_to_union_control_mode(controlnet_type: str | None, control_mode: int) -> None:
    job = prepare({"control_image": png(8, 8)}, mode="controlnet", controlnet_type=controlnet_type, **small_size())
    assert job.request.control_mode == control_mode


def test_unknown_controlnet_type_is_rejected_by_name() -> None:
    with pytest.raises(BadRequest, match="unknown controlnet_type 'sketch'") as info:
        prepare({"control_image": png(8, 8)}, mode="controlnet", controlnet_type="sketch", **small_size())
    assert "canny" in info.value.message


def test_controlnet_type_is_ignored_outside_controlnet_mode() -> None:
    assert prepare(controlnet_type="sketch", **small_size()).request.control_mode is None


# --- GenerateRequest ----


def test_aliases_steps_and_guidance_scale() -> None:
    req = GenerateRequest.model_validate({"prompt": "p", "steps": 12, "guidance_scale": 2.5})
    assert (req.num_inference_steps, req.cfg) == (12, 2.5)
    req = GenerateRequest.model_validate({"prompt": "p", "num_inference_steps": 13, "cfg": 1.5})
    assert (req.num_inference_steps, req.cfg) == (13, 1.5)


def test_unknown_fields_are_ignored() -> None:
    req = GenerateRequest.model_validate({"prompt": "p", "negative_prompt": "blurry"})
    assert not hasattr(req, "negative_prompt")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_blank_prompt_is_rejected(prompt: str) -> None:
    with pytest.raises(ValidationError, match="prompt must not be empty"):
        GenerateRequest(prompt=prompt)


def test_prompt_is_required() -> None:
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({})


@pytest.mark.parametrize(("given", "mode"), [("IMG2IMG", "img2img"), (" Fill ", "fill"), ("ControlNet", "controlnet")])
def test_mode_is_case_insensitive(given: str, mode: str) -> None:
    assert GenerateRequest(prompt="p", mode=given).mode == mode  # type: ignore[arg-type]


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="p", mode="upscale")  # type: ignore[arg-type]


@pytest.mark.parametrize("cfg", [math.nan, math.inf, -math.inf, -0.5])
def test_non_finite_or_negative_cfg_is_rejected(cfg: float) -> None:
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="p", cfg=cfg)


@pytest.mark.parametrize("seed", [-1, 0, MAX_SEED])
def test_seed_bounds_accepted(seed: int) -> None:
    assert GenerateRequest(prompt="p", seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-2, MAX_SEED + 1])
def test_seed_bounds_rejected(seed: int) -> None:
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="p", seed=seed)


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, math.nan])
def test_strength_outside_0_1_is_rejected(strength: float) -> None:
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="p", strength=strength)


def test_strength_of_one_is_accepted() -> None:
    assert GenerateRequest(prompt="p", strength=1).strength == 1.0


# --- describe_validation_errors ----


def validation_errors(**fields: object) -> list[dict[str, object]]:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate(fields)
    return info.value.errors()  # type: ignore[return-value]


def test_describe_names_the_field() -> None:
    message = describe_validation_errors(validation_errors(prompt="p", width="wide"))
    assert message.startswith("width: ")
    assert "integer" in message


def test_describe_missing_field_and_value_error() -> None:
    assert describe_validation_errors(validation_errors()) == "prompt: field required"
    assert describe_validation_errors(validation_errors(prompt=" ")) == "prompt: prompt must not be empty"


def test_describe_joins_several_errors() -> None:
    message = describe_validation_errors(validation_errors(prompt="p", width="w", cfg=math.nan))
    parts = message.split("; ")
    assert [part.split(":")[0] for part in parts] == ["width", "cfg"]
    assert "finite" in parts[1]


def test_describe_uses_the_alias_the_client_sent() -> None:
    assert describe_validation_errors(validation_errors(prompt="p", steps="many")).startswith("steps: ")


def test_describe_drops_fastapi_location_prefixes() -> None:
    errors = [
        {"loc": ("body", "width"), "msg": "Input should be a valid integer", "type": "int_parsing"},
        {"loc": ("form", "seed"), "msg": "Value error, too big", "type": "value_error"},
        {"loc": ("body",), "msg": "JSON decode error", "type": "json_invalid"},
    ]
    assert describe_validation_errors(errors) == (
        "width: Input should be a valid integer; seed: too big; request body: JSON decode error"
    )


def test_describe_of_no_errors() -> None:
    assert describe_validation_errors([]) == "invalid request"
