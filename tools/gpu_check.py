"""GPU check: what each memory strategy of GenServe costs on a real card, with full-size FLUX.1-dev shapes.

GenServe plans its device memory before it loads a byte (genserve/memory_plan.py): weights at their planned precision
plus an activation reserve whose factors are estimates. This check puts those estimates against a real card. It
needs no FLUX weights and no network: it builds a random-weight FLUX.1-dev family from the public configs in
genserve/flux_family.py (transformer 11.9 B, Fill transformer 11.9 B, union ControlNet 3.3 B, T5-XXL 4.8 B, CLIP-L,
VAE) directly on the GPU in bf16, saves it in the layout the service loads, then serves it once per memory strategy:

- pinned bf16 (``memory.strategy: pinned``);
- fp8 transformers (``strategy: quantized``, ``auto_quantization: fp8``; torchao);
- nf4 transformers (``quantize: {transformer, fill, controlnet: nf4}``; bitsandbytes);
- text encoders on the CPU (``strategy: offload``, ``offload: text_encoders``).

For each one it starts ``python -m genserve`` on a free port and measures, from the outside:

- planned GiB: the worker's memory plan (GET /status ``workers[0].memory_plan.device_gib``): what it promised. The
  servers accept at most 1024x1024 (``limits.max_size``), so the plan's activation reserve is for the timed job;
- peak GiB: the device's used memory from nvidia-ml, sampled every 50 ms from spawn to stop (the CUDA context and
  everything else on the card included): what it took. Peak above plan means the reserve factors are too small;
- load s: spawn -> GET /ready 200 (server start, memory plan, loading and quantising every model);
- the end-to-end seconds of a 1024x1024, 28-step text2img job as a client sees it (median of the timed runs, after a
  short warm-up at the same size);
- whether a fill and a ControlNet job (512x512, 4 steps) work under that strategy: every pinned mode must.

It prints one markdown table and writes it, with every detail, to gpu_check.md and gpu_check.json in the output
folder (rewritten after each strategy, so a run cut short keeps what it finished). A failing strategy is reported and
the next one runs. Disk is the scarce resource on a 64 GiB box (the family is ~60 GiB in bf16), so the Fill
transformer and the ControlNet are saved as hard links to the base transformer's safetensors shards wherever their
tensors coincide (random weights make them legitimately identical) plus small shards of their own; the family then
takes ~32 GiB on disk. Sizes are in GiB throughout, as the memory plan counts them.

``--tiny`` runs the same code on a CPU in a few minutes: a small family derived from the same configs, a CPU worker,
256x256 and 4 steps, and only what a CPU can run (pinned fp32, int8); the GPU-only strategies are listed as skipped
and the peak is the server processes' resident memory instead of the device's. That is how this script is tested.

Usage: ``tools/gpu_check.sh`` on the GPU box (installs carried wheels, prints the machine, tees the log), or
``python tools/gpu_check.py [--tiny] [--out DIR] [--model-dir DIR] [--strategies pinned,fp8] [--budget-s S]``.
Two more strategies run only when named in --strategies (the default four fill the 8-minute budget):
``offload-model`` (fp8 transformers with model CPU offload: what ``auto`` takes on a 24 GB card) and ``group``
(group offload with CUDA streams).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import requests
from PIL import Image, ImageDraw

from genserve.flux_family import FAMILY

from _server import LocalServer, ServerError

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30  # every size here is in GiB, as the memory plan and nvidia-smi count
STARTED = time.monotonic()
PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"

# --- what runs -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the real check (a CUDA card) and its CPU rehearsal (--tiny)."""

    name: str  # gpu | tiny
    tiny: bool  # build the small family instead of the full-size one
    device: str  # the worker's device (workers.devices)
    dtype: str  # torch dtype the family is built in; the worker serves it in the same (model.dtype: auto)
    size: int  # the timed text2img job is size x size ...
    steps: int  # ... with this many steps
    warmup_steps: int  # the warm-up job: the timed size, this many steps (compiles kernels, sizes the allocator)
    quick_size: int  # the fill and ControlNet jobs: size x size ...
    quick_steps: int  # ... with this many steps
    runs: int  # timed text2img runs; the median is reported
    shard_bytes: int  # largest safetensors shard of the transformer family
    rows: tuple[str, ...]  # strategies in the table, in order (the ones this device cannot run are skipped)
    ready_timeout_s: float  # spawn -> ready, at most (also bounded by the budget)
    job_timeout_s: float  # one job, at most
    budget_s: float  # the whole check; a strategy that cannot finish in what is left is skipped
    min_strategy_s: float  # the least time left in which a strategy is started
    model_dir: str  # where the family is built (reused when complete)
    out_dir: str  # report, logs, and each server's config and results


