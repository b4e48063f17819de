"""FLUX.1-Redux: an image's embedding as the prompt of the base FluxPipeline (image variation). Worker process only.

diffusers' ``FluxPriorReduxPipeline`` (a SigLIP vision tower + ``ReduxImageEncoder``) turns an input image, and an
optional prompt mixed in, into ``prompt_embeds`` (the T5 text tokens followed by the image tokens, each as wide as the
transformer's ``joint_attention_dim``) and ``pooled_prompt_embeds`` (CLIP's pooled width). The worker hands those to
the already-loaded base ``FluxPipeline`` exactly as it hands the embeddings it encodes itself for text2img.

The prior pipeline is built over the base pipeline's own CLIP and T5 encoders and tokenizers (the very objects: no
second copy, whatever their precision or placement); only SigLIP and the embedder are loaded from the Redux folder,
in the worker's dtype, onto its device (FLUX.1-Redux-dev: about 0.43 G + 0.06 G parameters, unquantised).

A missing or blank prompt: **zero text embeddings** (512 T5 tokens of zeros, a zero pooled vector), at the base
encoders' widths. That is what FLUX.1-Redux-dev's model card does (diffusers' example loads the prior pipeline without
text encoders, and ``FluxPriorReduxPipeline`` then fills 512x4096 / 768 zeros). With text encoders attached and
``prompt=None`` diffusers itself would fail (``encode_prompt`` takes ``len(None)``), and encoding the empty string
instead (BFL's reference ``prepare_redux`` encodes whatever prompt it is given) would change the images a prompt-less
request gives from what users of the model card get. So no prompt, "" and whitespace are one case, and a real prompt
is encoded by the shared encoders (512 T5 tokens, as ``FluxPriorReduxPipeline`` always uses): the sequence is
[copies, 512 + image tokens, joint_attention_dim] in both cases, one shape for the transformer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

PRIOR_CLASS = "FluxPriorReduxPipeline"
# The parts a FLUX.1-Redux folder must hold (model_index.json names them; each is a subfolder with its config).
REQUIRED_PARTS: dict[str, str] = {
    "image_encoder": "config.json",
    "feature_extractor": "preprocessor_config.json",
    "image_embedder": "config.json",
}
T5_TOKENS = 512  # FluxPriorReduxPipeline encodes the prompt at max_sequence_length=512 and fills 512 zeros without one


class ReduxModelError(ValueError):
    """The folder is not a FLUX.1-Redux model (or does not fit the base model)."""


def check_redux_folder(folder: Path) -> None:
    """Raise ReduxModelError naming the folder and what is missing, before anything heavy loads."""
    index_path = folder / "model_index.json"
    if not folder.is_dir():
        raise ReduxModelError(f"Redux model folder {folder} does not exist (or is not a folder)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReduxModelError(
            f"{folder} is not a FLUX.1-Redux model: it has no model_index.json "
            f"(expected a {PRIOR_CLASS} folder such as black-forest-labs/FLUX.1-Redux-dev)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ReduxModelError(f"{folder} is not a FLUX.1-Redux model: model_index.json is unreadable ({exc})") from exc
    if not isinstance(index, dict) or index.get("_class_name") != PRIOR_CLASS:
        found = index.get("_class_name") if isinstance(index, dict) else None
        raise ReduxModelError(
            f"{folder} is not a FLUX.1-Redux model: model_index.json names {found!r}, not {PRIOR_CLASS!r}"
        )
    missing = [
        f"{part}/{config}"
        for part, config in REQUIRED_PARTS.items()
        if not (isinstance(index.get(part), list) and index[part][0] is not None and (folder / part / config).is_file())
    ]
    if missing:
        raise ReduxModelError(f"{folder} is not a complete FLUX.1-Redux model: missing {', '.join(missing)}")


def load_redux(folder: Path, base: Any, device: str | torch.device, dtype: torch.dtype) -> ReduxEncoder:
    """FLUX.1-Redux from ``folder`` over ``base``'s (a FluxPipeline) text encoders and tokenizers, on device/dtype.

    Raises ReduxModelError when the folder is not a Redux model, or when its embedder's width does not match the base
    transformer's ``joint_attention_dim`` (a Redux made for another model family)."""
    from diffusers import FluxPriorReduxPipeline

    folder = Path(folder)
    check_redux_folder(folder)
    log.info("loading FLUX.1-Redux from %s (%s, on %s)", folder, str(dtype).removeprefix("torch."), device)
    # Passed components are taken as they are (no cast, no move); only SigLIP and the embedder load, in ``dtype``.
    prior = FluxPriorReduxPipeline.from_pretrained(
        folder,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        dtype=dtype,
    )
    # Move only Redux's own models: the shared encoders stay where the worker's plan put them (maybe the host, maybe
    # quantised, maybe under offload hooks), and the prior pipeline reads each one's execution device.
    prior.image_encoder.to(device)
    prior.image_embedder.to(device)
    prior.set_progress_bar_config(disable=True)
    encoder = ReduxEncoder(prior, base, dtype)
    encoder.check_fits()
    return encoder


