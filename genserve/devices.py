"""Which devices get a worker: the configured list, or every CUDA device, or N CPU workers. API process."""

from __future__ import annotations

import logging

from genserve.config import Config

log = logging.getLogger(__name__)


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver must not stop a CPU deployment from starting
        log.exception("could not query CUDA devices; using CPU workers")
        return 0


def resolve_devices(config: Config) -> list[str]:
    if config.workers.devices != "auto":
        return list(config.workers.devices)
    count = cuda_device_count()
    if count:
        return [f"cuda:{index}" for index in range(count)]
    return ["cpu"] * config.workers.cpu_workers
