"""A least-recently-used map bounded by weight: the caches a service keeps in memory."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A least-recently-used map bounded by the total weight of its values.

    ``weigh`` gives a value's weight (its size, or 1 to bound the number of entries). Safe to
    use from several threads: the recorder reads its caches while preparing one batch and fills
    them as the previous batch's write completes.
    """

    def __init__(self, max_weight: int, weigh: Callable[[V], int] = lambda _: 1) -> None:
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._max = max_weight
        self._weigh = weigh
        self.weight = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` under ``key``, evicting the least recently used beyond the bound."""
        weight = self._weigh(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.weight -= old[1]
            self._items[key] = (value, weight)
            self.weight += weight
            while self.weight > self._max and self._items:
                _, (_, evicted) = self._items.popitem(last=False)
                self.weight -= evicted

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
            self.weight = 0
