"""Building, signing and sending adapter updates (the edge side of the wire contract).

``build_update`` makes a signed envelope from a delta; ``UpdateProducer`` frames it, splits it into
chunks when it is over the message limit (all keyed by federation, so they land on one partition in
order) and produces them with an idempotent ``acks=all`` producer.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import torch
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from schemas.chunking import split_frame
from schemas.codec import encode_tensors, sha256_hex
from schemas.errors import SchemaError
from schemas.events import (
    AdapterUpdate,
    DPMetadata,
    Envelope,
    TensorEncoding,
    TrainingMetrics,
    field_of,
    make_envelope,
)
from schemas.frame import encode_frame
from schemas.signing import sign_update
from services.settings import PFISettings
from services.stack.topics import producer_limits


def build_update(
    *,
    federation: str,
    client_id: str,
    spec_fingerprint: str,
    base_version: int,
    num_samples: int,
    delta: Mapping[str, torch.Tensor],
    key: bytes | None,
    encoding: TensorEncoding | None = None,
    metrics: TrainingMetrics | None = None,
    dp: DPMetadata | None = None,
    update_id: str | None = None,
) -> Envelope[AdapterUpdate]:
    """A signed (when ``key`` is given) ``AdapterUpdate`` envelope carrying ``delta``.

    Raises :class:`~schemas.errors.SchemaError` (naming the field) for a value the aggregator would
    dead-letter anyway (an empty id, ``num_samples < 1``...), before anything is sent."""
    encoding = encoding or TensorEncoding()
    payload = encode_tensors(delta, encoding)
    try:
        update = AdapterUpdate(
            federation=federation,
            client_id=client_id,
            update_id=update_id or f"{client_id}-{uuid.uuid4().hex[:16]}",
            base_version=base_version,
            num_samples=num_samples,
            spec_fingerprint=spec_fingerprint,
            encoding=encoding,
            payload_sha256=sha256_hex(payload),
            payload=payload,
            metrics=metrics or TrainingMetrics(),
            dp=dp,
        )
    except ValidationError as err:
        field, msg = field_of(err)
        raise SchemaError(msg, field=field) from None
    envelope = make_envelope(update, source=f"pfi://client/{client_id}", subject=federation)
    return sign_update(envelope, key) if key is not None else envelope


def update_messages(envelope: Envelope[AdapterUpdate], settings: PFISettings) -> list[bytes]:
    """The Kafka message values of one update: one frame, or its ordered chunks."""
    update = envelope.data
    return split_frame(
        encode_frame(envelope),
        federation=update.federation,
        client_id=update.client_id,
        update_id=update.update_id,
        chunk_bytes=settings.chunk_bytes,
        source=envelope.source,
    )


class UpdateProducer:
    """Sends updates to the updates topic; ``send`` returns once every message is acknowledged."""

    def __init__(self, settings: PFISettings, *, client_id: str = "pfi-edge") -> None:
        self.settings = settings
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap(),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            **producer_limits(settings),
        )

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def __aenter__(self) -> UpdateProducer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def send(self, envelope: Envelope[AdapterUpdate]) -> int:
        """Produce the update (chunked if needed); returns the number of Kafka messages."""
        return await self.send_raw(envelope.data.federation, update_messages(envelope, self.settings))

    async def send_raw(self, federation: str, messages: list[bytes]) -> int:
        key = federation.encode()
        futures = [await self.producer.send(self.settings.updates_topic, m, key=key) for m in messages]
        for future in futures:
            await future
        return len(messages)
