"""The README's door: plain `./run.sh` (no argument) serves, with environment overrides applied."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import requests

from tests.server import REPO_ROOT, free_port, wait_until


def test_plain_run_sh_serves(tmp_path: Path, embedded_cache: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("GENSERVE_")}
    env.update(
        GENSERVE_PORT=str(port),
        GENSERVE_RESULTS_DIR=str(tmp_path / "results"),
        GENSERVE_MODEL__EMBEDDED_CACHE_DIR=str(embedded_cache),
    )
    log = (tmp_path / "run.log").open("wb")
    process = subprocess.Popen(["./run.sh"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            try:
                return requests.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, 300, 0.2, "./run.sh to serve")  # may install the serve dependencies first
        models = requests.get(f"http://127.0.0.1:{port}/models", timeout=5).json()
        assert models[0]["model_id"] == "flux1-dev"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
