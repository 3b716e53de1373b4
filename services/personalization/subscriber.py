"""Announcements the service follows, from Redis streams (no polling per request):

* ``pfi:{fed}:events``: ``GlobalVersionPublished`` envelopes (field ``event``) that the aggregator's
  commit script and ``pfi federation rollback`` append atomically with the version itself; each one
  makes the federation refresh (build + swap) in the background unless that exact (version, blob
  digest) is already served: the same number with another digest (a version re-made after a Redis
  failover) is rebuilt like a new version;
* ``pfi:{fed}:user-events``: personal adapter uploads and deletes of every replica (field ``user`` is a
  digest of the user id, ``digest`` the stored blob's hash); each one drops the cached copy here
  unless it is already that exact blob. This is the cross-replica cache invalidation.

One blocking ``XREAD`` on a dedicated connection covers the streams of every federation this replica
has touched. A federation's positions are taken when it is first used (:meth:`watch`, *before* its
state is read), so nothing published afterwards is missed; after a Redis error the loop reconnects,
resumes from its positions, drops the personal adapter cache (an invalidation may have been trimmed
away) and refreshes every federation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.errors import PFIError
from schemas.events import GlobalVersionPublished, parse_envelope
from services.personalization.engine import Engine
from services.personalization.metrics import ServeMetrics
from services.personalization.user_adapters import events_key
from services.store import keys

log = logging.getLogger("pfi.serve.subscriber")


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def last_id(redis: Redis, stream: str) -> str:
    entries = await redis.xrevrange(stream, "+", "-", count=1)
    return _text(entries[0][0]) if entries else "0-0"


class Subscriber:
    def __init__(self, redis: Redis, engine: Engine, metrics: ServeMetrics, *, block_ms: int = 500) -> None:
        self.redis = redis  # dedicated: it spends its time in blocking reads
        self.engine = engine
        self.metrics = metrics
        self.block_ms = block_ms
        self.positions: dict[str, str] = {}
        self._streams: dict[str, tuple[str, str]] = {}  # stream key -> (federation, "version" | "user")
        self._stopping = asyncio.Event()
        self.running = False
        self.last_success = 0.0

    async def watch(self, fed: str) -> None:
        """Follow ``fed``'s streams from their current ends (idempotent)."""
        for stream, kind in ((keys.events(fed), "version"), (events_key(fed), "user")):
            if stream in self.positions:
                continue
            self.positions[stream] = await last_id(self.redis, stream)
            self._streams[stream] = (fed, kind)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self.running = True
        backoff = 0.2
        failed = False
        try:
            while not self._stopping.is_set():
                if not self.positions:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self.block_ms / 1000)
                    continue
                try:
                    streams: dict[Any, Any] = dict(self.positions)
                    batch: Any = await self.redis.xread(streams, count=256, block=self.block_ms)
                except (RedisError, OSError) as err:
                    self.metrics.subscriber_errors.inc()
                    log.warning("subscriber: Redis read failed (%s); retrying in %.1fs", err, backoff)
                    failed = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
                self.last_success = time.time()
                self.metrics.subscriber_last_read.set(self.last_success)
                if failed:
                    failed = False
                    self._recover()
                for stream_raw, entries in batch or []:
                    stream = _text(stream_raw)
                    for entry_id, fields in entries:
                        self.positions[stream] = _text(entry_id)
                        self._handle(stream, {_text(k): _text(v) for k, v in fields.items()})
        finally:
            self.running = False

    def _recover(self) -> None:
        log.info("subscriber: reconnected; dropping the adapter cache and refreshing every federation")
        self.engine.cache.clear("invalidated")
        for fed in self.engine.runtimes:
            self.engine.on_version_event(fed, None, None)

    def _handle(self, stream: str, fields: dict[str, str]) -> None:
        fed, kind = self._streams.get(stream, ("", ""))
        try:
            if kind == "version":
                envelope = parse_envelope(json.loads(fields["event"]), GlobalVersionPublished)
                event: GlobalVersionPublished = envelope.data
                self.engine.on_version_event(fed, event.version, event.created_at.timestamp(), event.digest)
            elif kind == "user":
                generation = fields.get("generation")
                self.engine.on_user_event(
                    fed,
                    fields["user"],
                    fields.get("op", "put"),
                    fields.get("digest"),
                    int(generation) if generation is not None else None,
                )
        except (KeyError, ValueError, PFIError) as err:
            self.metrics.announcements.labels(kind="malformed").inc()
            log.warning("subscriber: skipping a malformed entry of %s: %s", stream, err)
