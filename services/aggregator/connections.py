"""The Kafka clients every aggregator role opens, configured in one place.

``group_consumer``: a consumer in one of the aggregator's groups (single, ``-leaf`` or ``-root``) with
manual commits (offsets live in Redis or in a leaf's transaction), the broker-derived size limits and
the group timing of :class:`~services.settings.AggregatorSettings`. ``outbound_producer``: the
idempotent, ``acks=all`` producer of dead letters and version announcements. Both authenticate as the
``aggregator`` principal (:func:`services.transport.kafka_kwargs`).
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.settings import AggregatorSettings, PFISettings
from services.stack.topics import consumer_limits, producer_limits
from services.transport import kafka_kwargs


def group_consumer(
    settings: PFISettings,
    agg: AggregatorSettings,
    *,
    group_id: str,
    client_id: str,
    read_committed: bool = False,
) -> AIOKafkaConsumer:
    """A consumer of an aggregator group; ``read_committed`` for topics written in transactions."""
    return AIOKafkaConsumer(
        **kafka_kwargs(settings, "aggregator"),
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        **consumer_limits(settings),
        max_poll_interval_ms=agg.max_poll_interval_ms,
        session_timeout_ms=agg.session_timeout_ms,
        heartbeat_interval_ms=agg.heartbeat_interval_ms,
        max_poll_records=agg.max_poll_records,
    )


def outbound_producer(settings: PFISettings, *, client_id: str) -> AIOKafkaProducer:
    """The producer of dead letters and version announcements (idempotent, ``acks=all``)."""
    return AIOKafkaProducer(
        **kafka_kwargs(settings, "aggregator"),
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        **producer_limits(settings),
    )
