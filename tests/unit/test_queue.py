"""PriorityQueue: lower priority value first, FIFO within a priority, retried jobs back at the head."""

from __future__ import annotations

import random

import pytest

from genserve.queue import PriorityQueue, QueueFullError


class Item:
    """A distinct object per job (the queue keys on identity), with a readable repr for failure messages."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Item({self.name!r})"


def drain(queue: PriorityQueue[Item]) -> list[Item]:
    items = []
    while (item := queue.pop()) is not None:
        items.append(item)
    return items


def names(items: list[Item]) -> list[str]:
    return [item.name for item in items]


def test_pop_on_empty_queue_returns_none() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=3)
    assert queue.pop() is None
    assert len(queue) == 0


def test_lower_priority_value_runs_first() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    queue.push(Item("p5"), 5)
    queue.push(Item("p0"), 0)
    queue.push(Item("p-3"), -3)
    queue.push(Item("p1"), 1)
    assert names(drain(queue)) == ["p-3", "p0", "p1", "p5"]


def test_fifo_within_one_priority() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    for name in "abcde":
        queue.push(Item(name), 0)
    assert names(drain(queue)) == list("abcde")


def test_push_front_goes_to_head_of_its_own_priority_only() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    queue.push(Item("urgent"), -1)
    queue.push(Item("a"), 0)
    queue.push(Item("b"), 0)
    queue.push(Item("late"), 1)
    queue.push_front(Item("retried"), 0)
    # Ahead of a and b (same priority), still behind the lower-valued priority -1.
    assert names(list(queue.ordered())) == ["urgent", "retried", "a", "b", "late"]
    assert names(drain(queue)) == ["urgent", "retried", "a", "b", "late"]


def test_push_front_into_a_priority_with_nothing_else_queued() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    queue.push(Item("p0"), 0)
    queue.push_front(Item("p3-retried"), 3)
    assert names(drain(queue)) == ["p0", "p3-retried"]


def test_push_raises_when_full_but_push_front_is_still_allowed() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=2)
    queue.push(Item("a"), 0)
    queue.push(Item("b"), 0)
    with pytest.raises(QueueFullError):
        queue.push(Item("c"), 0)
    assert len(queue) == 2

    queue.push_front(Item("retried"), 0)  # an already-accepted job is never refused
    assert len(queue) == 3
    with pytest.raises(QueueFullError):
        queue.push(Item("d"), 0)
    assert names(drain(queue)) == ["retried", "a", "b"]


def test_room_frees_up_after_pop_and_remove() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=2)
    a, b = Item("a"), Item("b")
    queue.push(a, 0)
    queue.push(b, 0)
    queue.pop()
    queue.push(Item("c"), 0)  # a popped: room for one
    assert queue.remove(b)
    queue.push(Item("d"), 0)  # b removed: room for one more
    assert len(queue) == 2


def test_remove_takes_an_item_out_and_pop_skips_it() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    a, b, c = Item("a"), Item("b"), Item("c")
    for item in (a, b, c):
        queue.push(item, 0)

    assert queue.remove(b) is True
    assert b not in queue
    assert len(queue) == 2
    assert queue.position(b) is None
    assert names(list(queue.ordered())) == ["a", "c"]
    assert drain(queue) == [a, c]


def test_remove_of_the_head_then_pop_returns_the_next_one() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    a, b = Item("a"), Item("b")
    queue.push(a, 0)
    queue.push(b, 1)
    assert queue.remove(a)
    assert queue.pop() is b
    assert queue.pop() is None


def test_remove_of_unknown_or_already_popped_item_returns_false() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    a = Item("a")
    queue.push(a, 0)
    assert queue.remove(Item("stranger")) is False
    assert queue.pop() is a
    assert queue.remove(a) is False
    assert queue.remove(Item("x")) is False


def test_remove_twice_returns_false_the_second_time() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    a = Item("a")
    queue.push(a, 0)
    assert queue.remove(a) is True
    assert queue.remove(a) is False
    assert len(queue) == 0
    assert queue.pop() is None


def test_a_removed_item_can_be_queued_again() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    a, b = Item("a"), Item("b")
    queue.push(a, 0)
    queue.push(b, 0)
    queue.remove(a)
    queue.push(a, 0)  # goes to the tail now
    assert drain(queue) == [b, a]


def test_position_and_ordered_agree_with_pop_order() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=20)
    items = [Item(f"i{n}") for n in range(8)]
    priorities = [2, 0, 1, 0, 2, -1, 1, 0]
    for item, priority in zip(items, priorities, strict=True):
        queue.push(item, priority)
    queue.push_front(Item("retried"), 1)
    queue.remove(items[3])

    ordered = list(queue.ordered())
    assert [queue.position(item) for item in ordered] == list(range(len(ordered)))
    assert drain(queue) == ordered
    assert names(ordered) == ["i5", "i1", "i7", "retried", "i2", "i6", "i0", "i4"]


def test_position_of_an_item_not_queued_is_none() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    assert queue.position(Item("nobody")) is None


def test_len_and_contains_follow_push_pop_remove() -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    a, b = Item("a"), Item("b")
    assert a not in queue
    queue.push(a, 0)
    queue.push_front(b, 0)
    assert (len(queue), a in queue, b in queue) == (2, True, True)
    assert queue.pop() is b
    assert (len(queue), a in queue, b in queue) == (1, True, False)
    queue.remove(a)
    assert (len(queue), a in queue) == (0, False)


def test_contains_is_by_identity_not_equality() -> None:
    queue: PriorityQueue[list[int]] = PriorityQueue(max_size=10)
    first, second = [1], [1]
    assert first == second and first is not second
    queue.push(first, 0)
    assert first in queue
    assert second not in queue


@pytest.mark.parametrize("second_push", ["push", "push_front"])
@pytest.mark.parametrize("first_push", ["push", "push_front"])
def test_queuing_the_same_item_twice_raises(first_push: str, second_push: str) -> None:
    queue: PriorityQueue[Item] = PriorityQueue(max_size=10)
    a = Item("a")
    getattr(queue, first_push)(a, 0)
    with pytest.raises(ValueError, match="already queued"):
        getattr(queue, second_push)(a, 5)
    assert len(queue) == 1
    assert drain(queue) == [a]


def test_random_priorities_pop_in_priority_then_insertion_order() -> None:
    rng = random.Random(1234)
    queue: PriorityQueue[Item] = PriorityQueue(max_size=1000)
    pushed: list[tuple[int, int, Item]] = []
    for sequence in range(300):
        item = Item(f"i{sequence}")
        priority = rng.randint(-3, 3)
        queue.push(item, priority)
        pushed.append((priority, sequence, item))
    # Remove a random tenth of them; the rest must still come out in order.
    removed = set(rng.sample(range(len(pushed)), 30))
    for index in removed:
        assert queue.remove(pushed[index][2])
    expected = [
        item for priority, sequence, item in sorted(pushed, key=lambda e: (e[0], e[1])) if sequence not in removed
    ]

    assert list(queue.ordered()) == expected
    assert drain(queue) == expected


def test_iteration_gives_every_queued_item_once_and_skips_removed_ones() -> None:
    queue: PriorityQueue[str] = PriorityQueue(max_size=10)
    for item, priority in (("a", 3), ("b", 1), ("c", 2)):
        queue.push(item, priority)
    queue.remove("c")
    assert sorted(queue) == ["a", "b"]
    assert list(queue.ordered()) == ["b", "a"]
