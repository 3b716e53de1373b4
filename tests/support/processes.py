"""Run ``pfi aggregator`` as real OS processes (crash and rebalance tests), and audit what they wrote.

The process, fleet, audit and DLQ helpers live in :mod:`bench.chaos` (``pfi bench chaos`` uses them too)
and are re-exported here for the tests:

* :class:`AggregatorProcess`, :func:`aggregator_fleet`, :func:`names_on_partitions`, :class:`Timeline`
  (:mod:`bench.chaos.processes`);
* :func:`audit_federation`, :func:`dead_letter_records`, :func:`wait_aggregated` (:mod:`bench.chaos.audit`);
* :class:`UpdateStream` (here): several clients sending valid signed updates concurrently, in mixed
  encodings (so some travel as several chunks, interleaved with other uploads on the same partition).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from bench.chaos.audit import Audit, audit_federation, dead_letter_records, wait_aggregated
from bench.chaos.ledger import ENCODINGS
from bench.chaos.processes import (
    FAST_GROUP,
    ROOT,
    AggregatorFleet,
    AggregatorProcess,
    Timeline,
    aggregator_command,
    aggregator_fleet,
    names_on_partitions,
    partition_of,
    settings_env,
)
from services.ingest.producer import UpdateProducer
from services.store.versions import VersionStore
from tests.support.federations import Client, random_delta

__all__ = [
    "ENCODINGS",
    "FAST_GROUP",
    "ROOT",
    "AggregatorFleet",
    "AggregatorProcess",
    "Audit",
    "Timeline",
    "UpdateStream",
    "aggregator_command",
    "aggregator_fleet",
    "audit_federation",
    "dead_letter_records",
    "names_on_partitions",
    "partition_of",
    "settings_env",
    "wait_aggregated",
]


@dataclass
class UpdateStream:
    """Valid signed updates from several clients, concurrently (so chunks of different uploads interleave
    on a partition); ``sent`` holds the ids Kafka acknowledged, per federation."""

    store: VersionStore
    producer: UpdateProducer
    clients: list[Client]
    shapes: dict[str, tuple[int, ...]]
    seed: int
    sent: dict[str, list[str]] = field(default_factory=dict)
    messages: int = 0
    multi_chunk: int = 0

    async def run(self, per_client: int, gap_s: tuple[float, float]) -> None:
        await asyncio.gather(*(self._client(i, c, per_client, gap_s) for i, c in enumerate(self.clients)))

    async def _client(self, index: int, client: Client, count: int, gap_s: tuple[float, float]) -> None:
        rng = random.Random(self.seed * 1000 + index)
        fed = client.spec.name
        for i in range(count):
            latest = await self.store.latest(fed)
            envelope = client.update(
                random_delta(self.shapes, seed=rng.randrange(1 << 30)),
                base_version=latest or 0,
                num_samples=rng.randint(1, 64),
                encoding=ENCODINGS[(index + i) % len(ENCODINGS)],
            )
            sent = await self.producer.send(envelope, key=client.key)  # chunks signed: the aggregator checks
            self.messages += sent
            self.multi_chunk += sent > 1
            self.sent.setdefault(fed, []).append(envelope.data.update_id)
            await asyncio.sleep(rng.uniform(*gap_s))

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.sent.values())
