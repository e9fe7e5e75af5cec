"""BoundedCache: least recently used first out, bounded by weight."""

from __future__ import annotations

from skillgate.lru import BoundedCache


def test_evicts_the_least_recently_used_beyond_the_weight() -> None:
    cache: BoundedCache[str, str] = BoundedCache(10, len)
    cache.put("a", "xxxx")
    cache.put("b", "xxxx")
    assert cache.get("a") == "xxxx"  # now the most recently used
    cache.put("c", "xxxx")  # 12 > 10: "b" goes
    assert cache.get("b") is None and cache.get("a") == "xxxx" and cache.get("c") == "xxxx"
    assert cache.weight == 8 and len(cache) == 2


def test_counts_entries_by_default_and_replaces_in_place() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("a", 2)
    cache.put("b", 3)
    assert len(cache) == 2 and cache.get("a") == 2
    cache.clear()
    assert len(cache) == 0 and cache.weight == 0
