"""Retention: old results deleted on a timer, in a thread of its own (API process). The deleting is the store's."""

from __future__ import annotations

import logging
import threading

from genserve.config import Config
from genserve.store import JobStore

log = logging.getLogger(__name__)


class Retention:
    """Deletes old results now and every results.cleanup_interval_s, in a thread of its own.

    Not the HTTP thread pool: a pass over a large store must not take a thread a request is waiting for."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genserve-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        results = self.config.results
        max_age_s = results.max_age_hours * 3600
        max_bytes = int(results.max_total_gb * 1024**3)
        while not self._stopped.is_set():
            try:
                self.store.cleanup(max_age_s, max_bytes)
            except Exception:  # a full disk or a locked database must not end retention for good
                log.exception("retention failed; trying again next round")
            self._stopped.wait(results.cleanup_interval_s)
