"""The verifier's view of client keys: per federation, active clients of the Redis registry only.

:meth:`FederationKeys.view` gives a :class:`~schemas.signing.KeyStore` whose ``get`` reads the current
in-memory snapshot (no I/O: it is called from worker threads). The event loop calls :meth:`refresh`
(rate-limited; it GETs each federation's epoch in one pipeline and HGETALLs only the federations whose
epoch moved) and :meth:`ensure` for an unknown client id (one HGET: a client that enrolled a moment ago
is accepted at once; an id that is not registered never reloads the registry).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from redis.asyncio import Redis

from schemas.signing import KeyStore
from services.identity.registry import _text, parse_record
from services.store import keys as rk

log = logging.getLogger("pfi.identity.keys")


class _View:
    __slots__ = ("_fed", "_owner")

    def __init__(self, owner: FederationKeys, fed: str) -> None:
        self._owner = owner
        self._fed = fed

    def get(self, client_id: str) -> bytes | None:
        return self._owner._keys.get(self._fed, {}).get(client_id)


class FederationKeys:
    """Active client keys per federation (a cache of ``pfi:{fed}:clients``)."""

    def __init__(self, *, min_refresh_interval_s: float = 1.0) -> None:
        self._min_interval = min_refresh_interval_s
        self._keys: dict[str, dict[str, bytes]] = {}  # replaced per federation, never mutated in place
        self._epochs: dict[str, int] = {}
        self._checked: dict[str, float] = {}

    def view(self, fed: str) -> KeyStore:
        """The active clients of ``fed`` (live: reflects later refreshes)."""
        return _View(self, fed)

    def epoch(self, fed: str) -> int | None:
        """The registry epoch of the loaded snapshot (None: never loaded)."""
        return self._epochs.get(fed)

    async def refresh(self, redis: Redis, feds: Iterable[str], *, force: bool = False) -> None:
        now = time.monotonic()
        due = [
            f for f in dict.fromkeys(feds) if force or now - self._checked.get(f, -1e9) >= self._min_interval
        ]
        if not due:
            return
        async with redis.pipeline(transaction=False) as pipe:
            for fed in due:
                pipe.get(rk.clients_epoch(fed))
            epochs = await pipe.execute()
        moved: list[tuple[str, int]] = []
        for fed, raw in zip(due, epochs, strict=True):
            self._checked[fed] = now
            epoch = int(raw) if raw is not None else 0
            if force or fed not in self._epochs or self._epochs[fed] != epoch:
                moved.append((fed, epoch))
        if not moved:
            return
        async with redis.pipeline(transaction=False) as pipe:
            for fed, _ in moved:
                pipe.hgetall(rk.clients(fed))
            tables = await pipe.execute()
        for (fed, epoch), table in zip(moved, tables, strict=True):
            active: dict[str, bytes] = {}
            for field, value in table.items():
                client_id = _text(field)
                try:
                    record = parse_record(fed, client_id, value)
                except (ValueError, KeyError, TypeError) as err:
                    log.warning("%s: ignoring a bad registry entry for %r: %s", fed, client_id, err)
                    continue
                if record.active:
                    active[client_id] = record.key
            self._keys[fed] = active  # one reference swap: readers see the old or the new snapshot
            self._epochs[fed] = epoch

    async def ensure(self, redis: Redis, fed: str, client_id: str) -> None:
        """Make sure a client that registered since the last refresh is known (one HGET when unknown)."""
        if self.view(fed).get(client_id) is not None:
            return
        if fed not in self._epochs:
            await self.refresh(redis, [fed], force=True)
            return
        raw = await redis.hget(rk.clients(fed), client_id)
        if raw is None:
            return
        try:
            record = parse_record(fed, client_id, raw)
        except (ValueError, KeyError, TypeError):
            return
        if record.active:
            self._keys[fed] = {**self._keys.get(fed, {}), client_id: record.key}
