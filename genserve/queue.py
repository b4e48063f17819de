"""The one global job queue: lower ``priority`` value first, first-in first-out within a priority (as GenServe).

Lives in the API process; not thread-safe by itself — the supervisor calls it under its lock. A job a dead worker
dropped goes back to the *head* of its priority, so it does not wait behind work that arrived after it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFullError(Exception):
    """push() on a queue that holds max_size items."""


class PriorityQueue(Generic[T]):
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        # Heap entries are [priority, sequence, item]; a removed entry has item None (lazy deletion keeps
        # remove() O(1) and the heap valid). Sequence grows for push() and shrinks for push_front().
        self._heap: list[list[object]] = []
        self._entries: dict[int, list[object]] = {}  # id(item) -> entry
        self._back = itertools.count(0)
        self._front = itertools.count(-1, -1)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: T) -> bool:
        return id(item) in self._entries

    def push(self, item: T, priority: int) -> None:
        """Add at the tail of its priority. Raises QueueFullError at max_size."""
        if len(self._entries) >= self.max_size:
            raise QueueFullError(f"queue holds {self.max_size} jobs")
        self._add(item, priority, next(self._back))

    def push_front(self, item: T, priority: int) -> None:
        """Put back at the head of its priority (a retried job); allowed even when full, it was already accepted."""
        self._add(item, priority, next(self._front))

    def _add(self, item: T, priority: int, sequence: int) -> None:
        if id(item) in self._entries:
            raise ValueError("item is already queued")
        entry: list[object] = [priority, sequence, item]
        self._entries[id(item)] = entry
        heapq.heappush(self._heap, entry)

    def pop(self) -> T | None:
        """Remove and return the next item, or None when empty."""
        while self._heap:
            _, _, item = heapq.heappop(self._heap)
            if item is not None:
                del self._entries[id(item)]
                return item  # type: ignore[return-value]
        return None

    def remove(self, item: T) -> bool:
        """Take an item out wherever it is; False if it was not queued."""
        entry = self._entries.pop(id(item), None)
        if entry is None:
            return False
        entry[2] = None
        return True

    def __iter__(self) -> Iterator[T]:
        """Items in no particular order (O(n), no sort): for scans that do not care about the order."""
        for entry in list(self._entries.values()):
            yield entry[2]  # type: ignore[misc]

    def ordered(self) -> Iterator[T]:
        """Items in the order they will run (a sorted copy; O(n log n), for status pages)."""
        live = sorted((entry for entry in self._entries.values()), key=lambda entry: (entry[0], entry[1]))
        for entry in live:
            yield entry[2]  # type: ignore[misc]

    def position(self, item: T) -> int | None:
        """0-based place in line, or None if not queued."""
        entry = self._entries.get(id(item))
        if entry is None:
            return None
        key = (entry[0], entry[1])
        return sum(1 for other in self._entries.values() if (other[0], other[1]) < key)  # type: ignore[operator]