GPU_PROFILE = Profile(
    name="gpu",
    tiny=False,
    device="cuda:0",
    dtype="bfloat16",
    size=1024,
    steps=28,
    warmup_steps=2,
    quick_size=512,
    quick_steps=4,
    runs=2,
    shard_bytes=5 * GIB,
    rows=("pinned", "fp8", "nf4", "offload-te"),
    ready_timeout_s=300,
    job_timeout_s=300,
    budget_s=450,  # gpu_check.sh adds ~30 s (wheels, versions): about 8 minutes in all
    min_strategy_s=75,  # a strategy takes 1-2 minutes: start one only with at least this much left
    model_dir="/tmp/genserve-gpu-check/model",
    out_dir="/tmp/gpu_check",
)
TINY_PROFILE = Profile(
    name="tiny",
    tiny=True,
    device="cpu",
    dtype="float32",
    size=256,
    steps=4,
    warmup_steps=2,
    quick_size=256,
    quick_steps=4,
    runs=2,
    shard_bytes=64 * 2**10,  # small, so the tiny transformer is split as the real one is
    rows=("pinned", "int8", "fp8", "nf4", "offload-te"),
    ready_timeout_s=240,
    job_timeout_s=120,
    budget_s=900,
    min_strategy_s=20,
    model_dir="/tmp/genserve-gpu-check-tiny/model",
    out_dir="/tmp/gpu_check_tiny",
)
PROFILES = {profile.name: profile for profile in (GPU_PROFILE, TINY_PROFILE)}


@dataclass(frozen=True)
class Strategy:
    """One memory setting to serve the family with: the config's ``memory:`` section."""

    key: str  # short name: table rows, log and folder names
    title: str  # in words; {dtype} is the model dtype
    memory: dict[str, Any]  # config.yaml's memory section
    needs_gpu: bool  # fp8, nf4 and offload run only on a CUDA device


STRATEGIES = {
    strategy.key: strategy
    for strategy in (
        Strategy("pinned", "pinned {dtype}", {"strategy": "pinned"}, needs_gpu=False),
        Strategy("fp8", "fp8 transformers", {"strategy": "quantized", "auto_quantization": "fp8"}, needs_gpu=True),
        Strategy(
            "nf4",
            "nf4 transformers",
            {"strategy": "pinned", "quantize": {"transformer": "nf4", "fill": "nf4", "controlnet": "nf4"}},
            needs_gpu=True,
        ),
        Strategy(
            "offload-te",
            "text encoders on the CPU",
            {"strategy": "offload", "offload": "text_encoders"},
            needs_gpu=True,
        ),
        Strategy("int8", "int8 transformers", {"strategy": "quantized", "auto_quantization": "int8"}, needs_gpu=False),
        # Not in the default run (the 8-minute budget holds four); ask for them with --strategies.
        Strategy(
            "offload-model",
            "fp8 transformers + model CPU offload (auto's 24 GB rung)",
            {
                "strategy": "offload",
                "offload": "model",
                "quantize": {"transformer": "fp8", "fill": "fp8", "controlnet": "fp8"},
            },
            needs_gpu=True,
        ),
        Strategy("group", "group offload (bf16)", {"strategy": "offload", "offload": "group"}, needs_gpu=True),
    )
}
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


def time_left(budget_s: float) -> float:
    return budget_s - (time.monotonic() - STARTED)


# --- the model family on disk ---------------------------------------------------------------------------------------

MODEL_VERSION = 1  # bump when the files written below change: an older build is then rebuilt, never reused
MARKER = "GPU_CHECK_MODEL.json"
SEED = 20240801
DERIVED = ("fill", "controlnet")  # transformers saved as hard links to the base transformer's shards plus their own
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TEXT_STACK = ("text_encoder", "text_encoder_2", "vae")

# The tiny family: the public configs with a few blocks and small widths (the embedded model's widths). The base has
# two blocks of each kind and the ControlNet one, so the ControlNet shares some of the base's shards, as the real
# one does (5 of 19 double and 10 of 38 single blocks).
_TINY_FLUX = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 6, 6],
}
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "transformer": {**_TINY_FLUX, "num_layers": 2, "num_single_layers": 2},
    "fill": {**_TINY_FLUX, "num_layers": 2, "num_single_layers": 2},
    "controlnet": {**_TINY_FLUX, "num_layers": 1, "num_single_layers": 1},
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    },
    "text_encoder_2": {
        "d_model": 32,
        "d_ff": 64,
        "d_kv": 8,
        "num_heads": 4,
        "num_layers": 1,
        "num_decoder_layers": 1,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
    },
    "vae": {
        "block_out_channels": [4, 8, 16, 16],
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "mid_block_add_attention": False,
    },
}


class BuildError(Exception):
    """The family cannot be built here (too little disk, most likely); the message says what to do."""


