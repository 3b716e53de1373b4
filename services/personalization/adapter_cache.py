"""An LRU cache with a byte budget, for decoded personal adapters.

* ``get`` refreshes recency; ``put`` inserts and then evicts least-recently-used entries until the
  total fits the budget again. An entry larger than the whole budget is not kept (a budget of 0
  disables caching: every request loads).
* ``invalidate`` drops one key (upload, delete, another replica's announcement) and bumps the key's
  generation, so a load that was already under way when the key was invalidated is not inserted.
* ``get_or_load`` is single-flight: concurrent misses of one key share one load.
* Negative results (a user without an adapter) are cached too, as small entries, so users without a
  personal adapter cost no Redis round trip per request; uploads invalidate them like any entry.
* With ``ttl_s``, an entry older than that is revalidated before it is served again (``get_or_load``'s
  ``revalidate(value)``, a cheap check against the source of truth): invalidations arrive through a
  stream that can lag or break, and the TTL bounds how long a missed one can be served.

The cache is confined to one event loop (no locks). ``on_evict(key, value, reason)`` runs for every
entry that leaves (``capacity``, ``invalidated``, ``cleared``), so holders of the value can let go of it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.personalization.metrics import ServeMetrics

V = TypeVar("V")

EvictHook = Callable[[str, V, str], None]


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    checked: float = 0.0  # loop time of the load or the last successful revalidation


Revalidate = Callable[[V], Awaitable[bool]]


class AdapterCache(Generic[V]):
    """Loop-confined LRU of ``key -> value`` bounded by the sum of the values' declared bytes."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        metrics: ServeMetrics | None = None,
        on_evict: EvictHook[V] | None = None,
        max_reloads: int = 3,
        ttl_s: float | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._bytes = 0
        self._generation: dict[str, int] = {}
        self._loading: dict[str, asyncio.Future[tuple[V, int] | None]] = {}
        self._metrics = metrics
        self._on_evict = on_evict
        self._max_reloads = max_reloads
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        if metrics is not None:
            metrics.cache_budget.set(budget_bytes)
        self._publish()

    # -- introspection -------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def peek(self, key: str) -> V | None:
        """The value without touching recency or counters."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    # -- operations ----------------------------------------------------------------------------
    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: V, nbytes: int) -> bool:
        """Insert (or replace) ``key``; False when it alone exceeds the budget (not kept)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
            if old.value is not value:
                self._evicted(key, old.value, "replaced")
        if nbytes > self.budget_bytes:
            self._publish()
            return False
        self._entries[key] = _Entry(value, nbytes, _now())
        self._bytes += nbytes
        while self._bytes > self.budget_bytes and self._entries:
            victim, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
            self._evicted(victim, entry.value, "capacity")
        self._publish()
        return True

    def invalidate(self, key: str, reason: str = "invalidated") -> bool:
        """Drop ``key`` (and make loads in flight for it not insert); True if it was cached."""
        if key in self._loading:  # whatever that load read is outdated now
            self._generation[key] = self._generation.get(key, 0) + 1
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.nbytes
        self._evicted(key, entry.value, reason)
        self._publish()
        return True

    def clear(self, reason: str = "cleared") -> None:
        for key in list(self._entries):
            self.invalidate(key, reason)

    async def get_or_load(
        self,
        key: str,
        load: Callable[[], Awaitable[tuple[V, int]]],
        *,
        revalidate: Revalidate[V] | None = None,
    ) -> tuple[V, bool]:
        """``(value, hit)``. On a miss ``load()`` returns ``(value, nbytes)``; concurrent misses of the
        same key wait for the same load. A load overtaken by an invalidation is retried (bounded). An
        entry older than ``ttl_s`` is served only if ``revalidate(value)`` says it is still current
        (else it is dropped and loaded again)."""
        value = self.get(key)
        if value is not None:
            entry = self._entries[key]
            if self.ttl_s is None or revalidate is None or _now() - entry.checked <= self.ttl_s:
                self._hit()
                return value, True
            current = await revalidate(value)
            if self.peek(key) is value:  # not invalidated or replaced meanwhile
                if current:
                    entry.checked = _now()
                    self._hit()
                    return value, True
                self.invalidate(key, "stale")
        self._miss()
        for _ in range(self._max_reloads):
            pending = self._loading.get(key)
            if pending is not None:
                shared = await asyncio.shield(pending)
                if shared is not None:
                    return shared[0], False
                continue  # that load was overtaken by an invalidation: never serve what it read
            generation = self._generation.get(key, 0)
            future: asyncio.Future[tuple[V, int] | None] = asyncio.get_running_loop().create_future()
            self._loading[key] = future
            try:
                result = await load()
            except BaseException as err:
                if not future.done():
                    future.set_exception(err)
                    future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
                raise
            finally:
                if self._loading.get(key) is future:
                    del self._loading[key]
            fresh = self._generation.get(key, 0) == generation
            if key not in self._loading:
                self._generation.pop(key, None)  # only loads in flight need one
            if not future.done():
                future.set_result(result if fresh else None)
            if fresh:
                self.put(key, result[0], result[1])
                return result[0], False
            # Invalidated while loading (an upload or delete raced us): load again.
        raise RuntimeError(f"cache key {key!r} kept being invalidated while loading")

    # -- internals -----------------------------------------------------------------------------
    def _hit(self) -> None:
        self.hits += 1
        if self._metrics is not None:
            self._metrics.cache_hits.inc()

    def _miss(self) -> None:
        self.misses += 1
        if self._metrics is not None:
            self._metrics.cache_misses.inc()

    def _evicted(self, key: str, value: V, reason: str) -> None:
        self.evictions += 1
        if self._metrics is not None:
            self._metrics.cache_evictions.labels(reason=reason).inc()
        if self._on_evict is not None:
            self._on_evict(key, value, reason)

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self._bytes)
            self._metrics.cache_entries.set(len(self._entries))


def _now() -> float:
    return time.monotonic()
