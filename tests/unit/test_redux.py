"""FLUX.1-Redux (workers.redux) on the embedded model, through diffusers' real FluxPriorReduxPipeline and FluxPipeline:
the embedded Redux folder loads like FLUX.1-Redux-dev, its embeddings fit the base transformer and drive it, and the
prior pipeline shares the base pipeline's text encoders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from workers.embedded import REDUX_IMAGE_TOKENS, EmbeddedModelPaths, ensure_embedded_model
from workers.redux import T5_TOKENS, ReduxEncoder, ReduxModelError, check_redux_folder, load_redux

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 3.5}


@pytest.fixture(scope="module")
def embedded(embedded_cache: Path) -> EmbeddedModelPaths:
    return ensure_embedded_model(embedded_cache)


@pytest.fixture(scope="module")
def base(embedded: EmbeddedModelPaths) -> Any:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(embedded.base, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def redux(embedded: EmbeddedModelPaths, base: Any) -> ReduxEncoder:
    return load_redux(embedded.redux, base, "cpu", torch.float32)


def picture(seed: int) -> Image.Image:
    """A 96x80 RGB picture (not the SigLIP size: the feature extractor resizes it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def generate(base: Any, embeds: tuple[torch.Tensor, torch.Tensor], seed: int = 7) -> np.ndarray:
    prompt_embeds, pooled_prompt_embeds = embeds
    images = base(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **SMALL,
    ).images
    result: np.ndarray = images
    return result


# --- the embedded Redux folder ---------------------------------------------------------------------------------------


def test_the_embedded_redux_is_laid_out_like_flux1_redux_dev(embedded: EmbeddedModelPaths) -> None:
    index = json.loads((embedded.redux / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "FluxPriorReduxPipeline"
    assert index["image_encoder"] == ["transformers", "SiglipVisionModel"]
    assert index["feature_extractor"] == ["transformers", "SiglipImageProcessor"]
    assert index["image_embedder"][1] == "ReduxImageEncoder"
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        assert index[name] == [None, None]  # as in the real repository: the text stack is the base model's
    assert sorted(path.name for path in embedded.redux.iterdir()) == [
        "feature_extractor",
        "image_embedder",
        "image_encoder",
        "model_index.json",
    ]
    check_redux_folder(embedded.redux)
    on_disk = sum(path.stat().st_size for path in embedded.redux.rglob("*") if path.is_file())
    assert on_disk < 500_000  # tiny: about 340 kB


def test_the_embedded_redux_loads_as_diffusers_loads_flux1_redux_dev(embedded: EmbeddedModelPaths) -> None:
    """The model card's own call, no text encoders: every Redux part is found under its real class name."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionModel

    prior = FluxPriorReduxPipeline.from_pretrained(
        embedded.redux, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None
    )
    assert isinstance(prior.image_encoder, SiglipVisionModel)
    assert isinstance(prior.image_embedder, ReduxImageEncoder)
    assert type(prior.feature_extractor).__name__.startswith("SiglipImageProcessor")  # ...Pil without torchvision
    assert prior.feature_extractor.size == {"height": 64, "width": 64}
    assert prior.text_encoder is None and prior.text_encoder_2 is None


def test_the_embedded_redux_fits_the_embedded_base(redux: ReduxEncoder, base: Any) -> None:
    transformer = base.transformer.config
    assert redux.prior.image_embedder.config.txt_in_features == transformer.joint_attention_dim
    assert redux.prior.image_embedder.config.redux_dim == redux.prior.image_encoder.config.hidden_size
    assert redux.image_tokens == REDUX_IMAGE_TOKENS == 16
    assert redux.text_width == transformer.joint_attention_dim
    assert redux.pooled_width == transformer.pooled_projection_dim


# --- (a) shapes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("prompt", [None, "a red fox in the snow"])
def test_embeddings_have_the_shapes_the_base_transformer_takes(
    redux: ReduxEncoder, base: Any, copies: int, prompt: str | None
) -> None:
    prompt_embeds, pooled = redux.encode(picture(1), prompt, 1.0, 1.0, copies=copies)
    transformer = base.transformer.config
    assert prompt_embeds.shape == (copies, T5_TOKENS + REDUX_IMAGE_TOKENS, transformer.joint_attention_dim)
    assert pooled.shape == (copies, transformer.pooled_projection_dim)
    assert prompt_embeds.dtype == pooled.dtype == torch.float32
    assert torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()
    for index in range(1, copies):  # the images of one request share their embeddings
        assert torch.equal(prompt_embeds[index], prompt_embeds[0]) and torch.equal(pooled[index], pooled[0])


def test_no_prompt_and_a_blank_prompt_are_zero_text_embeddings(redux: ReduxEncoder) -> None:
    """The model card's behaviour: no text encoders in the prior pipeline -> zero text tokens and pooled vector."""
    image = picture(1)
    none = redux.encode(image, None, 1.0, 1.0)
    for blank in ("", "   "):
        same = redux.encode(image, blank, 1.0, 1.0)
        assert torch.equal(same[0], none[0]) and torch.equal(same[1], none[1])
    prompt_embeds, pooled = none
    assert not prompt_embeds[:, :T5_TOKENS].any() and not pooled.any()
    assert prompt_embeds[:, T5_TOKENS:].abs().mean() > 0.01  # the image tokens


def test_a_non_rgb_image_is_converted(redux: ReduxEncoder) -> None:
    rgba = picture(2).convert("RGBA")
    grey = picture(2).convert("L")
    for image in (rgba, grey):
        prompt_embeds, _ = redux.encode(image, None, 1.0, 1.0)
        assert prompt_embeds.shape[1] == T5_TOKENS + REDUX_IMAGE_TOKENS


def test_copies_must_be_positive(redux: ReduxEncoder) -> None:
    with pytest.raises(ValueError, match="copies"):
        redux.encode(picture(1), None, 1.0, 1.0, copies=0)


# --- (b), (c) driving the base pipeline ------------------------------------------------------------------------------


def test_the_embeddings_drive_the_base_pipeline_deterministically(redux: ReduxEncoder, base: Any) -> None:
    embeds = redux.encode(picture(1), None, 1.0, 1.0, copies=2)
    first = generate(base, embeds)
    again = generate(base, redux.encode(picture(1), None, 1.0, 1.0, copies=2))
    assert first.shape == (2, 64, 64, 3) and np.isfinite(first).all()
    assert np.array_equal(first, again)
    assert not np.array_equal(first, generate(base, embeds, seed=8))


def test_two_input_images_give_two_different_images(redux: ReduxEncoder, base: Any) -> None:
    one = redux.encode(picture(1), None, 1.0, 1.0)
    other = redux.encode(picture(2), None, 1.0, 1.0)
    assert not torch.equal(one[0], other[0])
    assert np.abs(generate(base, one) - generate(base, other)).mean() > 1e-4


# --- (d), (e) scales and prompts -------------------------------------------------------------------------------------


def test_the_scales_multiply_the_embeddings(redux: ReduxEncoder) -> None:
    image, prompt = picture(3), "a red fox in the snow"
    full = redux.encode(image, prompt, 1.0, 1.0)
    half_text = redux.encode(image, prompt, 0.5, 1.0)
    half_pooled = redux.encode(image, prompt, 1.0, 0.5)
    assert torch.allclose(half_text[0], full[0] * 0.5) and torch.equal(half_text[1], full[1])
    assert torch.equal(half_pooled[0], full[0]) and torch.allclose(half_pooled[1], full[1] * 0.5)
    assert full[1].abs().mean() > 0.01  # a real pooled vector, so halving it is seen
    integer = redux.encode(image, prompt, 1, 0)  # ints are accepted (diffusers only broadcasts floats)
    assert torch.equal(integer[0], full[0]) and not integer[1].any()


def test_a_prompt_mixed_in_changes_the_text_tokens_not_the_image_tokens(redux: ReduxEncoder) -> None:
    image = picture(4)
    plain = redux.encode(image, None, 1.0, 1.0)
    fox = redux.encode(image, "a red fox in the snow", 1.0, 1.0)
    cat = redux.encode(image, "a cat", 1.0, 1.0)
    assert not torch.equal(fox[0][:, :T5_TOKENS], plain[0][:, :T5_TOKENS])
    assert not torch.equal(fox[1], plain[1]) and not torch.equal(fox[1], cat[1])
    assert not torch.equal(fox[0], cat[0])
    assert torch.equal(fox[0][:, T5_TOKENS:], plain[0][:, T5_TOKENS:])


# --- (f) one copy of the text encoders -------------------------------------------------------------------------------


def test_the_prior_pipeline_shares_the_base_text_encoders(redux: ReduxEncoder, base: Any) -> None:
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        assert getattr(redux.prior, name) is getattr(base, name), name
    base_parameters = {id(parameter) for parameter in base.text_encoder.parameters()}
    base_parameters |= {id(parameter) for parameter in base.text_encoder_2.parameters()}
    own = [*redux.prior.image_encoder.parameters(), *redux.prior.image_embedder.parameters()]
    assert not base_parameters & {id(parameter) for parameter in own}


def test_loading_leaves_the_shared_encoders_as_they_were(embedded: EmbeddedModelPaths) -> None:
    """The dtype applies to Redux's own models only: the base's (here float32) encoders are not cast."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(embedded.base, dtype=torch.float32)
    encoder = load_redux(embedded.redux, pipe, "cpu", torch.bfloat16)
    assert encoder.prior.image_encoder.dtype == torch.bfloat16
    assert next(encoder.prior.image_embedder.parameters()).dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float32
    prompt_embeds, pooled = encoder.encode(picture(1), "a cat", 1.0, 1.0)
    assert prompt_embeds.dtype == pooled.dtype == torch.bfloat16


# --- (g) wrong folders -----------------------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_redux_model_is_refused_by_name(
    embedded: EmbeddedModelPaths, base: Any, tmp_path: Path
) -> None:
    with pytest.raises(ReduxModelError, match=r"names 'FluxPipeline', not 'FluxPriorReduxPipeline'") as caught:
        load_redux(embedded.base, base, "cpu", torch.float32)
    assert str(embedded.base) in str(caught.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReduxModelError, match="no model_index.json") as caught:
        load_redux(empty, base, "cpu", torch.float32)
    assert str(empty) in str(caught.value)

    with pytest.raises(ReduxModelError, match="does not exist"):
        load_redux(tmp_path / "nowhere", base, "cpu", torch.float32)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ReduxModelError, match="unreadable"):
        load_redux(broken, base, "cpu", torch.float32)


def test_a_redux_folder_missing_a_part_names_the_part(embedded: EmbeddedModelPaths, base: Any, tmp_path: Path) -> None:
    partial = tmp_path / "redux"
    shutil.copytree(embedded.redux, partial)
    shutil.rmtree(partial / "image_embedder")
    (partial / "feature_extractor" / "preprocessor_config.json").unlink()
    missing = "missing feature_extractor/preprocessor_config.json, image_embedder/config.json"
    with pytest.raises(ReduxModelError, match=missing) as caught:
        load_redux(partial, base, "cpu", torch.float32)
    assert str(partial) in str(caught.value)


def test_a_redux_for_another_model_width_is_refused(embedded: EmbeddedModelPaths, base: Any, tmp_path: Path) -> None:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    other = tmp_path / "redux"
    shutil.copytree(embedded.redux, other)
    shutil.rmtree(other / "image_embedder")
    siglip = json.loads((other / "image_encoder" / "config.json").read_text(encoding="utf-8"))
    ReduxImageEncoder(redux_dim=siglip["hidden_size"], txt_in_features=64).save_pretrained(other / "image_embedder")
    with pytest.raises(ReduxModelError, match=r"64-wide tokens, the base transformer takes 32 \(joint_attention_dim\)"):
        load_redux(other, base, "cpu", torch.float32)