@dataclass(frozen=True)
class ModelFolders:
    """Where the family lives: the folders model.path, fill.path and controlnet.path point at."""

    root: Path

    @property
    def base(self) -> Path:  # FluxPipeline.save_pretrained layout
        return self.root / "base"

    @property
    def fill(self) -> Path:  # a FLUX.1-Fill-dev repo: the transformer in transformer/
        return self.root / "fill"

    @property
    def controlnet(self) -> Path:
        return self.root / "controlnet"

    def transformer(self, name: str) -> Path:
        return {"transformer": self.base / "transformer", "fill": self.fill / "transformer"}.get(name, self.controlnet)


def family_configs(tiny: bool) -> dict[str, dict[str, Any]]:
    configs = copy.deepcopy(FAMILY)
    if tiny:
        for name, overrides in TINY_OVERRIDES.items():
            configs[name].update(overrides)
    return configs


def with_token_ids(configs: dict[str, dict[str, Any]], clip_tokenizer: Any, t5_tokenizer: Any) -> None:
    """The text encoders' special token ids, from the tokenizers they will be served with (CLIP pools at its EOS)."""
    configs["text_encoder"].update(
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    configs["text_encoder_2"].update(
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
    )


def make_tokenizers() -> tuple[Any, Any]:
    """The embedded model's CLIP and T5 tokenizers (model_max_length 77 and 512), made in code."""
    from workers.embedded import make_clip_tokenizer, make_t5_tokenizer

    with tempfile.TemporaryDirectory(prefix="gpu-check-tok-") as scratch:
        clip = make_clip_tokenizer(Path(scratch))
    return clip, make_t5_tokenizer()


def instantiate(config: dict[str, Any]) -> Any:
    """The model a config describes, with random weights, on the current torch device and default dtype."""
    class_name = config.get("_class_name")
    if class_name:
        import diffusers

        return getattr(diffusers, class_name).from_config(config).eval()
    import transformers

    fields = {key: value for key, value in config.items() if key not in ("architectures", "model_type")}
    model_class = getattr(transformers, config["architectures"][0])
    return model_class(transformers.AutoConfig.for_model(config["model_type"], **fields)).eval()


@contextlib.contextmanager
def building_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """New tensors are created on ``device`` in ``dtype``: nothing is materialised in fp32 on the host first."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def model_bytes(model: Any) -> int:
    return sum(tensor_bytes(parameter) for parameter in model.parameters())  # tied parameters count once


@dataclass(frozen=True)
class Shard:
    """One safetensors file of the base transformer."""

    names: tuple[str, ...]  # the tensors in it
    sharers: frozenset[str]  # the derived models (fill, controlnet) that load this very file, hard-linked
    nbytes: int


def _same_tensor(candidate: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    return candidate is not None and candidate.shape == tensor.shape and candidate.dtype == tensor.dtype


def _chunks(names: list[str], state: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """``names`` in order, cut into runs of at most ``max_bytes`` (a larger tensor gets a file of its own)."""
    chunks: list[list[str]] = []
    size = 0
    for name in names:
        nbytes = tensor_bytes(state[name])
        if not chunks or (size + nbytes > max_bytes and chunks[-1]):
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += nbytes
    return chunks


def plan_shards(
    base: Mapping[str, torch.Tensor], derived: Mapping[str, Mapping[str, torch.Tensor]], max_bytes: int
) -> list[Shard]:
    """The base transformer's shards, such that each derived model can hard-link whole files.

    Each module of the base (x_embedder, one block's attention, ...) is grouped by the derived models that have the
    same tensors under the same names (same shapes and dtype): the Fill transformer every module but x_embedder,
    whose input is 384 wide; the ControlNet its embedders and its first 5 double and 10 single blocks. Each group is
    cut into files of at most max_bytes, so a file holds only tensors that every model linking it loads and no model
    meets a tensor it does not know. The x_embedder, the one module the Fill transformer does not share, ends up in
    a small file of its own.
    """
    modules: dict[str, list[str]] = {}
    for name in base:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    groups: dict[frozenset[str], list[str]] = {}
    for names in modules.values():
        sharers = frozenset(
            model for model, state in derived.items() if all(_same_tensor(state.get(n), base[n]) for n in names)
        )
        groups.setdefault(sharers, []).extend(names)
    shards: list[Shard] = []
    for sharers, names in groups.items():
        for chunk in _chunks(names, base, max_bytes):
            shards.append(Shard(tuple(chunk), sharers, sum(tensor_bytes(base[name]) for name in chunk)))
    return shards


def own_tensors(name: str, state: Mapping[str, torch.Tensor], shards: list[Shard]) -> list[str]:
    """A derived model's tensors that none of the base shards it links holds: they go into files of its own."""
    linked = {tensor for shard in shards if name in shard.sharers for tensor in shard.names}
    return [tensor for tensor in state if tensor not in linked]


def shard_filename(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


def save_shard(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """One safetensors file; tensors go to the host one shard at a time."""
    from safetensors.torch import save_file

    save_file(
        {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(path), {"format": "pt"}
    )


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_base_transformer(model: Any, shards: list[Shard], folder: Path) -> list[Path]:
    """config.json, the shards and their index, in diffusers' sharded-checkpoint layout; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    state = model.state_dict()
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        path = folder / shard_filename(number, len(shards))
        save_shard(path, {name: state[name] for name in shard.names})
        weight_map.update(dict.fromkeys(shard.names, path.name))
        paths.append(path)
    write_index(folder, weight_map, sum(shard.nbytes for shard in shards))
    return paths


def write_derived_transformer(
    name: str, model: Any, shards: list[Shard], base_paths: list[Path], folder: Path, max_bytes: int
) -> int:
    """config.json, hard links to the base shards it shares, its own tensors in new shards; returns bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    state = model.state_dict()
    linked = [(shard, path) for shard, path in zip(shards, base_paths, strict=True) if name in shard.sharers]
    own = _chunks(own_tensors(name, state, shards), state, max_bytes)
    count = len(linked) + len(own)
    weight_map: dict[str, str] = {}
    total = written = 0
    for number, (shard, path) in enumerate(linked, start=1):
        target = folder / shard_filename(number, count)
        os.link(path, target)
        weight_map.update(dict.fromkeys(shard.names, target.name))
        total += shard.nbytes
    for number, names in enumerate(own, start=len(linked) + 1):
        target = folder / shard_filename(number, count)
        save_shard(target, {tensor: state[tensor] for tensor in names})
        weight_map.update(dict.fromkeys(names, target.name))
        nbytes = sum(tensor_bytes(state[tensor]) for tensor in names)
        total += nbytes
        written += nbytes
    write_index(folder, weight_map, total)
    return written


def disk_free_bytes(path: Path) -> int:
    existing = path
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_disk(root: Path, needed: int) -> None:
    free = disk_free_bytes(root)
    say(f"disk: the family needs {needed / GIB:.1f} GiB at {root}; {free / GIB:.1f} GiB free")
    if needed > free:
        raise BuildError(
            f"the disk is too small: the model family needs {needed / GIB:.1f} GiB at {root} (already sharing the "
            f"Fill and ControlNet shards with the base), but only {free / GIB:.1f} GiB is free there; free some "
            "space or pass --model-dir on a larger disk"
        )


def planned_disk_bytes(
    configs: dict[str, dict[str, Any]], dtype: torch.dtype, max_bytes: int
) -> tuple[int, list[Shard]]:
    """Bytes the family will take on disk and the base transformer's shard plan, from models on the meta device."""
    with building_on("meta", dtype):
        states = {name: instantiate(configs[name]).state_dict() for name in ("transformer", *DERIVED)}
        text_stack = sum(model_bytes(instantiate(configs[name])) for name in TEXT_STACK)
    shards = plan_shards(states["transformer"], {name: states[name] for name in DERIVED}, max_bytes)
    derived_own = sum(
        tensor_bytes(states[name][tensor]) for name in DERIVED for tensor in own_tensors(name, states[name], shards)
    )
    slack = 64 * 2**20  # configs, tokenizers, safetensors headers
    return sum(shard.nbytes for shard in shards) + derived_own + text_stack + slack, shards


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_base(
    folders: ModelFolders, configs: dict[str, dict[str, Any]], tokenizers: tuple[Any, Any], shards: list[Shard]
) -> tuple[dict[str, int], list[Path]]:
    """base/: the text encoders, the VAE, the scheduler, the tokenizers and model_index.json as
    FluxPipeline.save_pretrained writes them, the transformer as planned shards. Returns parameter counts and the
    shard paths."""
    from diffusers import FluxPipeline

    from workers.embedded import make_scheduler

    say("building the text encoders, the VAE and the transformer")
    pipe = FluxPipeline(
        scheduler=make_scheduler(),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        transformer=instantiate(configs["transformer"]),
        **{name: instantiate(configs[name]) for name in TEXT_STACK},
    )
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", *TEXT_STACK)}
    folders.base.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folders.base)  # model_index.json: what FluxPipeline.save_pretrained writes
    for name in ("scheduler", "tokenizer", "tokenizer_2", *TEXT_STACK):
        getattr(pipe, name).save_pretrained(folders.base / name)
    say(f"saved the text encoders and the VAE; writing the transformer as {len(shards)} shard(s)")
    return params, write_base_transformer(pipe.transformer, shards, folders.transformer("transformer"))


def build_derived(
    name: str,
    config: dict[str, Any],
    folders: ModelFolders,
    shards: list[Shard],
    base_paths: list[Path],
    max_bytes: int,
) -> int:
    """The Fill transformer or the ControlNet: built whole, saved as links to the base's shards plus its own tensors.
    Returns its parameter count."""
    model = instantiate(config)
    written = write_derived_transformer(name, model, shards, base_paths, folders.transformer(name), max_bytes)
    say(f"saved {name}: {written / 2**20:.1f} MiB of its own, the rest hard-linked to the base's shards")
    return sum(p.numel() for p in model.parameters())


def build_family(profile_name: str, root_text: str, started: float) -> dict[str, Any]:
    """Build the whole family on the profile's device and save it under root. Runs in a child process, so the
    parent never holds a CUDA context and the card is empty (context included) once this returns."""
    global STARTED
    STARTED = started  # the child's log lines count from the parent's start too (one monotonic clock)
    from genserve.library_noise import quiet_library_noise

    quiet_library_noise()  # before diffusers is imported
    import torch

    from workers.embedded import quiet_build

    profile = PROFILES[profile_name]
    folders = ModelFolders(Path(root_text))
    dtype = getattr(torch, profile.dtype)
    device = "cuda" if profile.device.startswith("cuda") else "cpu"
    began = time.monotonic()
    with quiet_build():
        tokenizers = make_tokenizers()
        configs = family_configs(profile.tiny)
        with_token_ids(configs, *tokenizers)
        needed, shards = planned_disk_bytes(configs, dtype, profile.shard_bytes)
        check_disk(folders.root, needed)
        torch.manual_seed(SEED)
        with building_on(device, dtype):
            params, base_paths = build_base(folders, configs, tokenizers, shards)
            free_device_memory()
            for name in DERIVED:
                params[name] = build_derived(name, configs[name], folders, shards, base_paths, profile.shard_bytes)
                free_device_memory()
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    info = {
        "version": MODEL_VERSION,
        "profile": profile.name,
        "dtype": profile.dtype,
        "params_b": {name: round(count / 1e9, 3) for name, count in params.items()},
        "disk_gib": round(needed / GIB, 2),
        "build_s": round(time.monotonic() - began, 1),
        "build_device": device,
        "build_device_peak_gib": round(peak, 1) if peak is not None else None,
    }
    (folders.root / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def ensure_family(profile: Profile, root: Path, rebuild: bool) -> dict[str, Any]:
    """The family at root: reused when a complete build of this profile is there, else built in a child process."""
    marker = root / MARKER
    with contextlib.suppress(OSError, ValueError):
        info: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
        if not rebuild and info.get("version") == MODEL_VERSION and info.get("profile") == profile.name:
            say(f"reusing the {profile.name} model family at {root} (--rebuild to build it again)")
            return {**info, "reused": True}
    if root.exists():
        shutil.rmtree(root)
    say(f"building the {profile.name} model family at {root}")
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        info = pool.submit(build_family, profile.name, str(root), STARTED).result()
    say(f"model family built in {info['build_s']:.0f} s: {info['disk_gib']:.1f} GiB on disk")
    return {**info, "reused": False}


# --- memory as seen from outside the server ------------------------------------------------------------------------


def nvml_index(device: str) -> int:
    """nvidia-ml's index of a cuda:N device (CUDA_VISIBLE_DEVICES may renumber them)."""
    ordinal = int(device.partition(":")[2] or 0)
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if visible and all(part.isdigit() for part in visible) and ordinal < len(visible):
        return int(visible[ordinal])
    return ordinal


def device_memory_reader(device: str) -> Callable[[], int]:
    """Bytes used on the whole card, every process and context included (nvidia-ml: no CUDA context of our own)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device))
    return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (the CPU stand-in for device memory)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class PeakSampler:
    """Samples a memory reading on a thread (every 50 ms) and keeps the highest."""

    def __init__(self, read: Callable[[], int], interval_s: float = 0.05) -> None:
        self._read = read
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-check-sampler", daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a process vanishing mid-read is not an error
                self.peak = max(self.peak, self._read())
            if self._stop.wait(self._interval_s):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# --- one server ----------------------------------------------------------------------------------------------------


def server_config(profile: Profile, strategy: Strategy, folders: ModelFolders, results: Path) -> dict[str, Any]:
    """The config.yaml of one strategy's server (tools/_server.py adds the host and a free port)."""
    return {
        "server": {"log_level": "info", "shutdown_grace_s": 5},
        "model": {"path": str(folders.base)},
        "fill": {"path": str(folders.fill)},
        "controlnet": {"path": str(folders.controlnet)},
        "workers": {"devices": [profile.device], "shutdown_timeout_s": 5},
        "memory": strategy.memory,
        "results": {"dir": str(results)},
        # The largest output is the timed job's size, so the plan's activation reserve is for the very job that is
        # measured: planned and peak then compare like with like.
        "limits": {"max_size": profile.size},
        "defaults": {"width": profile.size, "height": profile.size},
    }


def worker_status(server: LocalServer) -> dict[str, Any]:
    with contextlib.suppress(requests.RequestException, ValueError, IndexError, KeyError):
        return dict(server.status()["workers"][0])
    return {}


def server_pid(server: LocalServer) -> int:
    return server.process.pid if server.process else 0


# --- jobs ----------------------------------------------------------------------------------------------------------


@dataclass
class JobOutcome:
    kind: str  # warm-up, text2img, fill, controlnet
    ok: bool
    seconds: float  # end to end, as the client sees it
    pipeline_s: float | None  # the worker's own figure (timings.pipeline_s)
    error: str | None


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def picture(size: int) -> Image.Image:
    gradient = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", (gradient, gradient.rotate(90), gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def centre_mask(size: int) -> Image.Image:
    """White (repaint) in the middle, black around it."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def edge_map(size: int) -> Image.Image:
    """White outlines on black, as a canny ControlNet expects."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 8, size // 4, size // 2, 7 * size // 8), outline=(255, 255, 255), width=2)
    draw.ellipse((size // 2, size // 8, 7 * size // 8, size // 2), outline=(255, 255, 255), width=2)
    return image


def job_fields(kind: str, size: int, steps: int, timeout_s: float) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "prompt": PROMPT,
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": 42,
        "timeout": timeout_s,
    }
    if kind == "fill":
        fields.update(mode="fill", input_image=png_base64(picture(size)), mask_image=png_base64(centre_mask(size)))
    elif kind == "controlnet":
        fields.update(mode="controlnet", control_image=png_base64(edge_map(size)), controlnet_type="canny")
    return fields


def run_job(server: LocalServer, kind: str, fields: dict[str, Any], timeout_s: float) -> JobOutcome:
    began = time.perf_counter()
    try:
        response = requests.post(server.url + "/generate", json=fields, timeout=timeout_s + 30)
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        return JobOutcome(kind, False, time.perf_counter() - began, None, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - began
    ok = response.status_code == 200 and bool(body.get("success"))
    error = None if ok else f"HTTP {response.status_code} {body.get('error_type')}: {body.get('error')}"
    pipeline_s = (body.get("timings") or {}).get("pipeline_s")
    outcome = JobOutcome(kind, ok, round(seconds, 3), pipeline_s, error)
    say(f"  {kind:<10} {'ok' if ok else 'FAILED'} in {seconds:6.2f} s" + (f": {error}" if error else ""))
    return outcome


def run_jobs(server: LocalServer, profile: Profile, job_timeout_s: float) -> list[JobOutcome]:
    """Warm-up, the timed text2img runs, one fill and one ControlNet job; stops early when the server is gone."""
    plan = [("warm-up", profile.size, profile.warmup_steps)]
    plan += [("text2img", profile.size, profile.steps)] * profile.runs
    plan += [("fill", profile.quick_size, profile.quick_steps), ("controlnet", profile.quick_size, profile.quick_steps)]
    outcomes: list[JobOutcome] = []
    for kind, size, steps in plan:
        fields = job_fields("text2img" if kind == "warm-up" else kind, size, steps, job_timeout_s)
        outcome = run_job(server, kind, fields, job_timeout_s)
        outcomes.append(outcome)
        if not outcome.ok and not server_ready(server):
            outcomes.append(JobOutcome("rest", False, 0.0, None, "the server is no longer ready: jobs left out"))
            break
    return outcomes


def server_ready(server: LocalServer) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(f"{server.url}/ready", timeout=5).status_code == 200
    return False


# --- one strategy --------------------------------------------------------------------------------------------------


@dataclass
class StrategyResult:
    key: str
    title: str
    memory: dict[str, Any]  # the config's memory section
    status: str = "skipped"  # ok | failed | skipped
    error: str | None = None
    plan: dict[str, Any] | None = None  # the worker's memory plan, as /status shows it
    load_s: float | None = None  # spawn -> ready, client side
    worker_load_s: float | None = None  # the worker's own loading time (/status load_time_s)
    baseline_gib: float | None = None  # memory in use before the server started
    peak_gib: float | None = None  # the highest reading while it ran
    released: bool | None = None  # the device was back at its baseline after the stop
    jobs: list[JobOutcome] = field(default_factory=list)
    server_log: str | None = None

    def timed_seconds(self) -> list[float]:
        return [job.seconds for job in self.jobs if job.kind == "text2img" and job.ok]

    def mode_ok(self, kind: str) -> bool | None:
        outcomes = [job.ok for job in self.jobs if job.kind == kind]
        return all(outcomes) if outcomes else None


def run_strategy(
    profile: Profile,
    strategy: Strategy,
    folders: ModelFolders,
    out: Path,
    budget_s: float,
    device_memory: Callable[[], int] | None,
) -> StrategyResult:
    """Serve the family with one strategy and measure it; never raises (a failure is the result's error)."""
    result = StrategyResult(strategy.key, title_of(strategy, profile), strategy.memory)
    # The server's config, log and results sit three folders down; the top of out keeps the report and a copy of
    # each server's log.
    workdir = out / "runs" / strategy.key / "server"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    server = LocalServer(workdir, server_config(profile, strategy, folders, workdir / "results"))
    log_copy = out / f"server-{strategy.key}.log"
    result.server_log = str(log_copy)

    def read_memory() -> int:
        return device_memory() if device_memory else process_tree_rss(server_pid(server))

    result.baseline_gib = round(read_memory() / GIB, 2)
    say(f"strategy {strategy.key} ({result.title}): starting the server on port {server.port}")
    with PeakSampler(read_memory) as sampler:
        try:
            ready_timeout_s = max(10.0, min(profile.ready_timeout_s, time_left(budget_s) - 30))
            result.load_s = round(server.start(ready_timeout_s), 1)
            worker = worker_status(server)
            result.plan, result.worker_load_s = worker.get("memory_plan"), worker.get("load_time_s")
            say(f"  ready in {result.load_s:.1f} s; plan: {describe_plan(result.plan)}")
            job_timeout_s = max(30.0, min(profile.job_timeout_s, time_left(budget_s)))
            result.jobs = run_jobs(server, profile, job_timeout_s)
            failed = [f"{job.kind}: {job.error}" for job in result.jobs if not job.ok]
            result.status = "failed" if failed else "ok"
            result.error = "; ".join(failed) or None
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the next strategy runs
            result.status = "failed"
            result.error = str(exc) if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            result.plan = result.plan or worker_status(server).get("memory_plan")
            say(f"  FAILED: {result.error}")
            say(f"  last lines of {log_copy}:\n{indent(server.log_tail())}")
        finally:
            server.stop()
            with contextlib.suppress(OSError):
                shutil.copyfile(server.log_path, log_copy)
    result.peak_gib = round(sampler.peak / GIB, 2)
    if device_memory is not None:
        result.released = wait_released(device_memory, result.baseline_gib)
    say(f"  stopped; peak {result.peak_gib:.2f} GiB")
    return result


def wait_released(device_memory: Callable[[], int], baseline_gib: float, timeout_s: float = 60) -> bool:
    """Until the card is back (within 0.5 GiB) at what it used before the server started."""
    deadline = time.monotonic() + timeout_s
    while device_memory() / GIB > baseline_gib + 0.5:
        if time.monotonic() > deadline:
            say(f"  the device still holds {device_memory() / GIB:.1f} GiB {timeout_s:.0f} s after the stop")
            return False
        time.sleep(0.5)
    return True


def indent(text: str) -> str:
    return "\n".join(f"    | {line}" for line in text.splitlines())


def title_of(strategy: Strategy, profile: Profile) -> str:
    return strategy.title.format(dtype=DTYPE_NAMES.get(profile.dtype, profile.dtype))


def describe_plan(plan: dict[str, Any] | None) -> str:
    if not plan:
        return "none reported"
    return f"{plan.get('setting')}, {cell(planned_gib(plan), 2)} GiB of {plan.get('device_available_gib')} GiB"


def planned_gib(plan: dict[str, Any] | None) -> float | None:
    """The plan's device memory in GiB (MemoryPlan.as_dict gave GB, 1e9 bytes, before it moved to GiB)."""
    if not plan:
        return None
    if plan.get("device_gib") is not None:
        return float(plan["device_gib"])
    return float(plan["device_gb"]) * 1e9 / GIB if plan.get("device_gb") is not None else None


# --- the report ----------------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in ("torch", "diffusers", "transformers", "accelerate", "torchao", "bitsandbytes", "fastapi"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def machine(profile: Profile) -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1)}
    if not profile.tiny:
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(profile.device))
            info["gpu"] = pynvml.nvmlDeviceGetName(handle)
            info["gpu_memory_gib"] = round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 1)
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    return info


def cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mode_cell(ok: bool | None) -> str:
    return "—" if ok is None else ("ok" if ok else "FAILED")


def markdown_table(profile: Profile, results: list[StrategyResult]) -> str:
    peak = "peak GiB (device, nvidia-ml)" if not profile.tiny else "peak GiB (server RSS)"
    timed = f"{profile.size}²×{profile.steps} s"
    header = ["strategy", "plan setting", "planned GiB", peak, "load s", timed, "fill", "controlnet", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        timings = result.timed_seconds()
        row = [
            f"{result.key} ({result.title})",
            (result.plan or {}).get("setting") or "—",
            cell(planned_gib(result.plan), 2),
            cell(result.peak_gib if result.status != "skipped" else None, 2),
            cell(result.load_s),
            cell(statistics.median(timings), 2) if timings else "—",
            mode_cell(result.mode_ok("fill")),
            mode_cell(result.mode_ok("controlnet")),
            (result.error or "").replace("|", "/").replace("\n", " ")[:300] or "—",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(
    out: Path, profile: Profile, results: list[StrategyResult], model: dict[str, Any] | None, note: str | None
) -> str:
    table = markdown_table(profile, results)
    host = machine(profile)
    what = f"{host['gpu']}, {host.get('gpu_memory_gib')} GiB" if "gpu" in host else f"{host['cpus']} CPUs"
    lines = [
        f"# GenServe GPU check ({profile.name}): {what}",
        "",
        f"versions: {', '.join(f'{k} {v}' for k, v in versions().items() if v)}",
        "",
        table,
        "",
        f"Timed job: text2img {profile.size}x{profile.size}, {profile.steps} steps, median of {profile.runs} "
        f"(end to end, client side, after a {profile.warmup_steps}-step warm-up); fill and controlnet: "
        f"{profile.quick_size}x{profile.quick_size}, {profile.quick_steps} steps. Load: spawn to /ready. "
        f"Planned: the worker's memory plan; the servers accept at most {profile.size}x{profile.size} "
        "(limits.max_size), so its activation reserve is for the timed job. "
        + (
            "Peak: nvidia-ml's used memory of the whole device, CUDA context included, sampled every 50 ms."
            if not profile.tiny
            else "Peak: resident memory of the server's processes, summed (shared pages count twice)."
        ),
    ]
    if note:
        lines += ["", note]
    markdown = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(markdown, encoding="utf-8")
    payload = {
        "profile": asdict(profile),
        "machine": host,
        "versions": versions(),
        "model": model,
        "note": note,
        "strategies": [asdict(result) for result in results],
    }
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return table


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="a small family on the CPU: the rehearsal of this check")
    parser.add_argument("--out", type=Path, default=None, help="report, logs and server files (default: by profile)")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the family is built (default: by profile)")
    parser.add_argument("--rebuild", action="store_true", help="build the family even if a complete one is there")
    parser.add_argument("--strategies", default="", help=f"comma-separated, of: {', '.join(STRATEGIES)}")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds for the whole check (default: by profile)"
    )
    return parser.parse_args(argv)


def selected_rows(profile: Profile, names: str) -> list[Strategy]:
    keys = [key.strip() for key in names.split(",") if key.strip()] or list(profile.rows)
    unknown = [key for key in keys if key not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies: {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
    return [STRATEGIES[key] for key in keys]


def give_up(out: Path, profile: Profile, results: list[StrategyResult], reason: str) -> int:
    """Nothing can be measured: every row says why, and the report is written all the same."""
    say(reason)
    for result in results:
        result.error = f"not run: {reason}"
    print(write_report(out, profile, results, None, reason), flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = TINY_PROFILE if args.tiny else GPU_PROFILE
    out = (args.out or Path(profile.out_dir)).resolve()
    folders = ModelFolders((args.model_dir or Path(profile.model_dir)).resolve())
    budget_s = args.budget_s or profile.budget_s
    out.mkdir(parents=True, exist_ok=True)
    rows = selected_rows(profile, args.strategies)
    results = [StrategyResult(s.key, title_of(s, profile), s.memory) for s in rows]
    say(f"profile {profile.name}: {len(rows)} strategies, budget {budget_s:.0f} s, report in {out}")

    try:
        device_memory = None if profile.tiny else device_memory_reader(profile.device)
    except Exception as exc:  # noqa: BLE001 - no nvidia-ml, no device: nothing here can be measured
        return give_up(out, profile, results, f"cannot read {profile.device}'s memory through nvidia-ml: {exc!r}")
    try:
        model = ensure_family(profile, folders.root, args.rebuild)
    except Exception as exc:  # noqa: BLE001 - BuildError or whatever the child raised: report it, run nothing
        return give_up(
            out,
            profile,
            results,
            f"the model family could not be built: {exc if isinstance(exc, BuildError) else repr(exc)}",
        )

    for index, strategy in enumerate(rows):
        if strategy.needs_gpu and profile.tiny:
            results[index].error = "skipped: needs a CUDA GPU"
        elif time_left(budget_s) < profile.min_strategy_s:
            results[index].error = f"skipped: the {budget_s:.0f} s budget is spent (--budget-s)"
        else:
            results[index] = run_strategy(profile, strategy, folders, out, budget_s, device_memory)
        write_report(out, profile, results, model, None)

    table = write_report(out, profile, results, model, None)
    say(f"done; report in {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    print("\n" + table, flush=True)
    ran = [result for result in results if result.status != "skipped"]
    return 0 if ran and all(result.status == "ok" for result in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
