"""The model queue's bounds and fairness (no model: batches are formed and inspected, not run), and the
personal adapter cache's generation and revalidation rules."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.personalization.adapter_cache import AdapterCache
from services.personalization.backends.base import ScoreRow
from services.personalization.batcher import Batcher
from services.personalization.errors import TooManyRequests
from services.personalization.metrics import ServeMetrics


class FakeStack:
    slots = 8


def batcher(**kw: Any) -> tuple[Batcher, CollectorRegistry]:
    registry = CollectorRegistry()
    defaults: dict[str, Any] = {"max_rows": 4, "max_tokens": 10_000, "max_queue": 64, "max_per_tenant": 32}
    return Batcher(ServeMetrics(registry), **{**defaults, **kw}), registry


async def queue(b: Batcher, stack: FakeStack, tenant: str, n: int) -> list[asyncio.Task[Any]]:
    tasks = [
        asyncio.create_task(b.submit("score", stack, None, [ScoreRow([1, 2, 3], None)], tenant=tenant))  # type: ignore[arg-type]
        for _ in range(n)
    ]
    await asyncio.sleep(0)  # every submit runs up to its await: all queued
    return tasks


async def cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, TooManyRequests):
            await task


async def test_a_flooding_user_cannot_starve_the_others() -> None:
    b, _ = batcher()
    stack = FakeStack()
    flood = await queue(b, stack, "fed/a", 20)  # A was first, with 20 requests
    others = await queue(b, stack, "fed/b", 2) + await queue(b, stack, "fed/c", 1)
    try:
        batches = []
        while b.depth:
            taken = b._take()
            assert taken is not None
            batches.append([job.tenant for job in taken])
        # The first batch already serves everyone: turns rotate, and batches are filled round-robin.
        assert sorted(batches[0]) == ["fed/a", "fed/a", "fed/b", "fed/c"]
        assert sorted(batches[1]) == ["fed/a", "fed/a", "fed/a", "fed/b"]
        assert all(set(batch) == {"fed/a"} for batch in batches[2:])
    finally:
        await cancel(flood + others)


async def test_turns_rotate_when_batching_is_off() -> None:
    b, _ = batcher(batching=False)
    stack = FakeStack()
    tasks = await queue(b, stack, "a", 3) + await queue(b, stack, "b", 3)
    try:
        order = []
        while b.depth:
            taken = b._take()
            assert taken is not None
            assert len(taken) == 1
            order.append(taken[0].tenant)
        assert order == ["a", "b", "a", "b", "a", "b"]
    finally:
        await cancel(tasks)


async def test_bounds_answer_429_with_a_retry_after_and_are_counted() -> None:
    b, registry = batcher(max_queue=5, max_per_tenant=3)
    stack = FakeStack()
    tasks = await queue(b, stack, "a", 3)
    try:
        with pytest.raises(TooManyRequests) as user_limit:
            await b.submit("score", stack, None, [ScoreRow([1, 2], None)], tenant="a")  # type: ignore[arg-type]
        assert user_limit.value.status == 429
        assert user_limit.value.code == "user_limit"
        assert user_limit.value.retry_after_s >= 1
        tasks += await queue(b, stack, "b", 2)
        with pytest.raises(TooManyRequests) as full:
            await b.submit("score", stack, None, [ScoreRow([1, 2], None)], tenant="c")  # type: ignore[arg-type]
        assert full.value.code == "queue_full"
        assert b.depth == 5
        sample = registry.get_sample_value
        assert sample("pfi_serve_overload_rejections_total", {"reason": "user_limit"}) == 1
        assert sample("pfi_serve_overload_rejections_total", {"reason": "queue_full"}) == 1
    finally:
        await cancel(tasks)
    # A finished (here: cancelled) request frees its user's share.
    assert b._active == {}


# -------------------------------------------------------------------------------------------- the cache


async def test_an_invalidation_during_a_load_reaches_the_waiters_too() -> None:
    cache: AdapterCache[str] = AdapterCache(1000)
    gate = asyncio.Event()
    calls = 0

    async def load() -> tuple[str, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
            return "old", 1
        return "new", 1

    first = asyncio.create_task(cache.get_or_load("k", load))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cache.get_or_load("k", load))
    await asyncio.sleep(0)
    cache.invalidate("k")  # e.g. a delete announced while the load was in flight
    gate.set()
    # Neither the loader nor the request that waited for its load gets what it read before the change.
    assert (await first)[0] == "new"
    assert (await waiter)[0] == "new"
    assert cache.peek("k") == "new"
    assert cache._generation == {}  # generations are kept only while a load is in flight


async def test_entries_older_than_the_ttl_are_revalidated() -> None:
    cache: AdapterCache[str] = AdapterCache(1000, ttl_s=0.05)
    current = {"k": "v1"}

    async def load() -> tuple[str, int]:
        return current["k"], 1

    async def revalidate(value: str) -> bool:
        return value == current["k"]

    assert await cache.get_or_load("k", load, revalidate=revalidate) == ("v1", False)
    assert await cache.get_or_load("k", load, revalidate=revalidate) == ("v1", True)
    current["k"] = "v2"  # changed at the source, and the invalidation never arrived
    assert await cache.get_or_load("k", load, revalidate=revalidate) == ("v1", True)  # within the TTL
    await asyncio.sleep(0.06)
    assert await cache.get_or_load("k", load, revalidate=revalidate) == ("v2", False)
    await asyncio.sleep(0.06)
    assert await cache.get_or_load("k", load, revalidate=revalidate) == ("v2", True)  # still current
