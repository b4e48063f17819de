"""Pieces of /metrics that need no server: the queue's depth per priority, and the GPU figures from NVML.

A host without an NVIDIA GPU cannot run NVML, so the GPU tests put a stand-in ``pynvml`` module in its place (the
same shape nvidia-ml-py has; as tests/e2e/test_performance_monitor.py does for the monitor tool). The real NVML
path runs wherever there is a GPU: the e2e test only asserts that a GPU-less host exports no GPU families.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from genserve.metrics import GpuCollector
from genserve.queue import PriorityQueue

GIB = 1024**3


def test_depth_by_priority_counts_each_priority_without_a_scan() -> None:
    queue: PriorityQueue[object] = PriorityQueue(max_size=100)
    assert queue.depth_by_priority() == {}
    for priority in (0, 5, 0, -3, 5, 5, 0):
        queue.push(object(), priority)
    retried = object()
    queue.push_front(retried, 5)  # a re-queued job sorts first in its priority: still counted there
    assert queue.depth_by_priority() == {-3: 1, 0: 3, 5: 4}
    queue.remove(retried)
    queue.pop()  # the -3 one
    assert queue.depth_by_priority() == {0: 3, 5: 3}


class NVMLError(Exception):
    pass


def fake_nvml(devices: int = 2, init_error: Exception | None = None) -> ModuleType:
    """nvidia-ml-py's shape: GPU 0 reports everything; GPU 1 has no utilisation (as MIG); GPU 2 cannot be read."""
    nvml = ModuleType("pynvml")
    state = {"initialised": 0}

    def init() -> None:
        if init_error is not None:
            raise init_error
        state["initialised"] += 1

    def handle(index: int) -> int:
        if index == 2:
            raise NVMLError("GPU is lost")
        return index

    def utilization(handle: int) -> SimpleNamespace:
        if handle == 1:
            raise NVMLError("Not Supported")
        return SimpleNamespace(gpu=87, memory=40)

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: state.__setitem__("initialised", state["initialised"] - 1)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: devices  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: b"Fake H200" if h == 0 else "Fake H200"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-0000-{h}"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=(30 + h) * GIB, total=141 * GIB)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = utilization  # type: ignore[attr-defined]
    nvml.state = state  # type: ignore[attr-defined]
    return nvml


def scrape(collector: GpuCollector) -> dict[str, dict[str, float]]:
    """family name → {gpu label: value}, through the real exposition and parser."""
    registry = CollectorRegistry()
    registry.register(collector)
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {family.name: {s.labels["gpu"]: s.value for s in family.samples} for family in families}


def test_gpu_memory_and_utilisation_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(devices=3)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = GpuCollector()
    figures = scrape(collector)
    assert figures["genserve_gpu_memory_used_bytes"] == {"0": 30 * GIB, "1": 31 * GIB}  # GPU 2 skipped, not fatal
    assert figures["genserve_gpu_memory_total_bytes"] == {"0": 141 * GIB, "1": 141 * GIB}
    assert figures["genserve_gpu_utilization_ratio"] == {"0": 0.87}  # unsupported on GPU 1: absent, not 0
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'name="Fake H200"' in text and 'uuid="GPU-0000-0"' in text  # bytes from older releases decoded
    assert nvml.state["initialised"] == 1  # type: ignore[attr-defined]  # started once, at the first scrape
    collector.close()
    assert nvml.state["initialised"] == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "nvml",
    [None, fake_nvml(init_error=NVMLError("Driver Not Loaded")), fake_nvml(devices=0)],
    ids=["no nvidia-ml-py", "no driver", "no device"],
)
def test_no_gpu_no_gpu_families_and_no_error(monkeypatch: pytest.MonkeyPatch, nvml: ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: ``import pynvml`` raises ImportError
    collector = GpuCollector()
    assert scrape(collector) == {}
    assert scrape(collector) == {}  # asked again: still quiet
