"""The runs of one size point of ``pfi bench aggregator`` (see :mod:`bench.aggregator`) on the real stack.

* :func:`point_settings`, :func:`setup_point`, :func:`teardown_point`: the point's own topics (one
  partition) and federation (v0 a zero adapter, :data:`CLIENTS` registered clients), all removed after;
* :func:`produce_backlog`: the signed updates, produced through the ingest's producer (not timed);
* :func:`raw_consume`: a plain ``AIOKafkaConsumer`` with the aggregator's client limits reads the backlog
  and counts its bytes (the baseline);
* :func:`aggregate_backlog`: the real :class:`~services.aggregator.service.Aggregator` in process
  (:class:`TimedAggregator`: the service plus two timestamps) consumes it; returns its wall and CPU
  seconds, the Redis commits' time and the exactly-once checks of the federation's status.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from bench.aggregator_data import ENCODING, SizePoint, random_delta
from bench.common import BenchError
from clients.updates import build_update, update_messages
from schemas.events import AdapterUpdate, Envelope, FederationSpec
from schemas.signing import derive_client_key
from services.aggregator.runtime import FederationRuntime, Position
from services.aggregator.service import Aggregator
from services.federation.admin import commit_state, federation_status
from services.identity import ClientRegistry
from services.ingest.producer import UpdateProducer
from services.settings import AggregatorSettings, PFISettings
from services.stack.topics import consumer_limits, delete_topics, ensure_topics
from services.store import keys as store_keys
from services.store.versions import VersionStore
from services.transport import kafka_kwargs

CLIENTS = 8


class TimedAggregator(Aggregator):
    """The service, unchanged, plus two timestamps: partition assignment and the last version commit."""

    assigned_at: float | None = None
    last_flush_at: float | None = None
    assigned_cpu: float | None = None  # process CPU seconds (every thread) at the same two moments
    last_flush_cpu: float | None = None

    async def seek_to_watermarks(self, assigned: list[TopicPartition]) -> None:
        # Stamped before the seek's awaits: on a fresh broker the poll task can fetch and handle the
        # whole (small) backlog while they run (a CI run measured the last commit before the stamp).
        if assigned and self.assigned_at is None:
            self.assigned_at = time.perf_counter()
            self.assigned_cpu = time.process_time()
        await super().seek_to_watermarks(assigned)

    async def flush(self, runtime: FederationRuntime, handled: Position | None = None) -> None:
        await super().flush(runtime, handled)
        self.last_flush_at = time.perf_counter()
        self.last_flush_cpu = time.process_time()


def point_settings(base: PFISettings, point: SizePoint, chunk_bytes: int | None) -> PFISettings:
    frame_cap = max(base.max_update_bytes, 2 * point.payload_bytes)  # room for the frame header
    update: dict[str, Any] = {
        "topic_prefix": point.federation,
        "update_partitions": 1,
        "max_update_bytes": frame_cap,
        "max_decoded_bytes": max(base.max_decoded_bytes, 2 * frame_cap),
        "max_inflight_chunk_bytes": max(base.max_inflight_chunk_bytes, 4 * frame_cap),
    }
    if chunk_bytes is not None:
        update["chunk_bytes"] = chunk_bytes
    return base.model_copy(update=update)


async def setup_point(settings: PFISettings, point: SizePoint, spec: FederationSpec, master: bytes) -> None:
    from modeling.lora import StateDict
    from services.aggregator.runtime import empty_like

    await ensure_topics(settings)
    redis = Redis.from_url(settings.redis())
    try:
        store = VersionStore(redis)
        if not await store.put_spec(spec):
            raise BenchError(f"federation {spec.name!r} exists already")
        zeros: StateDict = empty_like(random_delta(point.shapes, 0, 0.0))
        await commit_state(store, spec, zeros)  # v0: a zero adapter of the point's shapes
        fleet = {f"bench-c{i}": derive_client_key(master, f"bench-c{i}") for i in range(CLIENTS)}
        await ClientRegistry(redis).register_many(spec.name, fleet, via="bench")  # as an operator would
    finally:
        await redis.aclose()


async def teardown_point(settings: PFISettings, point: SizePoint) -> None:
    redis = Redis.from_url(settings.redis())
    try:
        doomed = [key async for key in redis.scan_iter(match=store_keys.prefix(point.federation) + "*")]
        await redis.delete(*doomed)
        await redis.srem(store_keys.FEDERATIONS, point.federation)
    finally:
        await redis.aclose()
    await delete_topics(settings, [settings.updates_topic, settings.dlq_topic, settings.versions_topic])


async def produce_backlog(
    settings: PFISettings, point: SizePoint, spec: FederationSpec, master: bytes, keep: int
) -> tuple[list[str], list[Envelope[AdapterUpdate]], list[bytes], int]:
    """Produce ``point.updates`` signed updates; returns their ids, the first ``keep`` envelopes, the
    messages of the first one, and the message count."""
    ids: list[str] = []
    kept: list[Envelope[AdapterUpdate]] = []
    first: list[bytes] = []
    count = 0

    def build(i: int) -> tuple[Envelope[AdapterUpdate], list[bytes]]:
        client = f"bench-c{i % CLIENTS}"
        envelope = build_update(
            federation=point.federation,
            client_id=client,
            spec_fingerprint=spec.fingerprint(),
            base_version=0,
            num_samples=8 + i % 5,
            delta=random_delta(point.shapes, seed=i + 1),
            key=derive_client_key(master, client),
            encoding=ENCODING,
            update_id=f"{point.federation}-u{i:05d}",
        )
        return envelope, update_messages(envelope, settings, key=derive_client_key(master, client))

    async with UpdateProducer(settings, client_id=f"{point.federation}-producer") as producer:
        pending = asyncio.create_task(asyncio.to_thread(build, 0))
        for i in range(point.updates):
            envelope, messages = await pending
            if i + 1 < point.updates:  # build the next update while this one is being sent
                pending = asyncio.create_task(asyncio.to_thread(build, i + 1))
            count += await producer.send_raw(point.federation, messages)
            ids.append(envelope.data.update_id)
            if i < keep:
                kept.append(envelope)
            if i == 0:
                first = messages
    return ids, kept, first, count


async def raw_consume(settings: PFISettings, agg: AggregatorSettings, expect: int) -> dict[str, Any]:
    tp = TopicPartition(settings.updates_topic, 0)
    consumer = AIOKafkaConsumer(
        **kafka_kwargs(settings, "admin"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=agg.max_poll_records,
        **consumer_limits(settings),
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        if end < expect:
            raise BenchError(f"{settings.updates_topic} holds {end} messages, {expect} produced")
        messages = nbytes = 0
        started = time.perf_counter()
        started_cpu = time.process_time()
        while messages < end:
            batch = await consumer.getmany(tp, timeout_ms=agg.poll_timeout_ms)
            for record in batch.get(tp, []):
                messages += 1
                nbytes += len(record.value or b"")
        seconds = time.perf_counter() - started
        cpu = time.process_time() - started_cpu
    finally:
        await consumer.stop()
    return {"seconds": seconds, "cpu_seconds": cpu, "messages": messages, "bytes": nbytes}


async def aggregate_backlog(
    settings: PFISettings, agg: AggregatorSettings, point: SizePoint, ids: list[str], timeout_s: float
) -> dict[str, Any]:
    aggregator = TimedAggregator(settings, agg, CollectorRegistry())
    commit = aggregator.store.commit_version
    commit_s = 0.0

    async def timed_commit(*args: Any, **kwargs: Any) -> Any:  # the Redis commit of each version
        nonlocal commit_s
        started = time.perf_counter()
        try:
            return await commit(*args, **kwargs)
        finally:
            commit_s += time.perf_counter() - started

    aggregator.store.commit_version = timed_commit  # type: ignore[method-assign]
    task = asyncio.create_task(aggregator.run())
    status: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            await asyncio.sleep(0.05)
            if task.done():
                task.result()  # raises what stopped it
                raise BenchError("the aggregator stopped early")
            stats = await aggregator.store.get_stats(point.federation)
            if stats.get("aggregated_total", 0) >= len(ids) or stats.get("rejected_total", 0) > 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{point.label}: not every update aggregated within {timeout_s:.0f}s ({stats})"
                )
        status = await federation_status(aggregator.store, point.federation)
    finally:
        aggregator.stopping.set()
        await asyncio.wait_for(task, 120)
    if aggregator.assigned_at is None or aggregator.last_flush_at is None:
        raise BenchError(f"{point.label}: the aggregator never got its partition or never committed")
    seconds = aggregator.last_flush_at - aggregator.assigned_at
    if seconds <= 0:
        raise BenchError(f"{point.label}: the last version was committed before the partition was assigned")
    aggregated = [u for v in status["versions"] for u in v["update_ids"]]
    checks = {
        "aggregated_total": status["updates_aggregated_total"],
        "rejected_total": status["updates_rejected_total"].get("total", 0),
        "versions": status["head"],
        "distinct_ids": len(set(aggregated)),
        "exactly_once": status["updates_aggregated_total"] == len(ids)
        and sorted(aggregated) == sorted(ids)
        and status["updates_rejected_total"].get("total", 0) == 0,
    }
    cpu = (aggregator.last_flush_cpu or 0.0) - (aggregator.assigned_cpu or 0.0)
    return {"seconds": seconds, "cpu_seconds": cpu, "commit_seconds": commit_s, **checks}
