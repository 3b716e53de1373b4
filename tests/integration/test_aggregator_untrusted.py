"""Issue 12, aggregator side: what no client (nor a broken federation) can do to the aggregator, against
the real stack (Kafka + Redis, tiny model, an in-process aggregator).

- a forged chunk (unsigned, signed by another client, or another client's upload under the same ids)
  never disturbs a legitimate chunked upload: it is aggregated exactly once;
- a flood of chunked uploads from one client hits its quota (``upload_quota``) and never evicts
  another client's upload in flight;
- the reassembly bound is one for the whole process: a full bound refuses new uploads of any federation
  (``reassembly_full``), never evicting one in flight;
- dedupe is per (client, update id): another client cannot squat a victim's update id;
- a federation left half-created (spec without v0) dead-letters its messages (``federation_unavailable``)
  and the aggregator goes on; creating a federation is atomic;
- watermarks live in each federation's slot; the optional Redis ``WAIT`` refuses to announce a version
  no replica acknowledged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from clients.updates import update_messages
from schemas.errors import ConfigError, RejectReason
from schemas.events import AdapterUpdateChunk, Envelope, FederationSpec
from schemas.frame import decode_frame, encode_frame
from schemas.signing import sign_chunk
from services.federation.admin import create_federation
from services.settings import PFISettings
from services.stack.topics import producer_limits
from services.store import keys
from services.store.versions import NotReplicated, VersionCommit, VersionStore
from services.transport import kafka_kwargs
from tests.support.federations import (
    Client,
    dead_letters,
    global_state,
    new_client,
    new_federation,
    random_delta,
    running_aggregator,
    sample,
    shapes_of,
    tiny_spec,
    wait_for,
    wait_version,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REJECTED = "pfi_aggregator_updates_rejected_total"
CHUNK = 1024  # bytes per chunk: a tiny adapter's update is a few dozen chunks


@contextlib.asynccontextmanager
async def raw_producer(settings: PFISettings) -> AsyncIterator[AIOKafkaProducer]:
    """A producer with the admin principal: what a compromised transport could write (tests only)."""
    producer = AIOKafkaProducer(**kafka_kwargs(settings, "admin"), acks="all", **producer_limits(settings))
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def send(producer: AIOKafkaProducer, settings: PFISettings, messages: list[bytes], key: str) -> None:
    for message in messages:
        await producer.send_and_wait(settings.updates_topic, message, key=key.encode())


def chunks_of(envelope: Envelope[Any], key: bytes | None) -> list[bytes]:
    messages = update_messages(envelope, CHUNK, key=key)
    assert len(messages) > 2
    return messages


def chunk_envelope(message: bytes) -> Envelope[AdapterUpdateChunk]:
    return decode_frame(message, max_frame_bytes=1 << 20, expected=AdapterUpdateChunk)


def forged_chunk(like: bytes, *, key: bytes | None, **data: Any) -> bytes:
    """A chunk with ``like``'s ids and other content (another whole digest), signed with ``key`` (or not)."""
    envelope = chunk_envelope(like)
    payload = os.urandom(len(envelope.data.payload))
    changed = envelope.data.model_copy(
        update={
            "payload": payload,
            "chunk_sha256": hashlib.sha256(payload).hexdigest(),
            "total_sha256": hashlib.sha256(payload + b"forged").hexdigest(),
            "signature": None,
            **data,
        }
    )
    forged = envelope.model_copy(update={"data": changed})
    return encode_frame(sign_chunk(forged, key) if key is not None else forged)


async def setup(
    redis: Redis, n_clients: int, **aggregation: Any
) -> tuple[VersionStore, FederationSpec, list[Client], dict[str, tuple[int, ...]]]:
    store = VersionStore(redis)
    spec = await new_federation(store, **{"buffer_size": 1, **aggregation})
    clients = [await new_client(redis, spec) for _ in range(n_clients)]
    shapes = shapes_of(await global_state(store, spec.name, 0))
    return store, spec, clients, shapes


