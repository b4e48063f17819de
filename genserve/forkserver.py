"""The forkserver every worker is forked from (API process side): what it preloads, and starting it early.

A worker forked from a process that has already imported torch, diffusers and transformers (``workers.preload``)
skips seconds of imports on every start and respawn. Starting that process is itself a few seconds of imports, so
``start_early`` launches it first thing, before the API process imports torch and builds the app: the two sets of
imports then run side by side instead of one after the other. This module imports no torch on purpose.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver

PRELOAD_MODULES = ["workers.preload"]


def configure() -> None:
    """Set what the forkserver preloads (before it starts; idempotent)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD_MODULES)


def start_early() -> None:
    """Launch the forkserver now, without waiting for its imports (a no-op if it runs already)."""
    configure()
    forkserver.ensure_running()
