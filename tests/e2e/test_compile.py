"""torch.compile on the CPU (inductor) through a real server: the worker warms up before it is ready, its images
match eager ones within tolerance, and a respawned worker loads its kernels from the on-disk cache instead of
compiling again."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from tests.conftest import ServerFactory
from tests.server import GenServeProcess, decode_png, wait_until

SIZE = 64  # the warm-up size: small, so compiling and the job stay quick on a CPU
JOB = {"prompt": "a lighthouse at dusk", "width": SIZE, "height": SIZE, "num_inference_steps": 2, "seed": 99}


@pytest.fixture(scope="module")
def compiled(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> GenServeProcess:
    cache = tmp_path_factory.mktemp("inductor-cache")
    return start_server(
        {
            "model": {"modes": ["text2img"]},
            "performance": {
                "compile": "transformer",
                "warmup_sizes": [[SIZE, SIZE]],
                "compile_cache_dir": str(cache),
            },
            "workers": {"restart_backoff_s": 0.05},
        }
    )


def image(server: GenServeProcess) -> np.ndarray:
    answer = server.generate(**JOB)
    assert answer.status_code == 200, answer.text
    return np.asarray(decode_png(answer.json()["image_base64"]), dtype=np.float64)


def test_a_compiled_worker_warms_up_before_ready_and_matches_eager(
    compiled: GenServeProcess, start_server: ServerFactory
) -> None:
    speed = compiled.status()["workers"][0]["speed"]
    assert speed["attention"] == "native"
    assert speed["compile_cache_misses"] > 0 and speed["warmup_s"] > 0  # compiled from scratch, before ready
    eager = start_server({"model": {"modes": ["text2img"]}})
    assert eager.status()["workers"][0]["speed"]["warmup_s"] == 0  # nothing to warm up without compile
    difference = np.abs(image(compiled) - image(eager))
    assert difference.max() <= 2, difference.max()  # kernels differ; the picture does not


def test_a_respawned_worker_loads_compiled_kernels_from_the_cache(compiled: GenServeProcess) -> None:
    first = compiled.status()["workers"][0]
    os.kill(first["pid"], signal.SIGKILL)

    def respawned() -> dict[str, object] | None:
        worker = compiled.status()["workers"][0]
        return worker if worker["state"] == "ready" and worker["pid"] != first["pid"] else None

    worker = wait_until(respawned, 300, 0.2, "the worker to come back")
    speed = worker["speed"]
    assert speed["compile_cache_hits"] > 0 and speed["compile_cache_misses"] == 0, speed
    print(f"warm-up: first start {first['speed']['warmup_s']:.1f} s, after respawn {speed['warmup_s']:.1f} s")
    assert image(compiled).shape == (SIZE, SIZE, 3)
    assert "was not warmed up" not in compiled.log_tail(400)  # the request ran at a warmed size
