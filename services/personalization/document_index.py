"""Each replica's in-memory search indexes of users' documents: a bounded LRU keyed by (federation,
user), each entry valid for one generation of the user's store (:mod:`.documents`).

:meth:`IndexCache.get` returns an entry only if its generation is the one just read from Redis, so an
index built before a change (a deleted document) is never searched after the change; the stale entry is
replaced by the rebuild. The cache is bounded by an estimate of the entries' bytes (embeddings, texts,
BM25); a single index larger than the whole budget is used once and not kept. Building runs off the
event loop (the caller's ``asyncio.to_thread``); concurrent misses of the same user share one build.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from modeling.retrieval import HybridIndex
from services.personalization.documents import Snapshot

BM25_OVERHEAD = 3  # the BM25 matrix and vocabulary cost about this many times the chunk texts' bytes
ENTRY_BYTES = 512  # what any entry costs at least (an empty store too: many users cannot grow it unbounded)


@dataclass(frozen=True)
class UserIndex:
    """One user's chunks at one generation and their hybrid index (``None``: no chunks)."""

    fed: str
    user: str
    snapshot: Snapshot
    index: HybridIndex | None

    @property
    def generation(self) -> int:
        return self.snapshot.generation

    @property
    def nbytes(self) -> int:
        texts = sum(len(t) for t in self.snapshot.texts)
        return ENTRY_BYTES + self.snapshot.nbytes + BM25_OVERHEAD * texts


def build_index(fed: str, user: str, snapshot: Snapshot) -> UserIndex:
    """CPU work (BM25 + the embedding matrix): call it off the event loop."""
    index = HybridIndex(snapshot.texts, snapshot.vectors) if snapshot.texts else None
    return UserIndex(fed, user, snapshot, index)


class IndexCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, str], UserIndex] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._building: dict[tuple[str, str, int], asyncio.Future[UserIndex]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, fed: str, user: str, generation: int) -> UserIndex | None:
        """The cached index of ``user`` if it is of ``generation`` (else None; a stale one is dropped)."""
        with self._lock:
            entry = self._entries.get((fed, user))
            if entry is None:
                return None
            if entry.generation != generation:
                self._drop((fed, user))
                return None
            self._entries.move_to_end((fed, user))
            return entry

    def put(self, entry: UserIndex) -> None:
        """Keep ``entry`` (replacing the user's older one), evicting least recently used entries."""
        key = (entry.fed, entry.user)
        size = entry.nbytes
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.generation > entry.generation:
                return  # a newer build landed first
            if old is not None:
                self._drop(key)
            if size > self.budget_bytes:
                return
            while self._entries and self._bytes + size > self.budget_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = entry
            self._bytes += size

    def invalidate(self, fed: str, user: str) -> None:
        with self._lock:
            if (fed, user) in self._entries:
                self._drop((fed, user))

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes

    async def get_or_build(
        self, fed: str, user: str, generation: int, build: Callable[[], Awaitable[UserIndex]]
    ) -> tuple[UserIndex, bool]:
        """``(index, hit)``: the cached index of this generation, or the result of ``build`` (shared by
        concurrent callers that miss on the same generation)."""
        entry = self.get(fed, user, generation)
        if entry is not None:
            self.hits += 1
            return entry, True
        self.misses += 1
        key = (fed, user, generation)
        pending = self._building.get(key)
        if pending is not None:
            return await asyncio.shield(pending), False
        future: asyncio.Future[UserIndex] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            entry = await build()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as err:
            future.set_exception(err)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._building.pop(key, None)
        future.set_result(entry)
        self.put(entry)  # its generation may be newer than the one asked for: put keeps the newest
        return entry, False
