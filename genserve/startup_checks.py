"""What the API process refuses before any worker starts: settings the configured devices cannot run.

Memory settings (fp8, nf4 or offload on CPU workers, a missing quantisation package: genserve.memory_plan) and the
attention backend (FlashAttention and SageAttention are CUDA kernels). What only a worker can know — a GPU's compute
capability, whether a CUDA kernel package works on it — its worker checks at start, failing once with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable

from genserve.config import Config
from genserve.memory_plan import startup_problems


def attention_problems(attention: str, devices: Iterable[str]) -> list[str]:
    if attention in ("native", "auto"):
        return []
    return [
        f"{device}: performance.attention: {attention} is a CUDA kernel; a CPU worker cannot run it (use native)"
        for device in dict.fromkeys(devices)
        if not device.startswith("cuda")
    ]


def hardware_problems(config: Config, devices: list[str]) -> list[str]:
    return startup_problems(config.memory_settings(), devices) + attention_problems(
        config.performance.attention, devices
    )
