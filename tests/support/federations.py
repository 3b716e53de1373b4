"""Helpers for aggregator tests: federations on the tiny model, deltas, a running in-process aggregator."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from bench.chaos.ledger import ChaosClient
from clients.updates import update_messages
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.events import AggregationSpec, Envelope, FederationSpec, LoraSpec, canonical_json
from schemas.frame import MAGIC, decode_frame
from services.aggregator.service import Aggregator
from services.federation.admin import create_federation
from services.identity import ClientRegistry
from services.ingest.producer import UpdateProducer
from services.settings import AggregatorSettings, PFISettings
from services.store.versions import VersionStore
from services.transport import kafka_kwargs

TINY = "pfi/tiny-llama"


def fed_name() -> str:
    return f"fed-{uuid.uuid4().hex[:8]}"


def tiny_spec(name: str | None = None, **aggregation: Any) -> FederationSpec:
    agg = {"buffer_size": 3, "flush_timeout_s": 60.0, **aggregation}
    # Test rigs drive many updates from one or few clients: unless a test asks for the product default
    # (one update per client per buffer; tests/fuzz/test_fuzz_poisoning.py), a client may fill a buffer.
    agg.setdefault("max_client_updates", agg["buffer_size"])
    return FederationSpec(
        name=name or fed_name(),
        base_model=TINY,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        aggregation=AggregationSpec(**agg),
    )


async def new_federation(store: VersionStore, **aggregation: Any) -> FederationSpec:
    spec = tiny_spec(**aggregation)
    await create_federation(store, spec)
    return spec


async def global_state(store: VersionStore, name: str, version: int | None = None) -> dict[str, torch.Tensor]:
    v = await store.latest(name) if version is None else version
    assert v is not None
    blob = await store.get_blob(name, v)
    assert blob is not None
    return decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)


def random_delta(
    shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.01
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


Client = ChaosClient  # a registered key that builds signed updates


async def new_client(redis: Redis, spec: FederationSpec, client_id: str | None = None) -> Client:
    cid = client_id or f"c-{uuid.uuid4().hex[:8]}"
    return Client(spec, cid, await ClientRegistry(redis).register(spec.name, cid))


@contextlib.asynccontextmanager
async def running_aggregator(settings: PFISettings, **overrides: Any) -> AsyncIterator[Aggregator]:
    defaults: dict[str, Any] = {
        "group_id": f"pfi-aggregator-{settings.topic_prefix}",
        "port": 0,
        "progress_interval_s": 0.5,
    }
    agg_settings = AggregatorSettings(**{**defaults, **overrides})
    aggregator = Aggregator(settings, agg_settings, CollectorRegistry())
    task = asyncio.create_task(aggregator.run())
    try:
        await asyncio.wait_for(aggregator.started.wait(), 60)
        yield aggregator
    finally:
        aggregator.stopping.set()
        await asyncio.wait_for(task, 60)


async def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.2) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def read_events(
    settings: PFISettings,
    topic: str,
    expect: int,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> list[Any]:
    """Consume ``topic`` from the beginning until ``expect`` framed events arrived (or the timeout)."""
    from aiokafka import AIOKafkaConsumer

    from services.stack.topics import consumer_limits

    consumer = AIOKafkaConsumer(
        topic,
        **kafka_kwargs(settings, "admin"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **consumer_limits(settings),
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expect and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out += [decode_frame(r.value, max_frame_bytes=1 << 24).data for r in records]
    finally:
        await consumer.stop()
    return out


async def read_dead_letters(
    settings: PFISettings,
    expect: int,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> list[Any]:
    """Consume the DLQ topic from the beginning until ``expect`` records arrived."""
    return await read_events(settings, settings.dlq_topic, expect, timeout)


# -- more helpers (rejects / versions tests) ---------------------------------------------------------

Position = tuple[int, int]  # (partition, offset) of a produced message


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


async def produce(producer: UpdateProducer, messages: list[bytes], key: bytes | None) -> list[Position]:
    """Produce raw message values in order (one key: one partition); returns where each landed."""
    futures = [await producer.producer.send(producer.settings.updates_topic, m, key=key) for m in messages]
    out: list[Position] = []
    for future in futures:
        meta = await future
        out.append((meta.partition, meta.offset))
    return out


def chunked(
    envelope: Envelope[Any], settings: PFISettings, chunk_bytes: int, key: bytes | None = None
) -> list[bytes]:
    """The messages of ``envelope`` split with ``chunk_bytes`` (whole frame if it fits), each chunk signed
    with ``key`` (the client's; the aggregator refuses unsigned chunks)."""
    return update_messages(envelope, settings.model_copy(update={"chunk_bytes": chunk_bytes}), key=key)


def frame_parts(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON object, payload) of a frame: edit the header and rebuild with :func:`raw_frame`."""
    import json
    import struct

    (size,) = struct.unpack_from(">I", frame, len(MAGIC))
    start = len(MAGIC) + 4
    return json.loads(frame[start : start + size]), frame[start + size :]


def raw_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A frame from a hand-built header (no validation at all)."""
    body = canonical_json(header)
    return MAGIC + len(body).to_bytes(4, "big") + body + payload


async def dead_letters(
    settings: PFISettings, expect: int, *, within: float = 30.0, settle: float = 0.0
) -> list[Any]:
    """``UpdateRejected`` records of the DLQ topic: wait for ``expect`` of them, then keep reading for
    ``settle`` seconds more (to see records that should not be there)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.dlq_topic,
        **kafka_kwargs(settings, "admin"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Any] = []
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + within
        settled: float | None = None
        while loop.time() < (settled if settled is not None else deadline):
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out += [decode_frame(r.value, max_frame_bytes=1 << 24).data for r in records]
            if settled is None and len(out) >= expect:
                settled = loop.time() + settle
    finally:
        await consumer.stop()
    return out


def sample(aggregator: Aggregator, name: str, **labels: str) -> float:
    """A sample of the aggregator's registry (0.0 when the labelled child does not exist)."""
    value = aggregator.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_version(store: VersionStore, name: str, version: int, within: float = 30.0) -> None:
    """Wait until the federation's head reaches ``version``."""

    async def reached() -> bool:
        head = await store.head(name)
        return head is not None and head >= version

    await wait_for(reached, timeout=within, interval=0.05)
