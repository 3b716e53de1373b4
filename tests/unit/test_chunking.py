"""schemas.chunking: split/reassemble, expiry, quotas, the shared bound, every chunk rejection, positions."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.chunking import Reassembler, ReassemblyBudget, split_frame
from schemas.errors import ChunkError, ConfigError, PayloadTooLargeError, RejectReason
from schemas.events import AdapterUpdateChunk
from schemas.frame import decode_frame

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KIB = 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def split(
    frame: bytes, chunk_bytes: int, update_id: str = "u1", client_id: str = "c1"
) -> list[AdapterUpdateChunk]:
    messages = split_frame(
        frame,
        federation="fed",
        client_id=client_id,
        update_id=update_id,
        chunk_bytes=chunk_bytes,
        source="client/c1",
    )
    out = []
    for message in messages:
        data = decode_frame(message, max_frame_bytes=chunk_bytes + 64 * KIB, expected=AdapterUpdateChunk).data
        assert isinstance(data, AdapterUpdateChunk)
        out.append(data)
    return out


def reassembler(clock: FakeClock | None = None, **kwargs: Any) -> Reassembler[int]:
    params: dict[str, Any] = {"max_total_bytes": 1 << 20, "ttl_s": 60.0, "max_update_bytes": 1 << 20}
    params.update(kwargs)
    return Reassembler(clock=clock or FakeClock(), **params)


def variant(chunk: AdapterUpdateChunk, **changes: Any) -> AdapterUpdateChunk:
    return chunk.model_copy(update=changes)


def with_payload(chunk: AdapterUpdateChunk, payload: bytes) -> AdapterUpdateChunk:
    return variant(chunk, payload=payload, chunk_sha256=hashlib.sha256(payload).hexdigest())


# ------------------------------------------------------------------------------------------ split


def test_small_frames_are_not_split() -> None:
    frame = b"PFI\x01 small"
    assert split_frame(
        frame, federation="f", client_id="c", update_id="u", chunk_bytes=len(frame), source="s"
    ) == [frame]


def test_split_headers() -> None:
    frame = os.urandom(10 * KIB + 1)
    chunks = split(frame, 2 * KIB)
    assert [c.index for c in chunks] == list(range(6))
    assert {c.count for c in chunks} == {6}
    assert {c.total_size for c in chunks} == {len(frame)}
    assert {c.total_sha256 for c in chunks} == {hashlib.sha256(frame).hexdigest()}
    assert b"".join(c.payload for c in chunks) == frame
    assert [len(c.payload) for c in chunks] == [2 * KIB] * 5 + [1]
    ids = [
        m[:200]
        for m in split_frame(
            frame, federation="fed", client_id="c1", update_id="u1", chunk_bytes=2 * KIB, source="s"
        )
    ]
    assert len(set(ids)) == 6


def test_split_is_deterministic_in_ids() -> None:
    frame = os.urandom(5 * KIB)
    a = [
        decode_frame(m, max_frame_bytes=1 << 20)
        for m in split_frame(frame, federation="f", client_id="c", update_id="u", chunk_bytes=KIB, source="s")
    ]
    b = [
        decode_frame(m, max_frame_bytes=1 << 20)
        for m in split_frame(frame, federation="f", client_id="c", update_id="u", chunk_bytes=KIB, source="s")
    ]
    assert [e.id for e in a] == [e.id for e in b]


# ------------------------------------------------------------------------------------------ reassembly


@FAST
@given(data=st.data(), size=st.integers(1025, 20 * KIB), seed=st.integers(0, 2**32))
def test_round_trip_in_any_order(data: st.DataObject, size: int, seed: int) -> None:
    chunk_bytes = data.draw(st.integers(1024, size - 1))
    frame = random.Random(seed).randbytes(size)
    chunks = split(frame, chunk_bytes)
    assert len(chunks) >= 2
    random.Random(seed).shuffle(chunks)
    r = reassembler()
    results = [r.add(c, position=i) for i, c in enumerate(chunks)]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == frame
    assert r.pending_uploads == 0
    assert r.pending_bytes == 0


def test_round_trip_in_order_tracks_pending() -> None:
    frame = os.urandom(8 * KIB)
    chunks = split(frame, 2 * KIB)
    r = reassembler()
    for i, chunk in enumerate(chunks[:-1]):
        assert r.add(chunk, position=100 + i) is None
        assert r.pending_bytes == (i + 1) * 2 * KIB
        assert r.pending_uploads == 1
    assert r.oldest_pending_position() == 100
    assert r.add(chunks[-1], position=103) == frame
    assert r.oldest_pending_position() is None


def test_uploads_are_keyed_by_federation_client_and_update() -> None:
    frame_a, frame_b = os.urandom(4 * KIB), os.urandom(4 * KIB)
    a = split(frame_a, KIB, update_id="same", client_id="alice")
    b = split(frame_b, KIB, update_id="same", client_id="bob")
    r = reassembler()
    results = [r.add(x) for pair in zip(a, b, strict=True) for x in pair]
    assert results[-2:] == [frame_a, frame_b]


def test_identical_redelivery_is_ignored() -> None:
    frame = os.urandom(4 * KIB)
    chunks = split(frame, KIB)
    r = reassembler()
    r.add(chunks[0])
    assert r.add(chunks[0]) is None
    assert r.pending_bytes == KIB
    for chunk in chunks[1:-1]:
        r.add(chunk)
    assert r.add(chunks[-1]) == frame


def test_duplicate_with_different_content() -> None:
    chunks = split(os.urandom(4 * KIB), KIB)
    r = reassembler()
    r.add(chunks[0])
    with pytest.raises(ChunkError) as info:
        r.add(with_payload(chunks[0], os.urandom(KIB)))
    assert info.value.reason is RejectReason.CHUNK_DUPLICATE
    assert r.pending_bytes == KIB


def test_corrupt_chunk() -> None:
    chunks = split(os.urandom(4 * KIB), KIB)
    r = reassembler()
    with pytest.raises(ChunkError) as info:
        r.add(variant(chunks[1], payload=os.urandom(KIB)))
    assert info.value.reason is RejectReason.CHUNK_CORRUPT
    assert r.pending_uploads == 0


@pytest.mark.parametrize("changes", [{"count": 5}, {"total_size": 4 * KIB + 1}])
def test_inconsistent_headers(changes: dict[str, Any]) -> None:
    chunks = split(os.urandom(4 * KIB), KIB)
    r = reassembler()
    r.add(chunks[0])
    with pytest.raises(ChunkError) as info:
        r.add(variant(chunks[1], **changes))
    assert info.value.reason is RejectReason.CHUNK_CORRUPT
    assert r.pending_bytes == KIB


@pytest.mark.parametrize(
    "changes",
    [{"index": 4}, {"index": 9}, {"count": 5000, "index": 1}],
)
def test_impossible_chunks(changes: dict[str, Any]) -> None:
    chunks = split(os.urandom(4 * KIB), KIB)
    with pytest.raises(ChunkError) as info:
        reassembler().add(variant(chunks[1], **changes))
    assert info.value.reason is RejectReason.CHUNK_CORRUPT


def test_empty_and_overlong_chunks() -> None:
    chunks = split(os.urandom(4 * KIB), KIB)
    r = reassembler()
    with pytest.raises(ChunkError):
        r.add(with_payload(chunks[0], b""))
    with pytest.raises(ChunkError, match="larger than total_size"):
        r.add(with_payload(chunks[0], os.urandom(4 * KIB + 1)))
    r.add(with_payload(chunks[0], os.urandom(3 * KIB)))
    with pytest.raises(ChunkError, match="more than total_size"):
        r.add(with_payload(chunks[1], os.urandom(2 * KIB)))


def test_oversized_update() -> None:
    chunks = split(os.urandom(8 * KIB), KIB)
    with pytest.raises(PayloadTooLargeError) as info:
        reassembler(max_update_bytes=4 * KIB).add(chunks[0])
    assert info.value.reason is RejectReason.OVERSIZED


def test_reassembled_digest_mismatch_drops_the_upload() -> None:
    frame = os.urandom(4 * KIB)
    wrong = hashlib.sha256(b"other").hexdigest()
    chunks = [variant(c, total_sha256=wrong) for c in split(frame, KIB)]
    r = reassembler()
    for chunk in chunks[:-1]:
        assert r.add(chunk) is None
    with pytest.raises(ChunkError, match="total_sha256") as info:
        r.add(chunks[-1])
    assert info.value.reason is RejectReason.CHUNK_CORRUPT
    assert r.pending_uploads == 0
    assert r.pending_bytes == 0


def test_size_mismatch_at_completion() -> None:
    chunks = split(os.urandom(4 * KIB), KIB)
    r = reassembler()
    for chunk in chunks[:-1]:
        r.add(chunk)
    with pytest.raises(ChunkError, match="expected"):
        r.add(with_payload(chunks[-1], b"short"))
    assert r.pending_uploads == 0


def test_missing_chunk_expires() -> None:
    clock = FakeClock()
    chunks = split(os.urandom(4 * KIB), KIB)
    r = reassembler(clock, ttl_s=30.0)
    r.add(chunks[0], position=7)
    clock.now += 10
    r.add(chunks[2], position=9)
    clock.now += 20
    assert r.expire() == []
    clock.now += 0.5
    expired = r.expire()
    assert len(expired) == 1
    gone = expired[0]
    assert (gone.federation, gone.client_id, gone.update_id) == ("fed", "c1", "u1")
    assert (gone.received, gone.count, gone.received_bytes, gone.total_size) == (2, 4, 2 * KIB, 4 * KIB)
    assert gone.first_position == 7
    assert gone.reason is RejectReason.CHUNK_EXPIRED
    assert r.pending_uploads == 0
    assert r.pending_bytes == 0
    assert r.expire() == []


def test_expire_with_explicit_now() -> None:
    clock = FakeClock()
    r = reassembler(clock, ttl_s=5.0)
    r.add(split(os.urandom(4 * KIB), KIB)[0])
    assert r.expire(now=clock.now + 5) == []
    assert len(r.expire(now=clock.now + 6)) == 1


def test_another_digest_is_another_upload() -> None:
    """A chunk naming the same ids with other content never touches the legitimate upload."""
    frame = os.urandom(4 * KIB)
    chunks = split(frame, KIB)
    forged = split(os.urandom(4 * KIB), KIB)  # same fed/client/update id, other whole digest
    r = reassembler()
    assert r.add(forged[0], position=0) is None  # first: it must not squat index 0 of the real upload
    results = [r.add(c, position=1 + i) for i, c in enumerate(chunks)]
    assert results[-1] == frame
    assert r.pending_uploads == 1  # the forged one stays incomplete until it expires
    assert r.oldest_pending_position() == 0
    (gone,) = r.drop()
    assert gone.total_sha256 == forged[0].total_sha256
    assert r.reserved_bytes == 0


def test_client_quota_of_uploads_and_bytes() -> None:
    r = reassembler(max_update_bytes=8 * KIB, max_uploads_per_client=2)
    uploads = [split(os.urandom(4 * KIB), KIB, update_id=f"u{i}") for i in range(3)]
    r.add(uploads[0][0])
    r.add(uploads[1][0])
    with pytest.raises(ChunkError) as info:
        r.add(uploads[2][0])
    assert info.value.reason is RejectReason.UPLOAD_QUOTA
    assert r.pending_uploads == 2
    assert r.client_uploads("fed", "c1") == 2
    other = split(os.urandom(4 * KIB), KIB, update_id="u2", client_id="c2")  # another client: its own quota
    r.add(other[0])
    for chunk in uploads[0][1:]:
        r.add(chunk)
    r.add(uploads[2][0])  # a slot is free again
    big = reassembler(max_update_bytes=8 * KIB, max_client_bytes=8 * KIB, max_uploads_per_client=5)
    big.add(split(os.urandom(6 * KIB), KIB, update_id="a")[0])
    with pytest.raises(ChunkError) as info:
        big.add(split(os.urandom(4 * KIB), KIB, update_id="b")[0])  # 6 + 4 KiB > 8 KiB
    assert info.value.reason is RejectReason.UPLOAD_QUOTA


def test_full_budget_refuses_new_uploads_and_never_evicts() -> None:
    r = reassembler(
        max_total_bytes=8 * KIB,
        max_update_bytes=4 * KIB,
        max_uploads_per_client=10,
        max_client_bytes=64 * KIB,
    )
    uploads = [split(os.urandom(4 * KIB), KIB, update_id=f"u{i}") for i in range(3)]
    r.add(uploads[0][0], position=0)
    r.add(uploads[1][0], position=10)
    assert r.reserved_bytes == 8 * KIB  # whole total sizes are reserved at the first chunk
    with pytest.raises(ChunkError) as info:
        r.add(uploads[2][0], position=20)
    assert info.value.reason is RejectReason.REASSEMBLY_FULL
    assert r.pending_uploads == 2
    assert r.oldest_pending_position() == 0
    results = [r.add(c) for c in uploads[0][1:]]  # a started upload always has room to complete
    assert results[-1] is not None
    r.add(uploads[2][0], position=20)
    assert r.pending_uploads == 2


def test_shared_budget_is_process_wide() -> None:
    budget = ReassemblyBudget(8 * KIB)
    a: Reassembler[int] = Reassembler(0, 60.0, 4 * KIB, budget=budget)
    b: Reassembler[int] = Reassembler(0, 60.0, 4 * KIB, budget=budget)
    a.add(split(os.urandom(4 * KIB), KIB, update_id="x")[0])
    b.add(split(os.urandom(4 * KIB), KIB, update_id="y", client_id="c2")[0])
    assert budget.reserved == 8 * KIB
    with pytest.raises(ChunkError) as info:
        b.add(split(os.urandom(4 * KIB), KIB, update_id="z", client_id="c3")[0])
    assert info.value.reason is RejectReason.REASSEMBLY_FULL
    a.close()  # a's state is thrown away (rebalance): its reservations go back
    assert budget.reserved == 4 * KIB
    b.add(split(os.urandom(4 * KIB), KIB, update_id="z", client_id="c3")[0])
    assert budget.reserved == 8 * KIB
    b.drop()
    assert budget.reserved == 0
    a.drop()  # closed: dropping its uploads gives nothing back twice
    assert budget.reserved == 0


def test_positions() -> None:
    r: Reassembler[tuple[int, int]] = Reassembler(
        max_total_bytes=1 << 20, ttl_s=60.0, max_update_bytes=1 << 20
    )
    a = split(os.urandom(4 * KIB), KIB, update_id="a")
    b = split(os.urandom(4 * KIB), KIB, update_id="b")
    r.add(a[1], position=(0, 50))
    r.add(a[0], position=(0, 40))  # a lower position arriving later still counts
    r.add(b[0], position=(1, 5))
    r.add(b[1])
    assert sorted(r.pending_positions()) == [(0, 40), (1, 5)]
    assert r.oldest_pending_position() == (0, 40)
    assert r.oldest_pending_position(lambda p: p[0] == 1) == (1, 5)
    assert r.oldest_pending_position(lambda p: p[0] == 2) is None
    dropped = r.drop(lambda p: p is not None and p[0] == 1)
    assert [d.update_id for d in dropped] == ["b"]
    assert [d.update_id for d in r.drop()] == ["a"]
    assert r.pending_bytes == 0


def test_config_checks() -> None:
    with pytest.raises(ConfigError):
        Reassembler(max_total_bytes=KIB, ttl_s=1.0, max_update_bytes=2 * KIB)
    with pytest.raises(ConfigError):
        Reassembler(max_total_bytes=KIB, ttl_s=0.0, max_update_bytes=KIB)
    with pytest.raises(ConfigError):
        Reassembler(0, 1.0, 2 * KIB, budget=ReassemblyBudget(KIB))
    with pytest.raises(ConfigError):
        Reassembler(4 * KIB, 1.0, 2 * KIB, max_client_bytes=KIB)
    with pytest.raises(ConfigError):
        split_frame(b"x", federation="f", client_id="c", update_id="u", chunk_bytes=0, source="s")


def test_not_a_chunk() -> None:
    with pytest.raises(ChunkError) as info:
        reassembler().add("nope")  # type: ignore[arg-type]
    assert info.value.reason is RejectReason.MALFORMED
