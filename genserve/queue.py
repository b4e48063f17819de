"""The one global job queue: lower ``priority`` value first, first-in first-out within a priority (as GenServe).

Lives in the API process; not thread-safe by itself — the supervisor calls it under its lock, so every operation
is O(log n): the supervisor lock is never held for work that grows with the queue. Items are ordered in a
``SortedList`` keyed by (priority, sequence), which gives pop, remove and a job's place in line in O(log n); a
separate heap keyed by deadline finds expired jobs without scanning. A job a dead worker dropped goes back to the
*head* of its priority, so it does not wait behind work that arrived after it.

Items may belong to a group (the images of one request): the supervisor takes a group's waiting items together to
run them as one batch, in O(g log n) for g items of the group, without scanning the queue.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from sortedcontainers import SortedList

T = TypeVar("T")

_Key = tuple[int, int]  # (priority, sequence)


class QueueFullError(Exception):
    """push() on a queue that holds max_size items."""


class PriorityQueue(Generic[T]):
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._order: SortedList = SortedList()  # keys in run order
        self._items: dict[_Key, T] = {}  # key -> item
        self._keys: dict[int, _Key] = {}  # id(item) -> key
        # Deadline heap with lazy deletion: entries of items no longer queued (or queued again under another
        # key) are skipped when they reach the top.
        self._deadlines: list[tuple[float, _Key]] = []
        self._groups: dict[Hashable, set[_Key]] = {}  # group -> keys of its queued items
        self._group_of: dict[_Key, Hashable] = {}  # key -> its group, for items that have one
        self._back = itertools.count(0)  # push(): sequences grow
        self._front = itertools.count(-1, -1)  # push_front(): sequences shrink, so they sort first

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, item: T) -> bool:
        return id(item) in self._keys

    def push(self, item: T, priority: int, deadline: float = float("inf"), group: Hashable | None = None) -> None:
        """Add at the tail of its priority. Raises QueueFullError at max_size."""
        if len(self._keys) >= self.max_size:
            raise QueueFullError(f"queue holds {self.max_size} jobs")
        self._add(item, (priority, next(self._back)), deadline, group)

    def push_front(self, item: T, priority: int, deadline: float = float("inf"), group: Hashable | None = None) -> None:
        """Put back at the head of its priority (a retried job); allowed even when full, it was already accepted."""
        self._add(item, (priority, next(self._front)), deadline, group)

    def _add(self, item: T, key: _Key, deadline: float, group: Hashable | None) -> None:
        if id(item) in self._keys:
            raise ValueError("item is already queued")
        self._keys[id(item)] = key
        self._items[key] = item
        self._order.add(key)
        if deadline != float("inf"):
            heapq.heappush(self._deadlines, (deadline, key))
        if group is not None:
            self._group_of[key] = group
            self._groups.setdefault(group, set()).add(key)

    def pop(self) -> T | None:
        """Remove and return the next item, or None when empty."""
        if not self._order:
            return None
        item = self._items[self._order[0]]
        self.remove(item)
        return item

    def remove(self, item: T) -> bool:
        """Take an item out wherever it is; False if it was not queued."""
        key = self._keys.pop(id(item), None)
        if key is None:
            return False
        del self._items[key]
        self._order.remove(key)
        group = self._group_of.pop(key, None)
        if group is not None:
            members = self._groups[group]
            members.discard(key)
            if not members:
                del self._groups[group]
        return True

    def group_size(self, group: Hashable) -> int:
        """How many items of ``group`` are queued."""
        return len(self._groups.get(group, ()))

    def take_group(self, group: Hashable, limit: int) -> list[T]:
        """Remove and return up to ``limit`` queued items of ``group``, in the order they would have run."""
        keys = sorted(self._groups.get(group, ()))[:limit]
        items = [self._items[key] for key in keys]
        for item in items:
            self.remove(item)
        return items

    def position(self, item: T) -> int | None:
        """0-based place in line, or None if not queued."""
        key = self._keys.get(id(item))
        return None if key is None else int(self._order.index(key))

    def depth_by_priority(self) -> dict[int, int]:
        """How many items wait at each priority (metrics): O(p log n) for p distinct priorities, no scan.

        Keys sort by (priority, sequence), so each priority's items are one run; its end is found by bisection."""
        depths: dict[int, int] = {}
        start = 0
        while start < len(self._order):
            priority = self._order[start][0]
            end = self._order.bisect_left((priority + 1, -math.inf))  # the first key of a later priority
            depths[priority] = end - start
            start = end
        return depths

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued items (None when none has one)."""
        self._drop_stale_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    def pop_expired(self, now: float) -> list[T]:
        """Remove and return every queued item whose deadline is at or before ``now``."""
        expired: list[T] = []
        while True:
            self._drop_stale_deadlines()
            if not self._deadlines or self._deadlines[0][0] > now:
                return expired
            _, key = heapq.heappop(self._deadlines)
            item = self._items[key]
            self.remove(item)
            expired.append(item)

    def _drop_stale_deadlines(self) -> None:
        while self._deadlines and self._deadlines[0][1] not in self._items:
            heapq.heappop(self._deadlines)
        # Amortised cleanup: a heap mostly of stale entries (jobs that ran before their deadline) is rebuilt.
        if len(self._deadlines) > 64 and len(self._deadlines) > 4 * len(self._items):
            self._deadlines = [entry for entry in self._deadlines if entry[1] in self._items]
            heapq.heapify(self._deadlines)

    def __iter__(self) -> Iterator[T]:
        """Items in the order they will run (O(n): for status pages, never under a hot lock)."""
        return iter([self._items[key] for key in self._order])

    def ordered(self) -> Iterator[T]:
        """Items in the order they will run."""
        return iter(self)
