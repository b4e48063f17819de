"""The LoRA catalogue (API process): which LoRAs exist, what each one is, and whether it fits the served model.

Each ``NAME.safetensors`` in ``loras.dir`` is the LoRA ``NAME``. A LoRA is described from its safetensors header
(``safe_open``: keys, shapes, metadata — no tensor read) when it is already in diffusers/PEFT naming; other formats
(kohya, XLabs, BFL Control, fal Kontext) are converted to diffusers naming by diffusers' own
``FluxLoraLoaderMixin.lora_state_dict``, which needs the tensors. Descriptions are cached per (path, size, mtime),
so a listing reads a file once.

"Fits" means every module the LoRA targets exists as an ``nn.Linear`` of that transformer with the LoRA's in and
out features. The transformers' modules come from their config.json instantiated on the meta device (no weight
read; the technique and helpers of genserve.memory_plan). The base transformer must fit for an upload to be kept;
the Fill transformer is reported as well (a LoRA that adapts ``x_embedder`` fits one and not the other).

Where the model folders come from: ``model.path`` (and ``fill.path``) for a real model; for the embedded test model
the API process builds or reuses it with ``workers.embedded.ensure_embedded_model`` (a few MB, lock-protected
against a worker building it at the same time), on the first call that needs it — never at import or app creation.

Every method blocks (disk, parsing, torch): call them from the thread pool, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from genserve.config import Config, expand_path
from genserve.durable import fsync_dir
from genserve.errors import BadRequest, GenServeError, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Uploads are written here first (same folder, so os.replace is atomic); no listing ever matches the pattern.
TEMP_PREFIX = ".upload-"
TEMP_SUFFIX = ".tmp"
MAX_PROBLEMS_SHOWN = 3


class LoraExists(GenServeError):
    """An upload under a name the catalogue already has, without overwrite."""

    status_code = 409
    error_type = "conflict"


class LoraFileError(BadRequest):
    """A file that is not a usable LoRA: not safetensors, no LoRA weights, unconvertible keys, or no fit."""


@dataclass(frozen=True)
class ModuleShapes:
    """The nn.Linear modules of one transformer: name → (in_features, out_features)."""

    label: str  # "base transformer" / "Fill transformer", for messages
    linears: dict[str, tuple[int, int]]

    def problems(self, targets: dict[str, tuple[int, int]]) -> list[str]:
        found = []
        for module, (in_features, out_features) in sorted(targets.items()):
            expected = self.linears.get(module)
            if expected is None:
                found.append(f"{module} is not a linear layer of the {self.label}")
            elif expected != (in_features, out_features):
                found.append(
                    f"{module} is {expected[0]}→{expected[1]} in the {self.label}, "
                    f"the LoRA's is {in_features}→{out_features}"
                )
        return found


@dataclass(frozen=True)
class LoraInfo:
    """One catalogue entry, as GET /loras shows it (``to_json``)."""

    name: str
    path: Path  # never shown to clients
    bytes: int
    rank: int  # the down/A matrices' rank (their first dimension), the largest if they differ
    format: str  # diffusers | kohya | xlabs | bfl_control | fal_kontext
    target_modules: tuple[str, ...]  # transformer modules in diffusers naming (transformer_blocks.0.attn.to_q)
    text_encoder_modules: tuple[str, ...]  # CLIP text encoder modules it also adapts (not checked for fit)
    fits_transformer: bool
    fits_fill: bool
    embedded: bool  # one of the embedded test model's LoRAs (read-only, listed while the embedded model is served)
    problem: str | None = None  # why it does not fit the base transformer, when it does not
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": self.bytes,
            "rank": self.rank,
            "format": self.format,
            "target_module_count": len(self.target_modules),
            "target_modules": list(self.target_modules),
            "text_encoder_modules": list(self.text_encoder_modules),
            "fits": {"transformer": self.fits_transformer, "fill": self.fits_fill},
            "embedded": self.embedded,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class _Parsed:
    """What a file holds, independent of which transformers it is checked against."""

    rank: int
    format: str
    targets: dict[str, tuple[int, int]]  # transformer module → (in_features, out_features)
    text_encoder_modules: tuple[str, ...]
    metadata: dict[str, str]


def validate_name(name: str) -> str:
    """A catalogue name: letters, digits, '.', '_', '-', starting with a letter or digit; no path parts."""
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not NAME_PATTERN.fullmatch(name):
        raise BadRequest(
            f"invalid LoRA name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param="name",
        )
    return name


# --- reading a file ------------------------------------------------------------------------------------------------


def _detect_format(keys: Iterable[str]) -> str:
    """The key convention, in the order diffusers' FluxLoraLoaderMixin.lora_state_dict tests them."""
    keys = list(keys)
    if any(".lora_down.weight" in key for key in keys):
        return "kohya"
    if any("processor" in key for key in keys):
        return "xlabs"
    if any("query_norm.scale" in key for key in keys):
        return "bfl_control"
    if any("base_model" in key for key in keys):
        return "fal_kontext"
    return "diffusers"


