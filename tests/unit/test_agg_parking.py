"""At most one update per client per buffer (issue 12): parking, its order, staleness and bookkeeping."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from schemas.chunking import Reassembler
from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, FederationSpec, TensorEncoding
from services.aggregator.math.fedbuff import AggregationResult
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.runtime import FederationRuntime, Position
from services.aggregator.validation import ValidUpdate

TOPIC = "t.adapter-updates"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _runtime(clock: Clock | None = None, **aggregation: Any) -> FederationRuntime:
    agg = {"buffer_size": 3, "flush_timeout_s": 10.0, **aggregation}
    spec = FederationSpec(name="fed", base_model="pfi/tiny-llama", aggregation=agg)
    return FederationRuntime(
        spec=spec,
        latest=0,
        head=0,
        global_state={"w": torch.zeros(2)},
        opt_state=ServerOptState(),
        accountant=RdpAccountant(),
        lineage={0: 0},
        marks={},
        reassembler=Reassembler[Position](max_total_bytes=1 << 20, ttl_s=60, max_update_bytes=1 << 20),
        clock=clock or Clock(),
    )


def _valid(update_id: str, client: str, base: int = 0, staleness: int = 0) -> ValidUpdate:
    update = AdapterUpdate(
        federation="fed", client_id=client, update_id=update_id, base_version=base, num_samples=1,
        spec_fingerprint="0" * 64, encoding=TensorEncoding(), payload_sha256="0" * 64, payload=b"x" * 64,
    )  # fmt: skip
    return ValidUpdate(update, {"w": torch.ones(2)}, staleness, 1.0, 0.0)


def _commit(rt: FederationRuntime, version: int) -> None:
    """What VersionWriter.flush does around a successful commit (without the fold)."""
    offsets = rt.durable_offsets({0: 1000}, TOPIC)
    result = AggregationResult(rt.global_state, {}, {}, {}, {}, [], rt.opt_state, 0.0)
    rt.apply(result, version)
    rt.mark_durable(offsets, TOPIC)
    rt.admit_parked()


def test_a_second_update_of_a_client_is_parked_and_holds_offsets_back() -> None:
    rt = _runtime()
    for offset, (uid, client) in enumerate([("a1", "a"), ("b1", "b"), ("a2", "a")]):
        rt.touch(0, offset)
        assert not rt.add(_valid(uid, client), (0, offset))
    assert len(rt.buffer) == 2
    assert list(rt.parked) == ["a2"]
    assert rt.is_buffered("a2")  # a replayed copy is a duplicate, like a buffered one
    # the parked update's position holds ``safe`` and the watermark back, even once a1 and b1 are in a version
    taken = rt.take_buffer()
    assert [item.update_id for item, _ in taken] == ["a1", "b1"]
    offsets = rt.durable_offsets({0: 3}, TOPIC)
    assert offsets[f"{TOPIC}:0"] == 2
    assert rt.first_pending(0) == 0  # first_dirty (not committed yet)
    rt.mark_durable(offsets, TOPIC)
    assert rt.first_pending(0) == 2


def test_a_client_gets_one_buffered_and_one_parked_then_is_rate_limited() -> None:
    rt = _runtime()
    assert not rt.add(_valid("a1", "a"), (0, 0))
    assert not rt.add(_valid("a2", "a"), (0, 1))
    for i in range(3, 8):  # one client trying to fill the whole buffer (median would return its delta)
        with pytest.raises(RejectedInput) as info:
            rt.add(_valid(f"a{i}", "a"), (0, i))
        assert info.value.reason is RejectReason.CLIENT_RATE_LIMITED
        assert not rt.is_buffered(f"a{i}")
    assert len(rt.buffer) == 1
    assert rt.buffer.due(now=10_000.0)  # min_updates is 1: a timed-out version of one update...
    robust = _runtime(robust="median")
    robust.add(_valid("a1", "a"), (0, 0))
    robust.add(_valid("a2", "a"), (0, 1))
    assert not robust.buffer.due(now=10_000.0)  # ... a median of one client's update never flushes
    robust.add(_valid("b1", "b"), (0, 2))
    robust.add(_valid("c1", "c"), (0, 3))
    assert robust.buffer.due(now=10_000.0)


def test_parked_updates_enter_the_next_buffer_in_arrival_order_with_fresh_staleness() -> None:
    clock = Clock()
    rt = _runtime(clock, buffer_size=2)
    rt.add(_valid("a1", "a"), (0, 0))
    rt.add(_valid("a2", "a"), (0, 1))
    clock.now += 1
    assert rt.add(_valid("b1", "b"), (0, 2))  # full
    rt.add(_valid("b2", "b"), (0, 3))
    with pytest.raises(RejectedInput):
        rt.add(_valid("b3", "b"), (0, 4))
    assert list(rt.parked) == ["a2", "b2"]
    rt.take_buffer()
    clock.now += 5
    _commit(rt, 1)
    # both parked ones are in the new buffer, in arrival order, re-timed, staleness now 1 (base 0, latest 1)
    assert rt.parked == {}
    assert [u.update_id for u in rt.buffer.take()] == ["a2", "b2"]


def test_parked_updates_beyond_k_wait_for_the_buffer_after() -> None:
    rt = _runtime(buffer_size=2)
    rt.add(_valid("a1", "a"), (0, 0))
    rt.add(_valid("b1", "b"), (0, 1))
    rt.add(_valid("a2", "a"), (0, 2))
    rt.add(_valid("b2", "b"), (0, 3))
    rt.take_buffer()
    rt.add(_valid("c1", "c"), (0, 4))  # c arrives while a2/b2 wait: it enters the (empty) buffer
    _commit(rt, 1)
    assert [rt.buffer.client_count(c) for c in "abc"] == [1, 0, 1]
    assert list(rt.parked) == ["b2"]  # the buffer was full again: b2 waits one more version
    assert rt.buffer.full()


def test_a_parked_update_too_stale_for_the_next_buffer_is_refused() -> None:
    rt = _runtime(max_staleness=1)
    rt.latest = rt.head = 1
    rt.lineage = {1: 0, 0: 1}
    rt.add(_valid("a1", "a", base=1), (0, 0))
    rt.add(_valid("a2", "a", base=0, staleness=1), (0, 5))  # staleness 1 now, 2 after the next version
    rt.take_buffer()
    _commit(rt, 2)
    assert len(rt.buffer) == 0
    assert not rt.is_buffered("a2")
    (refused,) = rt.take_refused()
    assert refused.error.reason is RejectReason.TOO_STALE
    assert refused.position == (0, 5)
    assert refused.envelope is not None
    assert refused.envelope.data.update_id == "a2"
    assert refused.envelope.data.payload == b""  # the header only: the payload is not kept twice
    assert rt.first_pending(0) == 5  # not durable before the next commit counts it
    assert rt.take_refused() == []


def test_restore_buffer_refuses_the_poisoned_and_keeps_times() -> None:
    clock = Clock()
    rt = _runtime(clock)
    rt.add(_valid("a1", "a"), (0, 0))
    clock.now += 3
    rt.add(_valid("b1", "b"), (0, 1))
    deadline = rt.buffer.deadline()
    taken = rt.take_buffer()
    clock.now += 100
    rt.restore_buffer(taken, {"a1": RejectedInput("bad", reason=RejectReason.FOLD_FAILED)})
    assert [u.update_id for _, u in rt.buffer.take_entries()] == ["b1"]
    assert deadline is not None
    (refused,) = rt.take_refused()
    assert refused.error.reason is RejectReason.FOLD_FAILED
    assert not rt.is_buffered("a1")
    assert rt.is_buffered("b1")
    rt.restore_buffer(taken[1:], {})
    assert rt.buffer.deadline() == pytest.approx(103.0 + 10.0)  # b1 keeps the time it was first buffered


def test_max_client_updates_gives_a_client_more_of_the_buffer() -> None:
    rt = _runtime(buffer_size=4, max_client_updates=2)
    for i in range(4):
        rt.add(_valid(f"a{i}", "a"), (0, i))
    with pytest.raises(RejectedInput) as info:
        rt.add(_valid("a4", "a"), (0, 4))
    assert info.value.reason is RejectReason.CLIENT_RATE_LIMITED
    assert rt.buffer.client_count("a") == 2
    assert list(rt.parked) == ["a2", "a3"]
    rt.add(_valid("b0", "b"), (0, 5))
    assert rt.add(_valid("c0", "c"), (0, 6))
    rt.take_buffer()
    _commit(rt, 1)
    assert rt.buffer.client_count("a") == 2
    assert rt.parked == {}
