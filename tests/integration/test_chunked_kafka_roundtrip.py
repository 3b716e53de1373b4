"""A ~20 MiB adapter update through real Kafka: encode, sign, frame, split, produce, consume,
reassemble, decode, verify — the tensors come back identical."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.chunking import Reassembler, split_frame
from schemas.codec import decode_tensors, encode_tensors, sha256_hex
from schemas.events import (
    AdapterUpdate,
    AdapterUpdateChunk,
    Envelope,
    FederationSpec,
    TensorEncoding,
    make_envelope,
)
from schemas.frame import decode_frame, encode_frame
from schemas.signing import StaticKeyStore, generate_key, sign_update, verify_update
from services.settings import PFISettings
from services.stack.topics import consumer_limits, producer_limits
from services.transport import kafka_kwargs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MIB = 1024 * 1024


def peft_state(layers: int, rank: int = 16, hidden: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
            state[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=g)
    return state


def signed_update(
    state: dict[str, torch.Tensor], encoding: TensorEncoding, key: bytes
) -> Envelope[AdapterUpdate]:
    payload = encode_tensors(state, encoding)
    data = AdapterUpdate(
        federation=f"fed-{uuid.uuid4().hex[:8]}",
        client_id="client-1",
        update_id=uuid.uuid4().hex,
        base_version=0,
        num_samples=128,
        spec_fingerprint=FederationSpec(name="fed", base_model="tiny").fingerprint(),
        encoding=encoding,
        payload_sha256=sha256_hex(payload),
        payload=payload,
    )
    return sign_update(make_envelope(data, source="client/client-1", subject=data.update_id), key)


async def produce(settings: PFISettings, bootstrap: str, key: bytes, messages: list[bytes]) -> list[Any]:
    connection = {**kafka_kwargs(settings, "admin"), "bootstrap_servers": bootstrap}
    producer = AIOKafkaProducer(
        **connection, enable_idempotence=True, acks="all", **producer_limits(settings)
    )
    await producer.start()
    try:
        futures = [await producer.send(settings.updates_topic, message, key=key) for message in messages]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def consume_update(
    settings: PFISettings, bootstrap: str, partition: int, first_offset: int, count: int
) -> tuple[bytes | None, list[Any]]:
    """Read ``count`` records from ``first_offset``; feed chunks to a Reassembler."""
    connection = {**kafka_kwargs(settings, "admin"), "bootstrap_servers": bootstrap}
    consumer = AIOKafkaConsumer(
        **connection, enable_auto_commit=False, group_id=None, **consumer_limits(settings)
    )
    await consumer.start()
    reassembler: Reassembler[int] = Reassembler(
        max_total_bytes=settings.max_inflight_chunk_bytes,
        ttl_s=settings.chunk_ttl_s,
        max_update_bytes=settings.max_update_bytes,
    )
    tp = TopicPartition(settings.updates_topic, partition)
    records: list[Any] = []
    frame: bytes | None = None
    try:
        consumer.assign([tp])
        consumer.seek(tp, first_offset)
        deadline = time.monotonic() + 120
        while len(records) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                if len(records) == count:
                    break
                records.append(record)
                envelope = decode_frame(record.value, max_frame_bytes=settings.kafka_max_message_bytes)
                if isinstance(envelope.data, AdapterUpdateChunk):
                    assert reassembler.oldest_pending_position() in (None, first_offset)
                    done = reassembler.add(envelope.data, position=record.offset)
                    if done is not None:
                        frame = done
                else:
                    frame = record.value
    finally:
        await consumer.stop()
    assert reassembler.pending_uploads == 0
    return frame, records


async def round_trip(
    settings: PFISettings, bootstrap: str, state: dict[str, torch.Tensor], encoding: TensorEncoding
) -> tuple[int, int]:
    key = generate_key()
    envelope = signed_update(state, encoding, key)
    frame = encode_frame(envelope)
    assert len(frame) <= settings.max_update_bytes
    data = envelope.data
    messages = split_frame(
        frame,
        federation=data.federation,
        client_id=data.client_id,
        update_id=data.update_id,
        chunk_bytes=settings.chunk_bytes,
        source=envelope.source,
    )
    assert all(len(m) <= settings.kafka_max_message_bytes for m in messages)
    metadata = await produce(settings, bootstrap, data.federation.encode(), messages)
    partitions = {m.partition for m in metadata}
    assert len(partitions) == 1, "chunks keyed by federation must share one partition"
    offsets = [m.offset for m in metadata]
    assert offsets == sorted(offsets)

    got, records = await consume_update(settings, bootstrap, partitions.pop(), offsets[0], len(messages))
    assert len(records) == len(messages)
    assert all(r.key == data.federation.encode() for r in records)
    assert got == frame

    decoded = decode_frame(got, max_frame_bytes=settings.max_update_bytes, expected=AdapterUpdate)
    verify_update(decoded, StaticKeyStore({data.client_id: key}))
    assert decoded == envelope
    tensors = decode_tensors(
        decoded.data.payload, decoded.data.encoding, max_decoded_bytes=settings.max_decoded_bytes
    )
    assert tensors.keys() == state.keys()
    for name, original in state.items():
        expected = original if encoding.quantization == "none" else None
        if expected is not None:
            assert torch.equal(tensors[name], expected), name
        else:
            assert tensors[name].shape == original.shape
    return len(frame), len(messages)


async def test_20mib_update_through_kafka_in_chunks(pfi_settings: PFISettings, kafka_bootstrap: str) -> None:
    state = peft_state(layers=20)  # 80 tensors, 20 MiB of random fp32: incompressible
    size, chunks = await round_trip(
        pfi_settings,
        kafka_bootstrap,
        state,
        TensorEncoding(dtype="float32", quantization="none", compression="none"),
    )
    assert size > 20 * MIB
    assert chunks == -(-size // pfi_settings.chunk_bytes)
    assert chunks >= 20


async def test_small_update_travels_as_one_frame(pfi_settings: PFISettings, kafka_bootstrap: str) -> None:
    state = peft_state(layers=2, rank=4, hidden=256)
    size, chunks = await round_trip(pfi_settings, kafka_bootstrap, state, TensorEncoding(quantization="int8"))
    assert chunks == 1
    assert size < pfi_settings.chunk_bytes
