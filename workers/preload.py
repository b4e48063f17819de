"""Imported once by the forkserver that every worker is forked from (see genserve.supervisor.PRELOAD_MODULES).

Importing torch, diffusers' Flux pipelines and transformers' text encoders costs seconds; done here, a respawned
worker starts with all of it in memory (copy-on-write) and pays only for loading its weights. Nothing here may
initialise CUDA: a CUDA context does not survive a fork, so each worker creates its own after the fork.

The forkserver also ignores SIGTERM from here on (multiprocessing already makes it ignore SIGINT): a SIGTERM sent to
the whole process group must not take it down while the API process drains and may still need a worker. It ends
when the API process does (multiprocessing closes its lifeline pipe).
"""

from __future__ import annotations

import signal

from genserve.library_noise import quiet_library_noise

quiet_library_noise()  # before diffusers is imported, so its import-time warnings stay quiet too

# The classes PipelineSet.load and the embedded model builder reach for; importing them resolves diffusers' and
# transformers' lazy modules now rather than in each worker.
from diffusers import (  # noqa: E402, F401
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # noqa: E402, F401

import genserve.memory_plan  # noqa: E402, F401
import workers.embedded  # noqa: E402, F401
import workers.encoder  # noqa: E402, F401
import workers.loading  # noqa: E402, F401
import workers.main  # noqa: E402, F401
import workers.pipelines  # noqa: E402, F401
import workers.speed  # noqa: E402, F401


def _warm_process_caches() -> None:
    """Fill the caches that the first from_pretrained in a process would fill, so each worker inherits them.

    transformers builds its checkpoint conversion table (about a thousand regular expressions) on first use: ~0.9 s
    of every fresh worker's load otherwise. diffusers imports its guiders lazily on the first pipeline load."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("t5")
    except ImportError:  # another transformers version: nothing to warm, loading works regardless
        pass
    try:
        import diffusers.guiders  # noqa: F401
    except ImportError:
        pass
    try:  # the memory planner instantiates models on the meta device through accelerate
        import accelerate  # noqa: F401
    except ImportError:
        pass


_warm_process_caches()

signal.signal(signal.SIGTERM, signal.SIG_IGN)  # see the module docstring
