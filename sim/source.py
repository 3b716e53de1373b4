"""A :class:`~clients.source.GlobalSource` that reads the version store in Redis directly (harnesses
only: a device reads the service's HTTP API). Decoded adapters are cached per version, so a fleet of
virtual agents in one process decodes each version once."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from clients.source import GlobalAdapter, GlobalSource, SourceError
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.events import FederationSpec
from services.store.versions import VersionStore


class VersionStoreSource:
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


def _conforms(source: VersionStoreSource) -> GlobalSource:
    """Static check (mypy): :class:`VersionStoreSource` implements the ``GlobalSource`` protocol."""
    return source