def delta(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    return random_delta(shapes, seed, 0.01)


def reasons(records: list[Any]) -> list[str]:
    return sorted(r.reason.value if hasattr(r.reason, "value") else str(r.reason) for r in records)


# ---------------------------------------------------------------------------------------------------


async def test_forged_chunks_never_disturb_a_chunked_upload(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store, spec, (victim, attacker), shapes = await setup(redis_client, 2)
    update = victim.update(delta(shapes, 1))
    real = chunks_of(update, victim.key)
    unsigned = forged_chunk(real[0], key=None)
    as_victim = forged_chunk(real[1], key=attacker.key)  # claims the victim's id, signed by another key
    # The attacker's own correctly signed chunk under the victim's update id (its client id): its own
    # upload, which never completes; it must not touch the victim's.
    own = forged_chunk(real[0], key=attacker.key, client_id=attacker.client_id)
    async with running_aggregator(pfi_settings) as agg, raw_producer(pfi_settings) as producer:
        await send(
            producer,
            pfi_settings,
            [unsigned, own, real[0], as_victim, *real[1:-1], unsigned, real[-1]],
            spec.name,
        )
        await wait_version(store, spec.name, 1)
        meta = await store.get_meta(spec.name, 1)
        assert meta is not None
        assert meta.update_ids == [update.data.update_id]
        records = await dead_letters(pfi_settings, 3, settle=1.0)
        assert reasons(records) == ["signature_invalid"] * 3, [(r.reason, r.detail) for r in records]
        assert sample(agg, REJECTED, federation=spec.name, reason="signature_invalid") == 3
        # Sent again (a retry): a duplicate, never a second aggregation.
        await send(producer, pfi_settings, real, spec.name)
        await wait_for(
            lambda: sample(agg, REJECTED, federation=spec.name, reason="duplicate") == 1, timeout=20
        )
        assert await store.head(spec.name) == 1
        assert not agg.stopping.is_set()


async def test_chunk_flood_hits_the_client_quota_and_evicts_nothing(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store, spec, (victim, flooder), shapes = await setup(redis_client, 2)
    update = victim.update(delta(shapes, 2))
    real = chunks_of(update, victim.key)
    # The flooder starts five uploads and never finishes them: two fit its quota, three are refused.
    flood = [chunks_of(flooder.update(delta(shapes, 10 + i)), flooder.key)[0] for i in range(5)]
    settings = pfi_settings.model_copy(update={"chunk_uploads_per_client": 2})
    async with running_aggregator(settings) as agg, raw_producer(settings) as producer:
        await send(producer, settings, [real[0], *flood, *real[1:]], spec.name)
        await wait_version(store, spec.name, 1)
        meta = await store.get_meta(spec.name, 1)
        assert meta is not None
        assert meta.update_ids == [update.data.update_id]
        records = await dead_letters(settings, 3, settle=1.0)
        assert reasons(records) == ["upload_quota"] * 3
        assert {r.client_id for r in records} == {flooder.client_id}
        assert sample(agg, "pfi_aggregator_chunked_uploads_in_flight") == 2  # the flooder's two, held
        assert sample(agg, REJECTED, federation=spec.name, reason="chunk_expired") == 0


async def test_reassembly_bound_is_process_wide(pfi_settings: PFISettings, redis_client: Redis) -> None:
    store_a, spec_a, (a,), shapes = await setup(redis_client, 1)
    spec_b = await new_federation(store_a, buffer_size=1)
    b = await new_client(redis_client, spec_b)
    update_a = a.update(delta(shapes, 3))
    update_b = b.update(delta(shapes, 4))
    chunks_a, chunks_b = chunks_of(update_a, a.key), chunks_of(update_b, b.key)
    size = max(len(encode_frame(update_a)), len(encode_frame(update_b)))
    # Room for one upload in the whole process, whichever federation it belongs to.
    settings = pfi_settings.model_copy(update={"max_update_bytes": size, "max_inflight_chunk_bytes": size})
    async with running_aggregator(settings) as agg, raw_producer(settings) as producer:
        await send(producer, settings, chunks_a[:1], spec_a.name)
        await wait_for(lambda: sample(agg, "pfi_aggregator_chunked_uploads_in_flight") == 1, timeout=20)
        await send(producer, settings, chunks_b, spec_b.name)  # refused whole: the bound is full
        records = await dead_letters(settings, len(chunks_b), settle=0.5)
        assert {r.reason for r in records} == {RejectReason.REASSEMBLY_FULL}
        assert {r.federation for r in records} == {spec_b.name}
        await send(producer, settings, chunks_a[1:], spec_a.name)  # A was never evicted: it completes
        await wait_version(store_a, spec_a.name, 1)
        await send(producer, settings, chunks_b, spec_b.name)  # room again: B's retry goes through
        await wait_version(store_a, spec_b.name, 1)
        assert sample(agg, "pfi_aggregator_reassembly_reserved_bytes") == 0


async def test_another_client_cannot_squat_an_update_id(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store, spec, (victim, squatter), shapes = await setup(redis_client, 2, buffer_size=2)
    victim_update = victim.update(delta(shapes, 5), update_id="shared-id")
    async with running_aggregator(pfi_settings) as agg, raw_producer(pfi_settings) as producer:
        # Both in one buffer (the buffer is keyed by update id: the squatter's is flushed out first) ...
        await send(
            producer,
            pfi_settings,
            [encode_frame(squatter.update(delta(shapes, 6), update_id="shared-id"))],
            spec.name,
        )
        await send(producer, pfi_settings, [encode_frame(victim_update)], spec.name)
        await wait_version(store, spec.name, 1)
        # ... and once the squatter's is in ``seen``, the victim's next one with a squatted id still goes in.
        await send(
            producer,
            pfi_settings,
            [encode_frame(squatter.update(delta(shapes, 7), update_id="next-id"))],
            spec.name,
        )
        await send(
            producer,
            pfi_settings,
            [encode_frame(squatter.update(delta(shapes, 8), update_id="other"))],
            spec.name,
        )
        await wait_version(store, spec.name, 2)
        await send(
            producer,
            pfi_settings,
            [encode_frame(victim.update(delta(shapes, 9), update_id="next-id"))],
            spec.name,
        )
        await send(
            producer,
            pfi_settings,
            [encode_frame(victim.update(delta(shapes, 10), update_id="last"))],
            spec.name,
        )
        head = 3
        await wait_version(store, spec.name, head)
        contributions = []
        for version in range(1, (await store.head(spec.name) or 0) + 1):
            meta = await store.get_meta(spec.name, version)
            assert meta is not None
            contributions += [(u.client_id, u.update_id) for u in meta.updates]
        assert (victim.client_id, "shared-id") in contributions
        assert (victim.client_id, "next-id") in contributions
        assert (squatter.client_id, "shared-id") in contributions
        assert len(contributions) == len(set(contributions)) == 5  # the victim's "last" is still buffered
        assert sample(agg, REJECTED, federation=spec.name, reason="duplicate") == 0
        # The same client re-sending its own id is still a duplicate.
        await send(producer, pfi_settings, [encode_frame(victim_update)], spec.name)
        await wait_for(
            lambda: sample(agg, REJECTED, federation=spec.name, reason="duplicate") == 1, timeout=20
        )
        assert await store.is_seen(spec.name, victim.client_id, "shared-id")
        assert not await store.is_seen(spec.name, "nobody", "shared-id")


async def test_half_created_federation_does_not_stop_the_aggregator(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store, spec, (client,), shapes = await setup(redis_client, 1)
    broken = tiny_spec()  # what an older release left when the base model failed to load: a spec, no v0
    assert await store.put_spec(broken)
    async with running_aggregator(pfi_settings) as agg, raw_producer(pfi_settings) as producer:
        await send(producer, pfi_settings, [encode_frame(client.update(delta(shapes, 11)))] * 1, broken.name)
        await send(producer, pfi_settings, [b"garbage"], broken.name)
        await send(producer, pfi_settings, [encode_frame(client.update(delta(shapes, 12)))], spec.name)
        await wait_version(store, spec.name, 1)
        records = await dead_letters(pfi_settings, 2, settle=0.5)
        # Dead letters of a federation without a runtime are at least once: when the consumer is re-seeked
        # before the watermark moved (a rebalance of a loaded machine), they are read and refused again.
        assert len(records) >= 2
        assert {r.reason for r in records} == {RejectReason.FEDERATION_UNAVAILABLE}
        assert {r.federation for r in records} == {broken.name}
        assert sample(agg, REJECTED, federation=broken.name, reason="federation_unavailable") == len(records)
        assert sample(agg, "pfi_aggregator_federation_load_failures_total", federation=broken.name) == 1
        assert not agg.stopping.is_set()


async def test_create_federation_is_atomic(redis_client: Redis) -> None:
    store = VersionStore(redis_client)
    spec = tiny_spec().model_copy(update={"base_model": "/nonexistent/model.gguf"})
    with pytest.raises(ConfigError):
        await create_federation(store, spec)
    assert [k async for k in redis_client.scan_iter(match=keys.prefix(spec.name) + "*")] == []
    assert spec.name not in await store.list_federations()
    good = tiny_spec()
    meta = await create_federation(store, good)
    assert meta.version == 0
    assert await store.pointers(good.name) == (0, 0)
    assert await store.get_spec(good.name) == good
    with pytest.raises(ConfigError):
        await create_federation(store, good)
    assert good.name in await store.list_federations()
    assert await store.retained_versions(good.name) == [0]


async def test_watermarks_live_in_each_federation_slot(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store, spec, (client,), shapes = await setup(redis_client, 1)
    async with running_aggregator(pfi_settings), raw_producer(pfi_settings) as producer:
        await send(producer, pfi_settings, [encode_frame(client.update(delta(shapes, 13)))], spec.name)
        await wait_version(store, spec.name, 1)

        async def raised() -> bool:
            offsets = await store.get_offsets(spec.name)
            return any(name.endswith(":wm") for name in offsets)

        await wait_for(raised, timeout=20)
    assert [k async for k in redis_client.scan_iter(match="pfi:watermarks:*")] == []
    offsets = await store.get_offsets(spec.name)
    marks = await store.get_watermarks(pfi_settings.updates_topic)
    assert marks
    assert all(offset >= 1 for offset in marks.values())
    for partition, offset in marks.items():
        assert offsets[keys.watermark_field(pfi_settings.updates_topic, partition)] >= offset
    # Monotonic: a lower mark never overwrites a higher one.
    (partition,) = marks
    await store.raise_watermarks(pfi_settings.updates_topic, {spec.name: {partition: 0}})
    assert await store.get_watermarks(pfi_settings.updates_topic) == marks


async def test_wait_for_replicas_refuses_to_announce_an_unreplicated_version(redis_client: Redis) -> None:
    """The local Redis has no replica: with WAIT 1 the commit is made but reported as not replicated."""
    store = VersionStore(redis_client)
    spec = await new_federation(store)
    waiting = VersionStore(redis_client, wait_replicas=1, wait_timeout_ms=10, wait_attempts=2)
    meta0 = await store.get_meta(spec.name, 0)
    blob0 = await store.get_blob(spec.name, 0)
    assert meta0 is not None
    assert blob0 is not None
    meta1 = meta0.model_copy(update={"version": 1, "parent": 0})
    commit = VersionCommit(
        federation=spec.name,
        expected_latest=0,
        expected_head=0,
        version=1,
        blob=blob0,
        meta=meta1,
        seen_members=(keys.seen_member("c", f"u-{uuid.uuid4().hex[:6]}"),),
    )
    with pytest.raises(NotReplicated) as info:
        await waiting.commit_version(commit)
    assert info.value.version == 1
    assert info.value.acked == 0
    assert await store.pointers(spec.name) == (1, 1)  # committed on the primary all the same


async def test_an_unforeseen_failure_is_dead_lettered_not_fatal(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store, spec, (client,), shapes = await setup(redis_client, 1)
    bad = client.update(delta(shapes, 14))
    async with running_aggregator(pfi_settings) as agg, raw_producer(pfi_settings) as producer:
        original = agg.on_update

        async def buggy(runtime: Any, federation: Any, envelope: Any, *args: Any, **kw: Any) -> None:
            if envelope.data.update_id == bad.data.update_id:
                raise RuntimeError("a bug")
            await original(runtime, federation, envelope, *args, **kw)

        agg.on_update = buggy  # type: ignore[method-assign]
        await send(
            producer,
            pfi_settings,
            [encode_frame(bad), encode_frame(client.update(delta(shapes, 15)))],
            spec.name,
        )
        await wait_version(store, spec.name, 1)
        records = await dead_letters(pfi_settings, 1, settle=0.5)
        assert [r.reason for r in records] == [RejectReason.INTERNAL_ERROR]
        assert records[0].update_id == bad.data.update_id
        assert sample(agg, "pfi_aggregator_internal_errors_total") == 1
        assert not agg.stopping.is_set()


async def test_unreplicated_versions_are_not_announced(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    """PFI_REDIS_WAIT_REPLICAS=1 against a Redis without replicas: versions are made, never announced."""
    from tests.support.federations import read_events

    store, spec, (client,), shapes = await setup(redis_client, 1)
    settings = pfi_settings.model_copy(update={"redis_wait_replicas": 1, "redis_wait_timeout_ms": 10})
    async with running_aggregator(settings) as agg, raw_producer(settings) as producer:
        await send(producer, settings, [encode_frame(client.update(delta(shapes, 16)))], spec.name)
        await wait_version(store, spec.name, 1)
        await wait_for(
            lambda: sample(agg, "pfi_aggregator_unreplicated_versions_total", federation=spec.name) == 1
        )
    assert await read_events(settings, settings.versions_topic, 1, timeout=2.0) == []


async def test_announcements_carry_the_stored_blobs_digest(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    """What consumers compare (a failover could re-make version N with other bytes): the digest on the
    Kafka announcement and on the Redis stream is the SHA-256 of the blob stored for that version."""
    import json

    from schemas.events import GlobalVersionPublished
    from tests.support.federations import read_events

    store, spec, (client,), shapes = await setup(redis_client, 1)
    async with running_aggregator(pfi_settings), raw_producer(pfi_settings) as producer:
        await send(producer, pfi_settings, [encode_frame(client.update(delta(shapes, 17)))], spec.name)
        await wait_version(store, spec.name, 1)
        (announced,) = await read_events(pfi_settings, pfi_settings.versions_topic, 1)
    blob = await store.get_blob(spec.name, 1)
    assert blob is not None
    assert isinstance(announced, GlobalVersionPublished)
    assert announced.digest == hashlib.sha256(blob).hexdigest()
    stream: Any = await redis_client.xrange(keys.events(spec.name))
    events = [json.loads(fields[b"event"])["data"] for _, fields in stream]
    assert [(e["version"], e["digest"]) for e in events][-1] == (1, announced.digest)
    blob0 = await store.get_blob(spec.name, 0)
    assert blob0 is not None
    assert events[0]["digest"] == hashlib.sha256(blob0).hexdigest()  # v0, from the atomic create


async def test_a_failed_poll_cycle_replays_instead_of_exiting(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store, spec, (client,), shapes = await setup(redis_client, 1)
    async with running_aggregator(pfi_settings) as agg, raw_producer(pfi_settings) as producer:
        original = agg.refresh_live
        failed: list[bool] = []

        async def broken_once() -> None:
            if not failed:
                failed.append(True)
                raise RuntimeError("a bug outside any one message")
            await original()

        agg.refresh_live = broken_once  # type: ignore[method-assign]
        await send(producer, pfi_settings, [encode_frame(client.update(delta(shapes, 18)))], spec.name)
        await wait_for(lambda: bool(failed), timeout=20)
        await send(producer, pfi_settings, [encode_frame(client.update(delta(shapes, 19)))], spec.name)
        await wait_version(store, spec.name, 2)
        assert sample(agg, "pfi_aggregator_poll_failures_total") == 1
        assert not agg.stopping.is_set()
    assert await dead_letters(pfi_settings, 0, within=1.0) == []