def _is_down(key: str) -> bool:
    return key.endswith(("lora_A.weight", "lora_down.weight", ".down.weight"))


def _read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Keys → shapes and the metadata, from the safetensors header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # type: ignore[no-untyped-call]
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types (and OSError for short files)
        raise LoraFileError(f"not a safetensors file ({exc}); a LoRA must be a .safetensors file") from None
    return shapes, metadata


def _converted_shapes(path: Path, format_name: str) -> dict[str, list[int]]:
    """Load the tensors and convert them to diffusers naming with diffusers' own converter."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from safetensors.torch import load_file

    from genserve.library_noise import quiet_library_noise

    quiet_library_noise()
    tensors = load_file(str(path))
    try:
        converted = FluxLoraLoaderMixin.lora_state_dict(tensors)
    except Exception as exc:  # the converters raise ValueError, AssertionError, KeyError on unexpected layouts
        reason = str(exc).strip() or type(exc).__name__
        raise LoraFileError(f"{format_name}-format LoRA cannot be converted to diffusers naming: {reason}") from None
    return {key: list(value.shape) for key, value in converted.items()}


def parse_lora_file(path: Path) -> _Parsed:
    """Describe a LoRA file; LoraFileError when it is not one this service can use with a FLUX transformer."""
    shapes, metadata = _read_header(path)
    downs = {key: shape for key, shape in shapes.items() if _is_down(key) and len(shape) >= 2}
    if not downs:
        raise LoraFileError(
            "the file holds no LoRA weights (no lora_A/lora_B, lora_down/lora_up or down/up matrices): "
            "is it a full model checkpoint rather than a LoRA?"
        )
    rank = max(shape[0] for shape in downs.values())
    format_name = _detect_format(shapes)
    plain = format_name == "diffusers" and all(
        key.startswith(("transformer.", "text_encoder.")) for key in shapes if "alpha" not in key
    )
    # diffusers naming needs no conversion: the header is enough. Anything else goes through diffusers' converter.
    named = {key: shape for key, shape in shapes.items() if "alpha" not in key} if plain else None
    if named is None:
        named = _converted_shapes(path, format_name)
    return _Parsed(rank=rank, format=format_name, metadata=metadata, **_targets(named))


def _targets(shapes: dict[str, list[int]]) -> dict[str, Any]:
    """diffusers-named LoRA keys → transformer modules with (in, out) features, and text encoder modules."""
    downs: dict[str, list[int]] = {}
    ups: dict[str, list[int]] = {}
    text_encoder: set[str] = set()
    unknown: list[str] = []
    for key, shape in shapes.items():
        prefix, _, rest = key.partition(".")
        for part, table in ((".lora_A.weight", downs), (".lora_B.weight", ups)):
            if rest.endswith(part):
                module = rest[: -len(part)]
                if prefix == "transformer":
                    table[module] = shape
                elif prefix == "text_encoder":
                    text_encoder.add(module)
                else:
                    unknown.append(key)
                break
        else:
            if not key.endswith(".lora_B.bias"):
                unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:MAX_PROBLEMS_SHOWN])
        raise LoraFileError(f"keys this service cannot apply to a FLUX transformer ({len(unknown)}): {shown}")
    if not downs:
        raise LoraFileError("the LoRA adapts no transformer module (text encoder only LoRAs are not supported)")
    targets: dict[str, tuple[int, int]] = {}
    for module, down in downs.items():
        up = ups.get(module)
        if up is None or len(down) != 2 or len(up) != 2 or up[1] != down[0]:
            raise LoraFileError(f"{module}: lora_A {down} and lora_B {up} do not form a LoRA pair")
        targets[module] = (down[1], up[0])
    return {"targets": targets, "text_encoder_modules": tuple(sorted(text_encoder))}


def linear_shapes(config_folder: Path, label: str) -> ModuleShapes:
    """A transformer's nn.Linear modules from its config.json, instantiated on the meta device (no weight read)."""
    import torch

    from genserve.memory_plan import _meta_model, _read_config

    model = _meta_model(_read_config(config_folder))
    linears = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return ModuleShapes(label=label, linears=linears)


