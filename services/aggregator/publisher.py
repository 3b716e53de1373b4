"""What the aggregator writes to Kafka: dead-letter records and version announcements."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas.errors import RejectReason
from schemas.events import Envelope, GlobalVersionPublished, UpdateRejected, make_envelope, utcnow
from schemas.frame import encode_frame
from services.settings import PFISettings

log = logging.getLogger("pfi.aggregator")
MAX_DETAIL = 2000


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, settings: PFISettings, instance: str) -> None:
        self.producer = producer
        self.settings = settings
        self.source = f"pfi://aggregator/{instance}"

    async def dead_letter(
        self,
        reason: RejectReason,
        detail: str,
        *,
        federation: str | None,
        client_id: str | None,
        update_id: str | None,
        topic: str | None,
        partition: int | None,
        offset: int | None,
        original_type: str | None,
    ) -> None:
        record = UpdateRejected(
            reason=reason,
            detail=detail[:MAX_DETAIL],
            federation=federation,
            client_id=client_id,
            update_id=update_id,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            original_type=original_type,
            rejected_at=utcnow(),
        )
        # Deterministic id: a replayed rejection produces the same event (consumers can dedupe).
        event_id = f"dlq-{topic}-{partition}-{offset}-{reason.value}"
        envelope = make_envelope(record, source=self.source, subject=federation, event_id=event_id[:128])
        key = (federation or "unknown").encode()
        await self.producer.send_and_wait(self.settings.dlq_topic, encode_frame(envelope), key=key)

    def version_envelope(self, event: GlobalVersionPublished) -> Envelope[GlobalVersionPublished]:
        return make_envelope(
            event,
            source=self.source,
            subject=event.federation,
            event_id=f"{event.federation}-v{event.version}",
        )

    async def announce(self, envelope: Envelope[GlobalVersionPublished]) -> None:
        """Hand a committed version's announcement to the producer (the Redis stream already has it).

        Its delivery (acks=all) is confirmed in the background: waiting here would stall consumption for
        a broker round trip per version. Order is kept (one partition per federation, idempotent
        producer, one request in flight per partition) and the producer's ``stop()`` flushes the rest.
        """
        event = envelope.data
        try:
            delivery = await self.producer.send(
                self.settings.versions_topic, encode_frame(envelope), key=event.federation.encode()
            )
        except Exception as err:
            log.warning("could not announce %s v%d on Kafka: %s", event.federation, event.version, err)
            return
        delivery.add_done_callback(functools.partial(_delivered, event.federation, event.version))


def _delivered(federation: str, version: int, delivery: asyncio.Future[Any]) -> None:
    if delivery.cancelled():
        log.warning("announcement of %s v%d cancelled (producer stopped)", federation, version)
    elif (err := delivery.exception()) is not None:
        log.warning("could not announce %s v%d on Kafka: %s", federation, version, err)
