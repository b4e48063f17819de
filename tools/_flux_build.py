"""The random-weight FLUX.1-dev family that the GPU check (tools/gpu_check.py) and the GPU benchmark
(tools/bench_gpu.py) serve: built from the public configs in genserve/flux_family.py (transformer 11.9 B, Fill
transformer 11.9 B, union ControlNet 3.3 B, T5-XXL 4.8 B, CLIP-L, VAE), with the same shapes and FLOPs as the real
models, directly on the device in its dtype, and saved in the layout the service loads.

Disk is the scarce resource on a 64 GiB box (the family is ~60 GiB in bf16), so the Fill transformer and the
ControlNet are saved as hard links to the base transformer's safetensors shards wherever their tensors coincide
(random weights make them legitimately identical) plus small shards of their own; the family then takes ~32 GiB on
disk. A build leaves a marker file (GPU_CHECK_MODEL.json) last: a folder with a marker of the same family and
MODEL_VERSION is complete and reused by either tool, so the benchmark after the check does not build it again.

``tiny``: a small family derived from the same configs (a few blocks, small widths), built on the CPU in fp32: the
rehearsal both tools run on a development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from genserve.flux_family import FAMILY

from _measure import GIB, clock_start, device_memory_reader, say, set_started

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    """Which family is built where, and the job both tools time on it: the full-size family on a CUDA card at the
    public FLUX.1-dev record's job (1024x1024, 28 steps), or the tiny one on the CPU at a job a CPU runs quickly."""

    name: str  # gpu | tiny: written in the marker; a build is reused only under the same name
    tiny: bool  # the small family instead of the full-size one
    device: str  # where it is built and served (workers.devices)
    dtype: str  # torch dtype it is built in; the worker serves it in the same (model.dtype: auto)
    shard_bytes: int  # largest safetensors shard of the transformer family
    model_dir: str  # where it is built by default (reused when complete)
    size: int  # the timed text2img job is size x size ...
    steps: int  # ... with this many steps, batch 1


GPU_FAMILY = Family(
    name="gpu",
    tiny=False,
    device="cuda:0",
    dtype="bfloat16",
    shard_bytes=5 * GIB,
    model_dir="/tmp/genserve-gpu-check/model",
    size=1024,
    steps=28,
)
TINY_FAMILY = Family(
    name="tiny",
    tiny=True,
    device="cpu",
    dtype="float32",
    shard_bytes=64 * 2**10,  # small, so the tiny transformer is split as the real one is
    model_dir="/tmp/genserve-gpu-check-tiny/model",
    size=256,
    steps=4,
)
FAMILIES = {family.name: family for family in (GPU_FAMILY, TINY_FAMILY)}
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True, kw_only=True)
class RunProfile:
    """What a tool that serves the family runs on a CUDA card, or in its CPU rehearsal (--tiny): one row of its
    table per setting, each a server of its own, within a time budget."""

    family: Family  # the model family served, where, and the timed job
    runs: int  # timed text2img runs per row; the median is reported
    rows: tuple[str, ...]  # the table's rows, in order (the ones this device cannot run are skipped)
    ready_timeout_s: float  # spawn -> ready, at most (also bounded by the budget)
    job_timeout_s: float  # one job, at most
    budget_s: float  # the whole run, the family build included; a row that cannot finish in what is left is skipped
    min_row_s: float  # the least time left in which a row is started
    out_dir: str  # report, logs, and each server's config and results

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def tiny(self) -> bool:
        return self.family.tiny

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.family.dtype, self.family.dtype)


P = TypeVar("P", bound=RunProfile)


def start_run(args: argparse.Namespace, gpu: P, tiny: P) -> tuple[P, Path, ModelFolders, float]:
    """The profile (--tiny or not), the output folder (made), the family's folders and the budget, from the options
    _measure.add_run_arguments adds."""
    profile = tiny if args.tiny else gpu
    out = (args.out or Path(profile.out_dir)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folders = ModelFolders((args.model_dir or Path(profile.family.model_dir)).resolve())
    return profile, out, folders, args.budget_s or profile.budget_s


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


def build_family(family_name: str, root_text: str, started: float) -> dict[str, Any]:
    """Build the whole family on its device and save it under root. Runs in a child process, so the parent never
    holds a CUDA context and the card is empty (context included) once this returns."""
    set_started(started)  # the child's log lines count from the parent's start too
    from genserve.library_noise import quiet_library_noise

    quiet_library_noise()  # before diffusers is imported
    import torch

    from workers.embedded import quiet_build

    family = FAMILIES[family_name]
    folders = ModelFolders(Path(root_text))
    dtype = getattr(torch, family.dtype)
    device = "cuda" if family.device.startswith("cuda") else "cpu"
    began = time.monotonic()
    with quiet_build():
        tokenizers = make_tokenizers()
        configs = family_configs(family.tiny)
        with_token_ids(configs, *tokenizers)
        needed, shards = planned_disk_bytes(configs, dtype, family.shard_bytes)
        check_disk(folders.root, needed)
        torch.manual_seed(SEED)
        with building_on(device, dtype):
            params, base_paths = build_base(folders, configs, tokenizers, shards)
            free_device_memory()
            for name in DERIVED:
                params[name] = build_derived(name, configs[name], folders, shards, base_paths, family.shard_bytes)
                free_device_memory()
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    info = {
        "version": MODEL_VERSION,
        "profile": family.name,
        "dtype": family.dtype,
        "params_b": {name: round(count / 1e9, 3) for name, count in params.items()},
        "disk_gib": round(needed / GIB, 2),
        "build_s": round(time.monotonic() - began, 1),
        "build_device": device,
        "build_device_peak_gib": round(peak, 1) if peak is not None else None,
    }
    (folders.root / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def ensure_family(family: Family, root: Path, rebuild: bool) -> dict[str, Any]:
    """The family at root: reused when a complete build of this family is there, else built in a child process."""
    marker = root / MARKER
    with contextlib.suppress(OSError, ValueError):
        info: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
        if not rebuild and info.get("version") == MODEL_VERSION and info.get("profile") == family.name:
            say(f"reusing the {family.name} model family at {root} (--rebuild to build it again)")
            return {**info, "reused": True}
    if root.exists():
        shutil.rmtree(root)
    say(f"building the {family.name} model family at {root}")
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        info = pool.submit(build_family, family.name, str(root), clock_start()).result()
    say(f"model family built in {info['build_s']:.0f} s: {info['disk_gib']:.1f} GiB on disk")
    return {**info, "reused": False}


class SetupError(Exception):
    """Nothing can be measured: the device's memory cannot be read, or the family cannot be built."""


def prepare(family: Family, root: Path, rebuild: bool) -> tuple[Callable[[], int] | None, dict[str, Any]]:
    """What a run needs before its first server: a reader of the card's used memory (None on the CPU rehearsal,
    which samples the server's resident memory instead) and the family at root (its marker's content).
    Raises SetupError, whose message says why."""
    try:
        device_memory = None if family.tiny else device_memory_reader(family.device)
    except Exception as exc:  # noqa: BLE001 - no nvidia-ml, no device: nothing here can be measured
        raise SetupError(f"cannot read {family.device}'s memory through nvidia-ml: {exc!r}") from None
    try:
        return device_memory, ensure_family(family, root, rebuild)
    except Exception as exc:  # noqa: BLE001 - BuildError or whatever the child raised: report it, run nothing
        why = exc if isinstance(exc, BuildError) else repr(exc)
        raise SetupError(f"the model family could not be built: {why}") from None
