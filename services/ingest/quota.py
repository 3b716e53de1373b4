"""Per-client admission of the ingest route: an in-flight cap and a byte-rate token bucket.

State is per replica and in memory (bounded: least recently used clients are forgotten first). A client
over either limit gets 429 with ``Retry-After``; the bytes are charged before the body is read (its
declared ``Content-Length``, else the cap of one message) and the unused part is refunded after.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

ClientKey = tuple[str, str]  # (federation, client id)


@dataclass
class _Client:
    tokens: float
    updated: float
    in_flight: int = 0


@dataclass(frozen=True)
class Refusal:
    reason: str  # "client_in_flight" | "total_in_flight" | "client_bytes"
    retry_after_s: int
    message: str


@dataclass
class Quotas:
    client_in_flight: int
    total_in_flight: int
    bytes_per_s: float
    burst_bytes: int
    max_clients: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _clients: OrderedDict[ClientKey, _Client] = field(default_factory=OrderedDict)
    total: int = 0

    def _client(self, key: ClientKey) -> _Client:
        now = self.clock()
        entry = self._clients.get(key)
        if entry is None:
            entry = _Client(tokens=float(self.burst_bytes), updated=now)
            self._clients[key] = entry
            while len(self._clients) > self.max_clients:
                oldest, old = next(iter(self._clients.items()))
                if old.in_flight:  # never forget a client with requests in progress
                    self._clients.move_to_end(oldest)
                    break
                del self._clients[oldest]
        else:
            self._clients.move_to_end(key)
            entry.tokens = min(
                float(self.burst_bytes), entry.tokens + (now - entry.updated) * self.bytes_per_s
            )
            entry.updated = now
        return entry

    def admit(self, key: ClientKey, size: int) -> Refusal | None:
        """Take a request slot and ``size`` bytes for ``key``; a :class:`Refusal` when over a limit."""
        if self.total >= self.total_in_flight:
            return Refusal("total_in_flight", 1, "the ingest is at its capacity; retry shortly")
        entry = self._client(key)
        if entry.in_flight >= self.client_in_flight:
            return Refusal(
                "client_in_flight", 1, f"at most {self.client_in_flight} uploads of one client at once"
            )
        if entry.tokens < size:
            wait = (size - entry.tokens) / self.bytes_per_s
            return Refusal(
                "client_bytes",
                max(1, math.ceil(wait)),
                f"upload quota of {self.bytes_per_s:.0f} bytes/s exceeded; retry in {wait:.1f}s",
            )
        entry.tokens -= size
        entry.in_flight += 1
        self.total += 1
        return None

    def release(self, key: ClientKey, *, refund: int = 0) -> None:
        """End a request admitted with :meth:`admit`; ``refund``: charged bytes that were not used."""
        self.total = max(0, self.total - 1)
        entry = self._clients.get(key)
        if entry is None:
            return
        entry.in_flight = max(0, entry.in_flight - 1)
        if refund > 0:
            entry.tokens = min(float(self.burst_bytes), entry.tokens + refund)
