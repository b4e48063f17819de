"""LoRA adapters inside a worker: loaded on first use, kept for later jobs, activated per pipeline call.

Two transformers can take adapters: the base one (shared by the text2img, img2img and both ControlNet pipelines)
and the Fill one. An adapter is loaded with diffusers' ``load_lora_weights`` (PEFT) into the pipeline that owns the
transformer, under a name of its own per transformer, and stays loaded: at most ``loras.max_loaded`` per worker,
the least recently used unloaded (``delete_adapters``) to make room. Before each call the job's adapters are made
the active set with their weights (``set_adapters``); a job without LoRAs runs with LoRA layers disabled, which
computes exactly the base layers (PEFT then calls only the wrapped layer), so nothing leaks from one job to the
next.

Fused q/k/v (performance.fuse_qkv): an unquantised transformer's q/k/v projections are views of one fused weight,
and a fused attention reads only the fused one, where no LoRA is. A job with LoRAs therefore runs its attentions
unfused (the separate projections, which carry the adapters; they share the fused storage, so this costs no
memory), and a job without runs fused again.

Every change of what the worker holds is reported (AdaptersChanged), so the supervisor can send a job to a worker
that already holds its adapters.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

from genserve.messages import AdaptersChanged, LoraSettings, LoraUse, Mode, adapter_key, adapter_target

log = logging.getLogger(__name__)


class AdapterLoadError(Exception):
    """A LoRA of the catalogue could not be loaded into the transformer (the job fails; the worker serves on)."""


@dataclass
class _Loaded:
    adapter_name: str  # PEFT's name for it (unique per worker; LoRA names may hold characters PEFT refuses)
    target: str  # "base" or "fill"
    bytes: int  # its weights in memory


class Adapters:
    """The adapters one worker holds, and which are active for the current pipeline call."""

    def __init__(
        self,
        pipes: dict[str, Any],
        settings: LoraSettings,
        report: Callable[[AdaptersChanged], None],
        slot: int,
    ) -> None:
        self._owners = {"base": pipes["text2img"], "fill": pipes.get("fill")}  # the pipeline owning each transformer
        self._settings = settings
        self._report = report
        self._slot = slot
        self._held: OrderedDict[str, _Loaded] = OrderedDict()  # adapter key -> loaded, least recently used first
        self._names = count(1)
        self._loads = 0
        self._unloads = 0
        self._active: dict[str, bool] = {}  # target -> LoRA layers enabled

    def activate(self, mode: Mode, loras: Sequence[LoraUse]) -> None:
        """Make ``loras`` (possibly none) the active adapters of the transformer ``mode`` runs on."""
        target = adapter_target(mode)
        owner = self._owners[target]
        if owner is None or (not loras and not self._held):
            return  # nothing was ever loaded: the model is as it came
        changed = self._load_missing(mode, loras)
        if loras:
            names = [self._held[adapter_key(mode, lora)].adapter_name for lora in loras]
            owner.enable_lora()
            owner.set_adapters(names, [lora.weight for lora in loras])
        elif self._active.get(target, False):
            owner.disable_lora()
        self._active[target] = bool(loras)
        _run_unfused(owner.transformer, unfused=bool(loras))
        if changed:
            self._report_held()

    def _load_missing(self, mode: Mode, loras: Sequence[LoraUse]) -> bool:
        """Load the job's adapters this worker does not hold yet; True when it loaded (or unloaded) any."""
        target = adapter_target(mode)
        wanted = [adapter_key(mode, lora) for lora in loras]
        for key in wanted:
            if key in self._held:
                self._held.move_to_end(key)
        missing = [(key, lora) for key, lora in zip(wanted, loras, strict=True) if key not in self._held]
        if not missing:
            return False
        self._make_room(len(missing), keep=set(wanted))
        for key, lora in missing:
            self._held[key] = self._load(target, lora)
        return True

    def _make_room(self, needed: int, keep: set[str]) -> None:
        """Unload the least recently used adapters (never one the job needs) until ``needed`` more fit."""
        for key in list(self._held):
            if len(self._held) + needed <= self._settings.max_loaded:
                return
            if key in keep:
                continue
            loaded = self._held.pop(key)
            self._owners[loaded.target].delete_adapters([loaded.adapter_name])
            self._unloads += 1
            log.info("unloaded LoRA %s (least recently used; loras.max_loaded=%d)", key, self._settings.max_loaded)

    def _load(self, target: str, lora: LoraUse) -> _Loaded:
        owner = self._owners[target]
        name = f"lora{next(self._names)}"
        before = _adapter_bytes(owner.transformer, name)
        try:
            owner.load_lora_weights(lora.path, adapter_name=name)
        except Exception as exc:
            _forget_partial(owner, name)
            raise AdapterLoadError(f"LoRA '{lora.name}' could not be loaded: {type(exc).__name__}: {exc}") from exc
        self._loads += 1
        loaded = _Loaded(adapter_name=name, target=target, bytes=_adapter_bytes(owner.transformer, name) - before)
        log.info("loaded LoRA %s into the %s transformer (%.1f MiB)", lora.name, target, loaded.bytes / 2**20)
        return loaded

    def _report_held(self) -> None:
        self._report(
            AdaptersChanged(
                slot=self._slot,
                held=tuple(self._held),
                loads=self._loads,
                unloads=self._unloads,
                adapter_bytes=sum(loaded.bytes for loaded in self._held.values()),
            )
        )


def _adapter_bytes(transformer: Any, adapter_name: str) -> int:
    """Bytes of one adapter's weights in ``transformer`` (its lora_A / lora_B parameters)."""
    marker = f".{adapter_name}."
    return sum(
        parameter.numel() * parameter.element_size()
        for name, parameter in transformer.named_parameters()
        if marker in name
    )


def _forget_partial(owner: Any, adapter_name: str) -> None:
    """After a failed load, remove what may have been injected under ``adapter_name``."""
    try:
        owner.delete_adapters([adapter_name])
    except Exception:  # nothing was injected: nothing to remove
        log.debug("no partial adapter %s to remove", adapter_name)


def _run_unfused(transformer: Any, unfused: bool) -> None:
    """Fused attentions read only the fused q/k/v weight; LoRAs sit on the separate projections (views of it)."""
    from workers.speed import fusable_attentions

    for attention in fusable_attentions(transformer):
        if getattr(attention, "to_qkv", None) is not None and hasattr(attention, "to_q"):
            attention.fused_projections = not unfused
