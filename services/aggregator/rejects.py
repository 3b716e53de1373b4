"""Dead-lettering refused messages and expired chunked uploads, with their metrics and durable counts."""

from __future__ import annotations

import logging
from typing import Any

from schemas.chunking import ExpiredUpload
from schemas.errors import RejectedInput
from schemas.events import AdapterUpdateChunk, Envelope
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.publisher import Publisher
from services.aggregator.runtime import FederationRuntime, Position

log = logging.getLogger("pfi.aggregator")


class Rejections:
    def __init__(self, publisher: Publisher, metrics: AggregatorMetrics, topic: str) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.topic = topic

    async def reject(
        self,
        runtime: FederationRuntime | None,
        err: RejectedInput,
        envelope: Envelope[Any] | None,
        partition: int,
        offset: int,
        *,
        federation: str | None = None,
    ) -> None:
        """Count a refused message (durable with the federation's next commit) and dead-letter it.
        ``federation``: the federation it names when no runtime is loaded for it (an existing one that
        cannot be loaded: named in the metric, where an unknown name would be ``unknown``)."""
        data = envelope.data if envelope is not None else None
        label = runtime.name if runtime is not None else (federation or "unknown")
        self.metrics.updates_rejected.labels(label, err.reason.value).inc()
        if runtime is not None:
            runtime.pending_stats["rejected_total"] += 1
            runtime.pending_stats[f"rejected:{err.reason.value}"] += 1
        log.info("rejected %s@%s:%s: %s (%s)", label, partition, offset, err.reason.value, err.message)
        await self.publisher.dead_letter(
            err.reason,
            err.message,
            federation=getattr(data, "federation", None) or (runtime.name if runtime else federation),
            client_id=getattr(data, "client_id", None),
            update_id=getattr(data, "update_id", None),
            topic=self.topic,
            partition=partition,
            offset=offset,
            original_type=envelope.type if envelope is not None else None,
        )

    async def expired(self, runtime: FederationRuntime, dropped: ExpiredUpload[Position]) -> None:
        why = "expired"
        self.metrics.updates_rejected.labels(runtime.name, dropped.reason.value).inc()
        runtime.pending_stats["rejected_total"] += 1
        runtime.pending_stats[f"rejected:{dropped.reason.value}"] += 1
        pos = dropped.first_position
        await self.publisher.dead_letter(
            dropped.reason,
            f"chunked upload {why} with {dropped.received}/{dropped.count} chunks",
            federation=dropped.federation,
            client_id=dropped.client_id,
            update_id=dropped.update_id,
            topic=self.topic,
            partition=pos[0] if pos else None,
            offset=pos[1] if pos else None,
            original_type=AdapterUpdateChunk.event_type(),
        )
