"""The personal adapter cache: LRU order, byte budget, invalidation, single-flight loads."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from services.personalization.adapter_cache import AdapterCache
from services.personalization.metrics import ServeMetrics


def test_lru_evicts_least_recently_used_to_fit_the_budget() -> None:
    evicted: list[tuple[str, str]] = []
    cache: AdapterCache[str] = AdapterCache(100, on_evict=lambda k, v, r: evicted.append((k, r)))
    assert cache.put("a", "A", 40)
    assert cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now the most recent
    assert cache.put("c", "C", 40)  # 120 > 100: b (LRU) goes
    assert evicted == [("b", "capacity")]
    assert cache.keys() == ["a", "c"]
    assert cache.bytes == 80
    assert cache.put("d", "D", 90)  # needs both a and c gone
    assert [k for k, _ in evicted] == ["b", "a", "c"]
    assert cache.keys() == ["d"]
    assert cache.bytes == 90
    assert cache.evictions == 3


def test_entries_larger_than_the_budget_are_not_kept() -> None:
    cache: AdapterCache[str] = AdapterCache(10)
    assert not cache.put("big", "X", 11)
    assert "big" not in cache
    assert cache.bytes == 0
    zero: AdapterCache[str] = AdapterCache(0)
    assert not zero.put("a", "A", 1)
    assert zero.put("free", "F", 0)  # a zero-byte entry fits a zero budget


def test_replace_and_invalidate() -> None:
    events: list[tuple[str, str, str]] = []
    cache: AdapterCache[str] = AdapterCache(100, on_evict=lambda k, v, r: events.append((k, v, r)))
    cache.put("a", "v1", 30)
    cache.put("a", "v2", 50)
    assert events == [("a", "v1", "replaced")]
    assert cache.bytes == 50
    assert cache.peek("a") == "v2"
    assert cache.invalidate("a", "deleted")
    assert events[-1] == ("a", "v2", "deleted")
    assert not cache.invalidate("a")
    assert cache.bytes == 0
    assert len(cache) == 0
    cache.put("x", "X", 1)
    cache.put("y", "Y", 1)
    cache.clear()
    assert len(cache) == 0
    assert cache.bytes == 0


def test_metrics_follow_the_cache() -> None:
    registry = CollectorRegistry()
    cache: AdapterCache[str] = AdapterCache(100, metrics=ServeMetrics(registry))
    cache.put("a", "A", 60)
    cache.put("b", "B", 60)

    def sample(name: str, **labels: str) -> float:
        value = registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    assert sample("pfi_serve_adapter_cache_bytes") == 60
    assert sample("pfi_serve_adapter_cache_entries") == 1
    assert sample("pfi_serve_adapter_cache_budget_bytes") == 100
    assert sample("pfi_serve_adapter_cache_evictions_total", reason="capacity") == 1


async def test_get_or_load_is_single_flight_and_counts() -> None:
    cache: AdapterCache[str] = AdapterCache(100)
    calls = 0
    gate = asyncio.Event()

    async def load() -> tuple[str, int]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "A", 10

    waiters = [asyncio.create_task(cache.get_or_load("a", load)) for _ in range(5)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1
    assert [v for v, _ in results] == ["A"] * 5
    assert all(not hit for _, hit in results)
    value, hit = await cache.get_or_load("a", load)
    assert (value, hit) == ("A", True)
    assert cache.hits == 1
    assert cache.misses == 5


async def test_a_load_overtaken_by_an_invalidation_is_not_cached_stale() -> None:
    cache: AdapterCache[str] = AdapterCache(100)
    versions = iter(["old", "new"])
    started = asyncio.Event()
    release = asyncio.Event()

    async def load() -> tuple[str, int]:
        value = next(versions)
        if value == "old":
            started.set()
            await release.wait()
        return value, 10

    task = asyncio.create_task(cache.get_or_load("a", load))
    await started.wait()
    cache.invalidate("a")  # an upload landed while "old" was being read
    release.set()
    value, _ = await task
    assert value == "new"
    assert cache.peek("a") == "new"


async def test_load_errors_propagate_to_every_waiter_and_are_not_cached() -> None:
    cache: AdapterCache[str] = AdapterCache(100)
    gate = asyncio.Event()

    async def failing() -> tuple[str, int]:
        await gate.wait()
        raise RuntimeError("redis down")

    waiters = [asyncio.create_task(cache.get_or_load("a", failing)) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    for outcome in await asyncio.gather(*waiters, return_exceptions=True):
        assert isinstance(outcome, RuntimeError)
    assert "a" not in cache

    async def ok() -> tuple[str, int]:
        return "A", 1

    assert await cache.get_or_load("a", ok) == ("A", False)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="budget"):
        AdapterCache(-1)
    cache: AdapterCache[str] = AdapterCache(10)
    with pytest.raises(ValueError, match="nbytes"):
        cache.put("a", "A", -1)
