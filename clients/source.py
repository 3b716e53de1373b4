"""Where an edge agent gets its federation's spec and the latest global adapter.

``GlobalSource`` is the small interface; ``RedisGlobalSource`` reads the Redis layout directly (for
the local stack and simulations). The personalization service's HTTP API becomes the default source
for real devices once it exists. Sources cache the decoded adapter per version, so a fleet of
virtual agents in one process decodes each version once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import torch
from redis.asyncio import Redis

from schemas.codec import decode_tensors
from schemas.errors import PFIError
from schemas.events import FederationSpec
from services.store.versions import VersionStore
from modeling.blobs import BLOB_ENCODING

StateDict = dict[str, torch.Tensor]


class SourceError(PFIError):
    """The federation or its global adapter could not be fetched."""


@dataclass(frozen=True)
class GlobalAdapter:
    federation: str
    version: int
    state: StateDict  # shared read-only: copy before modifying


class GlobalSource(Protocol):
    async def spec(self, federation: str) -> FederationSpec: ...

    async def latest(self, federation: str) -> GlobalAdapter: ...


class RedisGlobalSource:
    def __init__(self, redis: Redis, *, max_decoded_bytes: int = 1 << 31) -> None:
        self.store = VersionStore(redis)
        self._specs: dict[str, FederationSpec] = {}
        self._cache: dict[str, GlobalAdapter] = {}
        self._lock = asyncio.Lock()
        self._max = max_decoded_bytes

    async def spec(self, federation: str) -> FederationSpec:
        if federation not in self._specs:
            spec = await self.store.get_spec(federation)
            if spec is None:
                raise SourceError(f"federation {federation!r} does not exist")
            self._specs[federation] = spec
        return self._specs[federation]

    async def latest(self, federation: str) -> GlobalAdapter:
        version = await self.store.latest(federation)
        if version is None:
            raise SourceError(f"federation {federation!r} has no global adapter")
        cached = self._cache.get(federation)
        if cached is not None and cached.version == version:
            return cached
        async with self._lock:
            cached = self._cache.get(federation)
            if cached is not None and cached.version == version:
                return cached
            blob = await self.store.get_blob(federation, version)
            if blob is None:
                raise SourceError(f"{federation!r} v{version} is not retained any more")
            state = await asyncio.to_thread(decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=self._max)
            adapter = GlobalAdapter(federation, version, state)
            self._cache[federation] = adapter
            return adapter
