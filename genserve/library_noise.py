"""Silencing library messages that say nothing to an operator. Call before diffusers or transformers is imported
(workers.preload does, first thing; so does the memory planner)."""

from __future__ import annotations

import logging
import warnings


def quiet_library_noise() -> None:
    """Silence messages that say nothing to an operator (must run before diffusers is imported)."""
    # transformers: "CLIPImageProcessor requires torchvision" — Flux never uses an image processor.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    # diffusers: "modules that should be kept in float32: []" on every from_pipe (an always-true check).
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
    # torchao (imported by diffusers whenever it is installed): "Failed to load …_C_cutlass_90a.so" for kernels of
    # other GPUs, torch's "Enum subclass … register_constant" for its enums, and diffusers' "Unable to import
    # torchao Tensor objects" (only matters for checkpoints saved quantised, which GenServe never loads).
    for noisy in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars, one per module
    except ImportError:
        pass
