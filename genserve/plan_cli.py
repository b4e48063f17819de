"""``python -m genserve plan --memory-gb N [N …] [--config PATH]``: the memory plan a worker would make on an N-GB card.

For the configured model (its folders' config.json files, no weight read) or, when no weights are configured, for
the standard FLUX.1-dev family (genserve.flux_family's public configs), so a team can size hardware before buying
it. Touches no GPU. Prints, per card, the plan the configured memory strategy takes and the whole auto ladder; exits
0 when every card fits, 1 when one does not, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import sys

from genserve.config import Config, ConfigError, expand_path, load_config, resolve_config_path
from genserve.memory_plan import (
    GIB,
    TORCH_DTYPE_NAMES,
    ComponentShape,
    PlanError,
    card_device_info,
    component_folders,
    describe,
    enabled_components,
    plan_ladder,
    plan_memory,
    shapes_from_family,
    shapes_from_folders,
)
from genserve.messages import MemoryPlan


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="genserve plan",
        description="Print the memory plan GenServe's workers would make on cards of the given sizes (no GPU used).",
    )
    parser.add_argument(
        "--memory-gb",
        type=float,
        nargs="+",
        required=True,
        metavar="N",
        help="card memory in GB as sold (GiB: 24 for an RTX 4090, 80 for an H100, 141 for an H200); several allowed",
    )
    parser.add_argument("--config", metavar="PATH", help="config file (default: as the server finds it)")
    parser.add_argument(
        "--no-fp8",
        action="store_true",
        help="the card has no fp8 (compute capability below 8.9: A100, A6000, RTX 3090); auto quantises int8",
    )
    parser.add_argument(
        "--host-memory-gb",
        type=float,
        default=0.0,
        metavar="N",
        help="host memory per worker for offloaded models; default: not checked (the host need is printed)",
    )
    return parser.parse_args(argv)


def _shapes(config: Config) -> tuple[dict[str, ComponentShape], str]:
    modes, _notes = config.served_modes()
    if config.uses_embedded_model:
        from genserve.flux_family import FAMILY_NAME

        return shapes_from_family(enabled_components(modes)), FAMILY_NAME
    folders = component_folders(
        expand_path(config.model.path),
        expand_path(config.fill.path) if "fill" in modes else None,
        expand_path(config.controlnet.path) if "controlnet" in modes else None,
        redux_path=expand_path(config.redux.path) if "redux" in modes else None,
    )
    return shapes_from_folders(folders), f"the configured model at {config.model.path}"


def _ladder_table(rungs: list[MemoryPlan], chosen: MemoryPlan) -> str:
    lines = ["  the auto ladder on this card:"]
    for rung in rungs:
        mark = "->" if rung.setting == chosen.setting and chosen.strategy == "auto" else "  "
        verdict = "fits" if rung.fits else "no"
        lines.append(
            f"  {mark} {rung.setting:<62} device {rung.device_bytes / GIB:6.1f} GiB  "
            f"host {rung.host_bytes / GIB:5.1f} GiB  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    try:
        config = load_config(resolve_config_path(args.config))
        shapes, source = _shapes(config)
    except (ConfigError, PlanError) as exc:
        print(f"genserve plan: {exc}", file=sys.stderr)
        return 2
    settings = config.memory_settings()
    dtype = TORCH_DTYPE_NAMES.get(config.model.dtype, "bf16")  # auto: bf16, as on any CUDA card
    print(f"planning for {source}; memory.strategy: {settings.strategy}; largest output {settings.max_width}²")
    every_card_fits = True
    for memory_gb in args.memory_gb:
        device = card_device_info(memory_gb, fp8=not args.no_fp8, host_gb=args.host_memory_gb)
        plan = plan_memory(settings, shapes, device, dtype)
        every_card_fits &= plan.fits
        print()
        print(describe(plan))
        print(_ladder_table(plan_ladder(settings, shapes, device, dtype), plan))
    return 0 if every_card_fits else 1