class ReduxEncoder:
    """Image (+ optional prompt) -> (prompt_embeds, pooled_prompt_embeds) for the base FluxPipeline."""

    def __init__(self, prior: Any, base: Any, dtype: torch.dtype) -> None:
        self.prior = prior  # FluxPriorReduxPipeline sharing base's text encoders and tokenizers
        self.dtype = dtype  # of the embeddings handed out: the worker's
        self._base = base

    @property
    def text_width(self) -> int:
        """T5's width: the prompt_embeds width (== the transformer's joint_attention_dim)."""
        return int(self.prior.text_encoder_2.config.d_model)

    @property
    def pooled_width(self) -> int:
        """CLIP's pooled width (== the transformer's pooled_projection_dim)."""
        return int(self.prior.text_encoder.config.hidden_size)

    @property
    def image_tokens(self) -> int:
        """Tokens the image adds after the text tokens: (image_size / patch_size)^2 of SigLIP (729 for the real one)."""
        config = self.prior.image_encoder.config
        return int((config.image_size // config.patch_size) ** 2)

    def check_fits(self) -> None:
        transformer = self._base.transformer.config
        embedder = self.prior.image_embedder.config
        siglip = self.prior.image_encoder.config
        problems = []
        if embedder.txt_in_features != transformer.joint_attention_dim:
            problems.append(
                f"its image embedder gives {embedder.txt_in_features}-wide tokens, the base transformer takes "
                f"{transformer.joint_attention_dim} (joint_attention_dim)"
            )
        if embedder.redux_dim != siglip.hidden_size:
            problems.append(
                f"its image embedder takes {embedder.redux_dim}-wide SigLIP features, its SigLIP gives "
                f"{siglip.hidden_size}"
            )
        if problems:
            raise ReduxModelError(f"the Redux model does not fit the base model: {'; '.join(problems)}")

    @torch.no_grad()
    def encode(
        self,
        image: Image.Image,
        prompt: str | None,
        prompt_embeds_scale: float,
        pooled_prompt_embeds_scale: float,
        copies: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeds [copies, 512 + image tokens, joint_attention_dim] and pooled [copies, pooled width].

        The scales multiply the whole of each (text and image tokens alike, as diffusers does). ``copies``: the
        images of one request, a batch (same embeddings each)."""
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        prior = self.prior
        arguments: dict[str, Any] = {}
        if prompt is not None and prompt.strip():
            arguments["prompt"] = prompt
        else:
            # Model-card behaviour (see the module docstring): zeros, fresh each call (the pipeline scales the pooled
            # tensor in place), at the shared encoders' widths; dtype of the text encoders' output.
            device = prior._execution_device
            dtype = prior.text_encoder_2.dtype
            arguments["prompt_embeds"] = torch.zeros((1, T5_TOKENS, self.text_width), device=device, dtype=dtype)
            arguments["pooled_prompt_embeds"] = torch.zeros((1, self.pooled_width), device=device, dtype=dtype)
        output = prior(
            image=image.convert("RGB"),
            prompt_embeds_scale=float(prompt_embeds_scale),  # the pipeline only broadcasts floats (not ints)
            pooled_prompt_embeds_scale=float(pooled_prompt_embeds_scale),
            return_dict=False,
            **arguments,
        )
        prompt_embeds, pooled_prompt_embeds = (tensor.to(dtype=self.dtype) for tensor in output)
        return prompt_embeds.repeat(copies, 1, 1), pooled_prompt_embeds.repeat(copies, 1)