# --- the catalogue -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFolders:
    """Where the catalogue finds the served transformers' configs, and the embedded LoRAs when there are any."""

    transformer: Path  # folder with config.json
    fill: Path | None  # None: fill is not served
    embedded_loras: Path | None  # None: a real model is served


def served_folders(config: Config) -> ModelFolders:
    """The served model's folders (builds or reuses the embedded model when model.path is empty)."""
    from genserve.memory_plan import transformer_folder

    modes, _notes = config.served_modes()
    if config.model.path:
        fill = transformer_folder(Path(config.fill.path)) if "fill" in modes and config.fill.path else None
        return ModelFolders(transformer=Path(config.model.path) / "transformer", fill=fill, embedded_loras=None)
    from workers.embedded import ensure_embedded_model

    built = ensure_embedded_model(expand_path(config.model.embedded_cache_dir))
    return ModelFolders(
        transformer=built.base / "transformer",
        fill=built.fill / "transformer" if "fill" in modes else None,
        embedded_loras=built.loras,
    )


class LoraCatalogue:
    """The LoRAs in ``loras.dir`` (plus, with the embedded model, its two read-only LoRAs).

    The embedded LoRAs are read in place from the embedded model's folder rather than copied into ``loras.dir``:
    they belong to the test model (they exist exactly while it is served, and would not fit a real model), they
    never clutter the operator's folder, and they do not vanish once a first LoRA is uploaded. A file in
    ``loras.dir`` with the same name wins over an embedded one. Thread-safe; every method blocks.
    """

    def __init__(
        self, directory: Path, max_upload_bytes: int, folders: ModelFolders | None = None, config: Config | None = None
    ) -> None:
        if folders is None and config is None:
            raise ValueError("give the model folders or the config to find them")
        self.directory = directory
        self.max_upload_bytes = max_upload_bytes
        self._folders = folders
        self._config = config
        self._lock = threading.Lock()  # guards the caches and makes "exists? then write" one step
        self._shapes: tuple[ModuleShapes, ModuleShapes | None] | None = None
        self._cache: dict[Path, tuple[tuple[int, int], LoraInfo | None, str | None]] = {}

    @classmethod
    def from_config(cls, config: Config) -> LoraCatalogue:
        """Folders resolved lazily: the embedded model is built (if need be) by the first call that needs it."""
        return cls(expand_path(config.loras.dir), config.loras.max_upload_bytes, config=config)

    # --- model shapes ---

    def folders(self) -> ModelFolders:
        if self._folders is None:
            assert self._config is not None
            self._folders = served_folders(self._config)
        return self._folders

    def _transformers(self) -> tuple[ModuleShapes, ModuleShapes | None]:
        if self._shapes is None:
            folders = self.folders()
            base = linear_shapes(folders.transformer, "base transformer")
            fill = linear_shapes(folders.fill, "Fill transformer") if folders.fill is not None else None
            self._shapes = (base, fill)
        return self._shapes

    # --- reading ---

    def _files(self) -> dict[str, tuple[Path, bool]]:
        """name → (path, embedded), loras.dir winning over the embedded folder."""
        found: dict[str, tuple[Path, bool]] = {}
        embedded = self.folders().embedded_loras
        for folder, is_embedded in ((embedded, True), (self.directory, False)):
            if folder is None or not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"*{SUFFIX}")):
                name = path.name[: -len(SUFFIX)]
                if not NAME_PATTERN.fullmatch(name):
                    log.warning("ignoring %s: %r is not a valid LoRA name", path, name)
                    continue
                found[name] = (path, is_embedded)
        return found

    def _describe(self, name: str, path: Path, embedded: bool) -> LoraInfo:
        """The cached description of one file; LoraFileError if it cannot be read as a LoRA."""
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            info, error = cached[1], cached[2]
        else:
            try:
                info, error = self._build_info(name, path, embedded, stat.st_size), None
            except LoraFileError as exc:
                info, error = None, exc.message
            with self._lock:
                self._cache[path] = (stamp, info, error)
        if info is None:
            raise LoraFileError(f"LoRA '{name}': {error}")
        return info

    def _build_info(self, name: str, path: Path, embedded: bool, size: int) -> LoraInfo:
        parsed = parse_lora_file(path)
        base, fill = self._transformers()
        base_problems = base.problems(parsed.targets)
        fill_fits = fill is not None and not fill.problems(parsed.targets)
        problem = None
        if base_problems:
            shown = "; ".join(base_problems[:MAX_PROBLEMS_SHOWN])
            more = len(base_problems) - MAX_PROBLEMS_SHOWN
            problem = f"does not fit the base transformer: {shown}" + (f" (and {more} more)" if more > 0 else "")
        return LoraInfo(
            name=name,
            path=path,
            bytes=size,
            rank=parsed.rank,
            format=parsed.format,
            target_modules=tuple(sorted(parsed.targets)),
            text_encoder_modules=parsed.text_encoder_modules,
            fits_transformer=not base_problems,
            fits_fill=fill_fits,
            embedded=embedded,
            problem=problem,
            metadata=parsed.metadata,
        )

    def list(self) -> list[LoraInfo]:
        """Every LoRA, by name. A file that cannot be read as a LoRA is logged and left out."""
        infos = []
        files = self._files()
        for name, (path, embedded) in sorted(files.items()):
            try:
                infos.append(self._describe(name, path, embedded))
            except LoraFileError as exc:
                log.warning("%s is listed in no catalogue answer: %s", path, exc.message)
            except FileNotFoundError:  # removed while listing
                continue
        with self._lock:  # forget descriptions of files that are gone
            live = {path for path, _ in files.values()}
            for path in [path for path in self._cache if path not in live]:
                del self._cache[path]
        return infos

    def get(self, name: str) -> LoraInfo:
        name = validate_name(name)
        files = self._files()
        if name not in files:
            known = ", ".join(sorted(files)) or f"none (put NAME{SUFFIX} files in {self.directory} or POST /loras)"
            raise NotFound(f"no LoRA named '{name}'; available: {known}", param="name")
        path, embedded = files[name]
        return self._describe(name, path, embedded)

    # --- writing ---

    def add(self, name: str, data: bytes, *, overwrite: bool = False) -> LoraInfo:
        """Validate and store ``data`` as ``name`` (atomically: a temp file in the same folder, then os.replace)."""
        if len(data) > self.max_upload_bytes:
            raise self.too_large()
        temp = self.new_temp_file()
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
            return self.add_file(name, temp, overwrite=overwrite)
        finally:
            temp.unlink(missing_ok=True)

    def new_temp_file(self) -> Path:
        """An empty temp file in loras.dir for an upload in progress (the caller removes it if it is not added)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=self.directory)
        os.close(handle)
        return Path(name)

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"LoRA file is larger than the {self.max_upload_bytes / (1024 * 1024):g} MB limit (loras.max_upload_mb)",
            param="file",
        )

    def add_file(self, name: str, temp: Path, *, overwrite: bool = False) -> LoraInfo:
        """Validate ``temp`` (a file in loras.dir, from new_temp_file) and move it into place as ``name``."""
        name = validate_name(name)
        if temp.parent.resolve() != self.directory.resolve():
            raise ValueError(f"{temp} is not in {self.directory}: the final rename would not be atomic")
        size = temp.stat().st_size
        if size > self.max_upload_bytes:
            raise self.too_large()
        target = self.directory / f"{name}{SUFFIX}"
        self._refuse_existing(name, target, overwrite)  # cheap early answer, before parsing
        try:
            parsed_info = replace(self._build_info(name, temp, embedded=False, size=size), path=target)
        except LoraFileError as exc:
            raise LoraFileError(f"'{name}' was not added: {exc.message}", param="file") from None
        if not parsed_info.fits_transformer:
            raise LoraFileError(f"'{name}' was not added: {parsed_info.problem}", param="file")
        os.chmod(temp, 0o644)  # mkstemp makes it 0600; workers may run as another user
        with self._lock:
            self._refuse_existing(name, target, overwrite)
            os.replace(temp, target)
            stat = target.stat()
            self._cache[target] = ((stat.st_size, stat.st_mtime_ns), parsed_info, None)
        fsync_dir(self.directory)
        log.info("LoRA '%s' added (%d bytes, rank %d, %s format)", name, size, parsed_info.rank, parsed_info.format)
        return parsed_info

    def _refuse_existing(self, name: str, target: Path, overwrite: bool) -> None:
        if overwrite:
            return
        if target.exists() or name in self._files():
            raise LoraExists(f"a LoRA named '{name}' already exists; send overwrite=true to replace it", param="name")

    def remove(self, name: str) -> None:
        name = validate_name(name)
        target = self.directory / f"{name}{SUFFIX}"
        with self._lock:
            try:
                target.unlink()
            except FileNotFoundError:
                pass
            else:
                self._cache.pop(target, None)
                log.info("LoRA '%s' removed", name)
                return
        files = self._files()
        if name in files and files[name][1]:
            raise BadRequest(f"'{name}' is one of the embedded test model's LoRAs; it cannot be deleted", param="name")
        raise NotFound(f"no LoRA named '{name}' in {self.directory}", param="name")
