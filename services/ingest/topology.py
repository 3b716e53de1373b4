"""Which Kafka key an update message gets (issue 15): the federation's aggregation topology, cached.

A ``single`` federation's messages are keyed by the federation (one partition, one aggregator); a
``hierarchical`` one's by ``federation/client`` (:func:`services.ingest.producer.update_key`), so its
updates spread over the partitions and the leaves. The spec is read from Redis at most every ``ttl_s``
per federation; a missing or unreadable spec keys by federation (the aggregator then refuses the message
with the reason it would give anyway).
"""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis

from services.ingest.producer import update_key
from services.store import keys

MAX_CACHED = 10_000


class TopologyCache:
    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, str]] = {}

    async def topology(self, redis: Redis, federation: str) -> str:
        hit = self._cache.get(federation)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        raw = await redis.get(keys.spec(federation))
        topology = "single"
        if raw is not None:
            try:
                value = json.loads(raw).get("aggregation", {}).get("topology", "single")
                topology = value if value in ("single", "hierarchical") else "single"
            except (ValueError, AttributeError):
                topology = "single"
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[federation] = (now, topology)
        return topology

    async def key(self, redis: Redis, federation: str, client_id: str) -> str:
        """The Kafka key of ``client_id``'s update messages in ``federation``."""
        return update_key(federation, client_id, await self.topology(redis, federation))
