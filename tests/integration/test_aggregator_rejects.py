"""Every reject reason of the aggregator, end to end on the real stack (Kafka + Redis, tiny model).

Each test runs a short in-process aggregator on its own topics, sends the offending message(s) and then
checks the four places a rejection must show up:

1. a dead-letter record (``UpdateRejected`` on the DLQ topic) with the reason code and, where the
   aggregator could know them, the federation, client, update id and the source partition/offset;
2. the ``pfi_aggregator_updates_rejected_total{federation, reason}`` counter;
3. the federation's durable stats in Redis (``rejected:<reason>`` and ``rejected_total``), written by
   a progress commit;
4. the service is still alive: a valid update sent afterwards is aggregated into a new version, and no
   further dead letter shows up (nothing rejected twice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from clients.updates import build_update
from schemas.chunking import split_frame
from schemas.errors import RejectReason
from schemas.events import (
    AdapterUpdateChunk,
    Envelope,
    FederationSpec,
    GlobalVersionPublished,
    TensorEncoding,
    make_envelope,
    utcnow,
)
from schemas.frame import decode_frame, encode_frame
from schemas.signing import generate_key, sign_chunk
from services.aggregator.service import Aggregator
from services.federation.admin import federation_status, rollback_federation
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.store.versions import VersionStore
from tests.support.federations import (
    Client,
    Position,
    chunked,
    dead_letters,
    frame_parts,
    global_state,
    new_client,
    new_federation,
    produce,
    random_delta,
    raw_frame,
    running_aggregator,
    sample,
    shapes_of,
    tiny_spec,
    wait_for,
    wait_version,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REJECTED = "pfi_aggregator_updates_rejected_total"


@dataclasses.dataclass
class Sent:
    """One offending message and what its dead letter should say."""

    position: Position
    update_id: str | None = None
    client_id: str | None = None
    federation: str | None = None  # when the dead letter names another federation than the rig's


@dataclasses.dataclass
class Rig:
    settings: PFISettings
    redis: Redis
    store: VersionStore
    spec: FederationSpec
    client: Client
    shapes: dict[str, tuple[int, ...]]
    producer: UpdateProducer
    agg: Aggregator
    next_seed: int = 100

    @property
    def key(self) -> bytes:
        return self.spec.name.encode()

    def delta(self, scale: float = 0.01) -> dict[str, torch.Tensor]:
        self.next_seed += 1
        return random_delta(self.shapes, self.next_seed, scale)

    def build(self, delta: dict[str, torch.Tensor], **fields: Any) -> Envelope[Any]:
        """An update of this rig's federation; ``fields`` override build_update's arguments."""
        args: dict[str, Any] = {
            "federation": self.spec.name,
            "client_id": self.client.client_id,
            "spec_fingerprint": self.spec.fingerprint(),
            "base_version": 0,
            "num_samples": 5,
            "key": self.client.key,
        }
        return build_update(delta=delta, **{**args, **fields})

    async def send(self, messages: list[bytes], key: bytes | None = None) -> list[Position]:
        return await produce(self.producer, messages, self.key if key is None else key)

    async def send_update(self, envelope: Envelope[Any], **kw: Any) -> Sent:
        (pos,) = await self.send([encode_frame(envelope)], **kw)
        return Sent(pos, envelope.data.update_id, envelope.data.client_id)

    async def expect_rejected(
        self,
        reason: RejectReason,
        sent: list[Sent],
        *,
        federation: str | None = None,
        counted: bool = True,
        extra_dead_letters: int = 0,
    ) -> list[Any]:
        """Dead letters, metric and Redis stats of ``sent`` (all rejected with ``reason``)."""
        federation = federation or self.spec.name
        total = len(sent) + extra_dead_letters
        records = await dead_letters(self.settings, total)
        assert len(records) >= total, f"expected {total} dead letters, got {records}"
        mine = [r for r in records if r.reason == reason]
        assert len(mine) == len(sent), [(r.reason, r.detail) for r in records]
        by_position = {(r.source_partition, r.source_offset): r for r in mine}
        assert set(by_position) == {s.position for s in sent}, (by_position.keys(), sent)
        for s in sent:
            record = by_position[s.position]
            assert record.federation == (s.federation or federation)
            assert record.source_topic == self.settings.updates_topic
            assert record.detail
            if s.update_id is not None:
                assert record.update_id == s.update_id
            if s.client_id is not None:
                assert record.client_id == s.client_id
        label = federation if counted else "unknown"
        assert sample(self.agg, REJECTED, federation=label, reason=reason.value) == len(sent)
        if counted:

            async def stats_written() -> bool:
                stats = await self.store.get_stats(federation)
                return stats.get(f"rejected:{reason.value}", 0) == len(sent)

            await wait_for(stats_written, timeout=15, interval=0.1)
            stats = await self.store.get_stats(federation)
            assert stats.get("rejected_total", 0) == len(sent) + extra_dead_letters
        return mine

    async def still_aggregates(self, dead_letters_so_far: int) -> None:
        """A valid update afterwards makes a new version; nothing else is dead-lettered."""
        head = await self.store.head(self.spec.name)
        assert head is not None
        latest = await self.store.latest(self.spec.name)
        envelope = self.client.update(self.delta(), base_version=latest or 0)
        await self.send_update(envelope)
        await wait_version(self.store, self.spec.name, head + 1)
        meta = await self.store.get_meta(self.spec.name, head + 1)
        assert meta is not None
        assert envelope.data.update_id in meta.update_ids
        assert not self.agg.stopping.is_set()
        records = await dead_letters(self.settings, dead_letters_so_far, settle=0.5)
        assert len(records) == dead_letters_so_far, [(r.reason, r.detail) for r in records]


@contextlib.asynccontextmanager
async def rig(
    pfi_settings: PFISettings, redis: Redis, settings: dict[str, Any] | None = None, **aggregation: Any
) -> AsyncIterator[Rig]:
    """A federation (buffer_size=1 unless given) with one registered client, a running aggregator
    (``settings`` overrides its PFISettings) and a producer."""
    store = VersionStore(redis)
    spec = await new_federation(store, **{"buffer_size": 1, **aggregation})
    client = await new_client(redis, spec)
    shapes = shapes_of(await global_state(store, spec.name, 0))
    agg_settings = pfi_settings.model_copy(update=settings or {})
    async with running_aggregator(agg_settings) as agg, UpdateProducer(pfi_settings) as producer:
        yield Rig(pfi_settings, redis, store, spec, client, shapes, producer, agg)


def tamper(envelope: Envelope[Any], **data: Any) -> bytes:
    """The frame of ``envelope`` with data fields changed after signing."""
    return encode_frame(envelope.model_copy(update={"data": envelope.data.model_copy(update=data)}))


# ---------------------------------------------------------------------------------------------------


async def test_malformed(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        frame = encode_frame(r.client.update(r.delta()))
        header, payload = frame_parts(frame)
        flipped = bytearray(payload)
        flipped[len(flipped) // 2] ^= 0xFF
        messages = [
            b"\x00" + os.urandom(300),  # not a frame at all
            frame[:40],  # truncated: the header length runs past the end
            raw_frame(header, bytes(flipped)),  # payload does not match payload_sha256
            frame[:8] + b"{not json" + frame[17:],  # header is not JSON
        ]
        positions = await r.send(messages)
        await r.expect_rejected(RejectReason.MALFORMED, [Sent(p) for p in positions])
        await r.still_aggregates(len(messages))


async def test_schema_invalid(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        header, payload = frame_parts(encode_frame(r.client.update(r.delta())))
        extra = {**header, "data": {**header["data"], "priority": "high"}}
        missing = {**header, "data": {k: v for k, v in header["data"].items() if k != "num_samples"}}
        wrong = {**header, "data": {**header["data"], "base_version": "latest"}}
        attribute = {**header, "traceparent": "00-abc"}
        messages = [raw_frame(h, payload) for h in (extra, missing, wrong, attribute)]
        sent = [Sent(p) for p in await r.send(messages)]
        # A valid, signed update whose message key names another federation than its body.
        other = r.build(r.delta(), federation="fed-elsewhere")
        mismatch = await r.send_update(other)
        # Counted for the federation of the message key; the record names the update's own.
        sent.append(dataclasses.replace(mismatch, federation="fed-elsewhere"))
        records = await r.expect_rejected(RejectReason.SCHEMA_INVALID, sent)
        assert any("priority" in rec.detail for rec in records)
        assert any("num_samples" in rec.detail for rec in records)
        assert any("message key" in rec.detail for rec in records)
        await r.still_aggregates(len(sent))


async def test_unknown_event_type(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        header, payload = frame_parts(encode_frame(r.client.update(r.delta())))
        v9 = raw_frame({**header, "type": "ai.pfi.adapter-update.v9"}, payload)
        unheard = raw_frame({**header, "type": "ai.pfi.something-else.v1"}, payload)
        spec2 = raw_frame({**header, "specversion": "2.0"}, payload)
        announcement = GlobalVersionPublished(
            federation=r.spec.name,
            version=7,
            parent=6,
            digest="0" * 64,
            num_updates=1,
            size_bytes=10,
            created_at=utcnow(),
        )
        misplaced = encode_frame(make_envelope(announcement, source="pfi://elsewhere"))
        positions = await r.send([v9, unheard, spec2, misplaced])
        records = await r.expect_rejected(RejectReason.UNKNOWN_EVENT_TYPE, [Sent(p) for p in positions])
        by_offset = {rec.source_offset: rec for rec in records}
        assert by_offset[positions[3][1]].original_type == GlobalVersionPublished.event_type()
        assert "v9" in by_offset[positions[0][1]].detail
        await r.still_aggregates(4)


async def test_signature_invalid(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        c = r.client
        wrong_key = r.build(r.delta(), key=generate_key())
        unsigned = r.build(r.delta(), key=None)
        ghost = r.build(r.delta(), client_id="ghost-client", key=generate_key())
        signed = c.update(r.delta())
        more_samples = tamper(signed, num_samples=10_000)  # a signed field changed
        # Payload swapped *consistently* (new payload_sha256): only the signature can tell.
        other = c.update(r.delta(scale=5.0))
        swapped = tamper(signed, payload=other.data.payload, payload_sha256=other.data.payload_sha256)
        sent = [await r.send_update(e) for e in (wrong_key, unsigned, ghost)]
        for frame in (more_samples, swapped):
            (pos,) = await r.send([frame])
            sent.append(Sent(pos, signed.data.update_id, c.client_id))
        records = await r.expect_rejected(RejectReason.SIGNATURE_INVALID, sent)
        assert any("ghost-client" in rec.detail for rec in records)
        assert any("no signature" in rec.detail for rec in records)
        await r.still_aggregates(len(sent))
        # Nothing of the forged updates reached a version.
        status = await federation_status(r.store, r.spec.name)
        assert status["updates_aggregated_total"] == 1


async def test_unknown_federation(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        ghost_spec = tiny_spec(name="fed-does-not-exist")
        ghost = {"federation": ghost_spec.name, "spec_fingerprint": ghost_spec.fingerprint()}
        envelope = r.build(r.delta(), **ghost)
        key = ghost_spec.name.encode()
        sent = [await r.send_update(envelope, key=key)]
        # A chunked upload to the same nowhere: every chunk is refused on arrival.
        big = r.build(r.delta(), **ghost)
        chunks = chunked(big, r.settings, 2048, r.client.key)
        assert len(chunks) > 1
        for pos in await r.send(chunks, key=key):
            sent.append(Sent(pos, big.data.update_id, big.data.client_id))
        await r.expect_rejected(
            RejectReason.UNKNOWN_FEDERATION, sent, federation=ghost_spec.name, counted=False
        )
        assert await r.store.get_stats(ghost_spec.name) == {}
        assert await r.store.get_spec(ghost_spec.name) is None
        await r.still_aggregates(len(sent))


async def test_spec_mismatch(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        other = tiny_spec(name=r.spec.name).model_copy(update={"seed": 7})
        assert other.fingerprint() != r.spec.fingerprint()
        envelope = r.build(r.delta(), spec_fingerprint=other.fingerprint())
        sent = [await r.send_update(envelope)]
        await r.expect_rejected(RejectReason.SPEC_MISMATCH, sent)
        await r.still_aggregates(1)


async def test_shape_mismatch(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        names = sorted(r.shapes)
        transposed = r.delta()
        transposed[names[0]] = transposed[names[0]].T.contiguous()
        missing = r.delta()
        del missing[names[1]]
        extra = r.delta()
        extra["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 64)
        sent = [await r.send_update(r.client.update(d)) for d in (transposed, missing, extra)]
        await r.expect_rejected(RejectReason.SHAPE_MISMATCH, sent)
        await r.still_aggregates(3)


async def test_non_finite(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        names = sorted(r.shapes)
        nan, inf = r.delta(), r.delta()
        nan[names[2]][0, 0] = float("nan")
        inf[names[3]][1, 1] = float("-inf")
        sent = [await r.send_update(r.client.update(d)) for d in (nan, inf)]
        await r.expect_rejected(RejectReason.NON_FINITE, sent)
        await r.still_aggregates(2)


async def test_norm_exceeded(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client, norm_policy="reject", max_update_norm=1.0) as r:
        loud = r.delta(scale=1.0)  # L2 norm ~ sqrt(1792) ~ 42
        sent = [await r.send_update(r.client.update(loud))]
        (record,) = await r.expect_rejected(RejectReason.NORM_EXCEEDED, sent)
        assert "exceeds the bound" in record.detail
        await r.still_aggregates(1)  # scale 0.01: norm ~ 0.42, under the bound


async def test_duplicate(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client, buffer_size=2) as r:
        first = r.client.update(r.delta())
        frame = encode_frame(first)
        # The same envelope twice while the first is buffered ...
        accepted, again = await r.send([frame, frame])
        second = r.client.update(r.delta())
        await r.send_update(second)
        await wait_version(r.store, r.spec.name, 1)
        meta = await r.store.get_meta(r.spec.name, 1)
        assert meta is not None
        assert meta.update_ids == [first.data.update_id, second.data.update_id]  # the first counted
        # ... and once more after it was aggregated (found in the `seen` set).
        (late,) = await r.send([frame])
        uid, cid = first.data.update_id, first.data.client_id
        sent = [Sent(again, uid, cid), Sent(late, uid, cid)]
        assert accepted not in {again, late}
        await r.expect_rejected(RejectReason.DUPLICATE, sent)
        assert sample(r.agg, "pfi_aggregator_updates_accepted_total", federation=r.spec.name) == 2
        # Fill the next buffer (K=2): still aggregating, no further dead letter.
        await r.send_update(r.client.update(r.delta(), base_version=1))
        await r.still_aggregates(2)
        status = await federation_status(r.store, r.spec.name)
        assert status["updates_aggregated_total"] == 4
        ids = [u for v in status["versions"] for u in v["update_ids"]]
        assert len(ids) == len(set(ids)) == 4


async def test_too_stale(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client, max_staleness=1) as r:
        c = r.client
        # One partition, in order: v1, v2, v3 (each update trained on the newest version).
        for base in (0, 1, 2):
            await r.send_update(c.update(r.delta(), base_version=base))
        await wait_version(r.store, r.spec.name, 3)
        sent = [await r.send_update(c.update(r.delta(), base_version=b)) for b in (0, 1)]
        records = await r.expect_rejected(RejectReason.TOO_STALE, sent)
        assert all("max_staleness=1" in rec.detail for rec in records)
        # Staleness 1 is still fine.
        await r.send_update(c.update(r.delta(), base_version=2))
        await wait_version(r.store, r.spec.name, 4)
        meta = await r.store.get_meta(r.spec.name, 4)
        assert meta is not None
        assert [u.staleness for u in meta.updates] == [1]
        await r.still_aggregates(2)


async def test_future_base_version(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        sent = [await r.send_update(r.client.update(r.delta(), base_version=b)) for b in (99, 1)]
        await r.expect_rejected(RejectReason.FUTURE_BASE_VERSION, sent)
        await r.still_aggregates(2)


async def test_unknown_base_version(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        c, name = r.client, r.spec.name
        await r.send_update(c.update(r.delta(), base_version=0))
        await wait_version(r.store, name, 1)
        await r.send_update(c.update(r.delta(), base_version=1))
        await wait_version(r.store, name, 2)
        assert await rollback_federation(r.store, name, 1) == 2
        # The aggregator still believes latest == 2: its next commit conflicts, it reloads and
        # replays; the update then lands as v3 on top of v1.
        after = c.update(r.delta(), base_version=1)
        await r.send_update(after)
        await wait_version(r.store, name, 3)
        meta3 = await r.store.get_meta(name, 3)
        assert meta3 is not None
        assert meta3.parent == 1
        assert meta3.update_ids == [after.data.update_id]
        assert sample(r.agg, "pfi_aggregator_commit_conflicts_total", federation=name) >= 1
        # v2 is not an ancestor of v3 any more.
        sent = [await r.send_update(c.update(r.delta(), base_version=2))]
        (record,) = await r.expect_rejected(RejectReason.UNKNOWN_BASE_VERSION, sent)
        assert "rolled back" in record.detail
        await r.still_aggregates(1)
        status = await federation_status(r.store, name)
        assert status["updates_aggregated_total"] == 4
        assert status["updates_accepted_total"] == 4


async def test_oversized(pfi_settings: PFISettings, redis_client: Redis) -> None:
    cap = 32 * 1024
    async with rig(pfi_settings, redis_client, settings={"max_update_bytes": cap}) as r:
        bloated = r.delta()
        bloated["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(
            4, 64 * 64, generator=torch.Generator().manual_seed(3)
        )
        envelope = r.client.update(bloated, encoding=TensorEncoding(compression="none"))
        frame = encode_frame(envelope)
        assert len(frame) > cap
        sent = [Sent(pos) for pos in await r.send([frame])]  # refused before it is parsed: no ids
        # The same update chunked (each chunk is small): every chunk is refused, its header says
        # the whole is over the cap.
        chunks = chunked(r.client.update(bloated), r.settings, 16 * 1024, r.client.key)
        assert len(chunks) > 1
        chunk_env = decode_frame(chunks[0], max_frame_bytes=1 << 20)
        for pos in await r.send(chunks):
            sent.append(Sent(pos, chunk_env.data.update_id, chunk_env.data.client_id))
        records = await r.expect_rejected(RejectReason.OVERSIZED, sent)
        assert {rec.original_type for rec in records if rec.update_id == chunk_env.data.update_id} == {
            AdapterUpdateChunk.event_type()
        }
        await r.still_aggregates(len(sent))  # a normal (~8 KiB) update still fits


def chunk_frame(chunk: AdapterUpdateChunk, source: str, key: bytes) -> bytes:
    """A chunk frame signed by ``key`` (its client's: what only the client itself could send)."""
    envelope = make_envelope(
        chunk.model_copy(update={"signature": None}), source=source, subject=chunk.update_id
    )
    return encode_frame(sign_chunk(envelope, key))


async def test_chunk_corrupt(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        envelope = r.client.update(r.delta())
        chunks = chunked(envelope, r.settings, 2048, r.client.key)
        assert len(chunks) >= 3
        # (1) One chunk's payload flipped in transit (its chunk_sha256 kept): refused on its own;
        # the intact copy sent afterwards completes the upload, which is then accepted.
        header, payload = frame_parts(chunks[1])
        flipped = bytearray(payload)
        flipped[0] ^= 0x01
        bad1 = raw_frame(header, bytes(flipped))
        positions = await r.send([chunks[0], bad1, *chunks[1:]])
        sent = [Sent(positions[1])]
        await wait_version(r.store, r.spec.name, 1)
        meta = await r.store.get_meta(r.spec.name, 1)
        assert meta is not None
        assert meta.update_ids == [envelope.data.update_id]
        # (2) Chunks that are each intact but do not add up to the announced whole.
        other = r.client.update(r.delta())
        frame = encode_frame(other)
        lying = split_frame(
            frame,
            federation=r.spec.name,
            client_id=r.client.client_id,
            update_id=other.data.update_id,
            chunk_bytes=2048,
            source=other.source,
        )
        parts = [decode_frame(m, max_frame_bytes=1 << 20).data for m in lying]
        wrong_total = "ab" * 32
        forged = [
            chunk_frame(p.model_copy(update={"total_sha256": wrong_total}), other.source, r.client.key)
            for p in parts
        ]
        positions = await r.send(forged)
        sent.append(Sent(positions[-1], other.data.update_id, r.client.client_id))  # on completion
        records = await r.expect_rejected(RejectReason.CHUNK_CORRUPT, sent)
        assert any("total_sha256" in rec.detail for rec in records)
        await r.still_aggregates(2)


async def test_chunk_duplicate(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client) as r:
        envelope = r.client.update(r.delta())
        chunks = chunked(envelope, r.settings, 2048, r.client.key)
        assert len(chunks) >= 3
        first = decode_frame(chunks[0], max_frame_bytes=1 << 20).data
        other_bytes = bytearray(first.payload)
        other_bytes[5] ^= 0x10
        impostor = first.model_copy(
            update={"payload": bytes(other_bytes), "chunk_sha256": hashlib.sha256(other_bytes).hexdigest()}
        )
        # chunk 0, chunk 0 again identical (idempotent), chunk 0 with other bytes (refused), the rest.
        positions = await r.send(
            [chunks[0], chunks[0], chunk_frame(impostor, envelope.source, r.client.key), *chunks[1:]]
        )
        sent = [Sent(positions[2], envelope.data.update_id, r.client.client_id)]
        await r.expect_rejected(RejectReason.CHUNK_DUPLICATE, sent)
        # The upload still completes with the original chunk 0 and is aggregated.
        await wait_version(r.store, r.spec.name, 1)
        meta = await r.store.get_meta(r.spec.name, 1)
        assert meta is not None
        assert meta.update_ids == [envelope.data.update_id]
        await r.still_aggregates(1)


async def test_chunk_expired(pfi_settings: PFISettings, redis_client: Redis) -> None:
    async with rig(pfi_settings, redis_client, settings={"chunk_ttl_s": 0.5}) as r:
        envelope = r.client.update(r.delta())
        chunks = chunked(envelope, r.settings, 2048, r.client.key)
        assert len(chunks) >= 3
        positions = await r.send(chunks[:2])  # the rest never comes
        sent = [Sent(positions[0], envelope.data.update_id, r.client.client_id)]  # first chunk's offset
        (record,) = await r.expect_rejected(RejectReason.CHUNK_EXPIRED, sent)
        assert f"2/{len(chunks)}" in record.detail
        assert record.original_type == AdapterUpdateChunk.event_type()
        await wait_for(lambda: r.agg.runtimes[r.spec.name].reassembler.pending_uploads == 0, timeout=5)
        await r.still_aggregates(1)
