"""State and plumbing of a leaf (:mod:`.leaf`): its Kafka clients, Redis, worker pool and metrics, the
per-partition state, and the two things every stage of a leaf does: close a federation's partial and
dead-letter a refused message (its ``pfi_hierarchy_leaf_rejected_total`` counted)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from schemas.chunking import ReassemblyBudget
from schemas.errors import RejectedInput
from schemas.events import Envelope
from services.aggregator.connections import group_consumer, outbound_producer
from services.aggregator.core import cpu_pool
from services.aggregator.hierarchy.metrics import HierarchyMetrics
from services.aggregator.hierarchy.partitions import PartitionState
from services.aggregator.publisher import Publisher
from services.aggregator.runtime import FederationRuntime
from services.aggregator.state_loader import StateLoader
from services.health import HealthServer
from services.identity.keys import FederationKeys
from services.settings import AggregatorSettings, PFISettings
from services.store.versions import VersionStore

log = logging.getLogger("pfi.aggregator.leaf")


class LeafCore:
    """What every part of a leaf shares (the message handling in :mod:`.leaf_intake`, the partitions,
    loop and transactions in :mod:`.leaf`)."""

    def __init__(
        self, settings: PFISettings, agg: AggregatorSettings, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.agg = agg
        self.registry = registry or CollectorRegistry()
        self.metrics = HierarchyMetrics(self.registry)
        self.instance = agg.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topic = settings.updates_topic
        self.group = f"{agg.group_id}-leaf"
        self.redis = Redis.from_url(settings.redis())
        self.store = VersionStore(self.redis)
        self.keys = FederationKeys()
        self.pool = cpu_pool(agg)
        self.budget = ReassemblyBudget(settings.max_inflight_chunk_bytes)
        self.loader = StateLoader(self.store, settings, self.run_cpu, budget=self.budget)
        self.runtimes: dict[str, FederationRuntime] = {}
        self.parts: dict[int, PartitionState] = {}
        self.generation = 0
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.consumer = group_consumer(
            settings, agg, group_id=self.group, client_id=self.instance, read_committed=True
        )
        self.dlq = outbound_producer(settings, client_id=f"{self.instance}-dlq")
        self.publisher = Publisher(self.dlq, settings, self.instance)
        self.health = HealthServer(self.registry, self.ready, agg.host, agg.port)
        self._last_poll = 0.0
        self._seen_hint: dict[tuple[str, str, str], bool] = {}  # of the batch being handled

    async def run_cpu(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def ready(self) -> tuple[bool, dict[str, str]]:
        recent = time.monotonic() - self._last_poll < max(30.0, self.agg.max_poll_interval_ms / 1000)
        ok = self.started.is_set() and recent
        return ok, {"kafka": "ok" if ok else "not polling"}

    def close(self, name: str, state: PartitionState) -> None:
        """Turn the federation's builder into a partial, emitted with the partition's next transaction."""
        builder = state.builders.pop(name, None)
        fingerprint = state.fingerprints.pop(name, "")
        if builder is not None and len(builder):
            state.closed.append(builder.build(name, f"{self.instance}-{uuid.uuid4().hex}", fingerprint))

    async def reject(
        self, federation: str, err: RejectedInput, envelope: Envelope[Any] | None, partition: int, offset: int
    ) -> None:
        data = envelope.data if envelope is not None else None
        self.metrics.leaf_rejected.labels(federation, err.reason.value).inc()
        log.info(
            "leaf rejected %s@%s:%s: %s (%s)", federation, partition, offset, err.reason.value, err.message
        )
        await self.publisher.dead_letter(
            err.reason,
            err.message,
            federation=federation,
            client_id=getattr(data, "client_id", None),
            update_id=getattr(data, "update_id", None),
            topic=self.topic,
            partition=partition,
            offset=offset,
            original_type=envelope.type if envelope is not None else None,
        )
