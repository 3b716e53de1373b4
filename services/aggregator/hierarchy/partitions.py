"""A leaf's state per owned partition of the updates topic, and how a partition is taken over.

Taking a partition (:func:`open_partition`) first initialises the partition's transactional producer
(``InitProducerId`` with the partition's stable transactional id: Kafka aborts whatever transaction a
previous owner left open and fences that owner), then reads the committed offset (``safe``) and the replay
zone's end (``hwm``, in the offset's metadata) that the last committed transaction stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.chunking import Reassembler
from services.aggregator.hierarchy.partial import Partial, PartialBuilder
from services.aggregator.runtime import Position
from services.settings import PFISettings
from services.stack.topics import producer_limits
from services.transport import kafka_kwargs

TRANSACTION_TIMEOUT_MS = 20_000
MAX_EMITTED_MEMORY = 100_000  # (federation, client, update id) remembered per partition for the dedupe


def split_key(key: bytes | None) -> tuple[str, str] | None:
    """``federation/client`` of a hierarchical update's key; None for any other key."""
    try:
        text = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        return None
    fed, sep, client = text.partition("/")
    return (fed, client) if sep and fed and client and "/" not in client else None


@dataclass
class PartitionState:
    producer: AIOKafkaProducer
    processed: int  # next offset to handle
    hwm: int  # end of the replay zone (from the committed offset's metadata)
    builders: dict[str, PartialBuilder] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(
        default_factory=dict
    )  # federation -> spec fingerprint of its builder
    closed: list[Partial] = field(default_factory=list)
    reassemblers: dict[str, Reassembler[Position]] = field(default_factory=dict)
    emitted: dict[tuple[str, str, str], None] = field(default_factory=dict)  # insertion-ordered set
    last_commit: float = field(default_factory=time.monotonic)
    committed: int = 0

    def pending_updates(self) -> int:
        return sum(len(b) for b in self.builders.values()) + sum(p.count for p in self.closed)

    def safe(self) -> int:
        firsts = [r.oldest_pending_position() for r in self.reassemblers.values()]
        return min([self.processed, *(pos[1] for pos in firsts if pos is not None)])

    def remember(self, member: tuple[str, str, str]) -> None:
        self.emitted[member] = None
        while len(self.emitted) > MAX_EMITTED_MEMORY:
            self.emitted.pop(next(iter(self.emitted)))


async def open_partition(
    consumer: AIOKafkaConsumer,
    settings: PFISettings,
    tp: TopicPartition,
    transactional_id: str,
    instance: str,
) -> PartitionState:
    """Fence the previous owner, seek ``tp`` to the committed offset; the partition's fresh state."""
    producer = AIOKafkaProducer(
        **kafka_kwargs(settings, "aggregator"),
        client_id=f"{instance}-p{tp.partition}",
        transactional_id=transactional_id,
        # A transaction left open (a hung or killed leaf) holds back the partials topic's last stable
        # offset, and so every root: the broker aborts it after this long.
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        acks="all",
        enable_idempotence=True,
        **producer_limits(settings),
    )
    await producer.start()  # InitProducerId: aborts and fences a zombie's open transaction
    try:
        committed = await consumer._coordinator.fetch_committed_offsets([tp])  # with its metadata
        mark = committed.get(tp)
        offset = mark.offset if mark is not None and mark.offset >= 0 else None
        if offset is None:
            offset = (await consumer.beginning_offsets([tp]))[tp]
        hwm = offset
        if mark is not None and mark.metadata:
            try:
                hwm = max(offset, int(json.loads(mark.metadata).get("hwm", offset)))
            except (ValueError, TypeError, AttributeError):
                hwm = offset
        consumer.seek(tp, offset)
    except BaseException:
        await producer.stop()
        raise
    return PartitionState(producer, offset, hwm)


def has_update(partial: Partial, update_id: str) -> bool:
    """Whether ``update_id`` is in ``partial``."""
    return any(c.update_id == update_id for c in partial.contributions)
