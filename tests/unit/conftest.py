"""Fixtures of the unit tests: the scripted-worker pool (tests/pool.py)."""

from tests.pool import model_dir, pool

__all__ = ["model_dir", "pool"]
