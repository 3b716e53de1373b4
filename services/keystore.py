"""The verifier's view of client keys: a keys file, the Redis registry, and/or a master key."""

from __future__ import annotations

import inspect
import time
from typing import Any

from schemas.errors import ConfigError
from schemas.signing import FileKeyStore, RedisKeyStore, derive_client_key
from services.settings import PFISettings


class ClientKeys:
    """Looks a client's key up in the keys file, then the Redis registry (cached), then derives it
    from the master key. ``get`` is thread-safe and never does I/O; ``refresh`` reloads the cache."""

    def __init__(self, settings: PFISettings, *, min_refresh_interval_s: float = 0.5) -> None:
        self._file = FileKeyStore(settings.keys_file) if settings.keys_file else None
        self._redis = RedisKeyStore()
        self._master: bytes | None = None
        if settings.signing_master_key:
            try:
                self._master = bytes.fromhex(settings.signing_master_key)
            except ValueError:
                raise ConfigError("PFI_SIGNING_MASTER_KEY must be hex") from None
        self._min_interval = min_refresh_interval_s
        self._last_refresh = 0.0

    def get(self, client_id: str) -> bytes | None:
        if self._file is not None and (key := self._file.get(client_id)) is not None:
            return key
        if (key := self._redis.get(client_id)) is not None:
            return key
        return derive_client_key(self._master, client_id) if self._master is not None else None

    async def refresh(self, redis_client: Any, *, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_refresh < self._min_interval:
            return
        self._last_refresh = now
        await self._redis.refresh(redis_client)

    async def ensure(self, redis_client: Any, client_id: str) -> None:
        """Refresh (rate-limited) when ``client_id`` is unknown: it may have registered just now.

        Inside the rate limit, one ``HEXISTS`` decides: when the registry holds the client (it registered
        after the last load), reload now, so its first update is not refused; ids that are not registered
        never make a message reload the whole registry."""
        if self.get(client_id) is not None:
            return
        await self.refresh(redis_client, force=False)
        if self.get(client_id) is None:
            exists = redis_client.hexists(self._redis.hash_key, client_id)
            if await exists if inspect.isawaitable(exists) else exists:
                await self.refresh(redis_client, force=True)
