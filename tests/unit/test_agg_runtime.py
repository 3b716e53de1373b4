"""Offset bookkeeping of a federation runtime and base-version checks (pure, no Kafka/Redis)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from schemas.chunking import Reassembler, split_frame
from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, FederationSpec, TensorEncoding
from schemas.frame import decode_frame
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.runtime import FederationRuntime, PartitionMarks, Position, Zone, build_lineage
from services.aggregator.validation import FederationView, ValidUpdate, staleness_of

TOPIC = "t.adapter-updates"


def _runtime(marks: dict[int, PartitionMarks] | None = None) -> FederationRuntime:
    spec = FederationSpec(name="fed", base_model="pfi/tiny-llama", aggregation={"buffer_size": 3})  # type: ignore[arg-type]
    return FederationRuntime(
        spec=spec,
        latest=0,
        head=0,
        global_state={"w": torch.zeros(2)},
        opt_state=ServerOptState(),
        accountant=RdpAccountant(),
        lineage={0: 0},
        marks=marks or {},
        reassembler=Reassembler[Position](max_total_bytes=1 << 20, ttl_s=60, max_update_bytes=1 << 20),
    )


def _valid(update_id: str) -> ValidUpdate:
    update = AdapterUpdate(
        federation="fed", client_id="c", update_id=update_id, base_version=0, num_samples=1,
        spec_fingerprint="0" * 64, encoding=TensorEncoding(), payload_sha256="0" * 64, payload=b"",
    )  # fmt: skip
    return ValidUpdate(update, {"w": torch.ones(2)}, 0, 1.0, 0.0)


def test_zones_follow_safe_and_hwm() -> None:
    rt = _runtime({0: PartitionMarks(safe=10, hwm=20)})
    assert rt.zone(0, 9) is Zone.SKIP
    assert rt.zone(0, 10) is Zone.REPLAY
    assert rt.zone(0, 19) is Zone.REPLAY
    assert rt.zone(0, 20) is Zone.LIVE
    assert rt.zone(1, 0) is Zone.LIVE  # no marks on that partition


def test_buffered_updates_hold_the_safe_offset_back() -> None:
    rt = _runtime()
    rt.touch(0, 5)
    rt.add(_valid("a"), (0, 5))
    rt.touch(0, 7)  # e.g. a rejection
    offsets = rt.durable_offsets({0: 8}, TOPIC)
    assert offsets == {f"{TOPIC}:0": 5, f"{TOPIC}:0:hwm": 8}
    assert rt.first_pending(0) == 5
    rt.mark_durable(offsets, TOPIC)
    assert not rt.is_dirty()
    assert rt.first_pending(0) == 5  # still buffered
    taken = rt.take_buffer()
    assert [item.update_id for item, _ in taken] == ["a"]
    assert rt.durable_offsets({0: 9}, TOPIC) == {f"{TOPIC}:0": 9, f"{TOPIC}:0:hwm": 9}


def test_pending_chunks_hold_the_safe_offset_back() -> None:
    rt = _runtime()
    frame = b"x" * 5000
    chunks = split_frame(
        frame, federation="fed", client_id="c", update_id="big", chunk_bytes=1024, source="s"
    )
    first = decode_frame(chunks[0], max_frame_bytes=1 << 20).data
    rt.reassembler.add(first, (0, 3))
    rt.touch(0, 3)
    assert rt.first_pending(0) == 3
    offsets = rt.durable_offsets({0: 10}, TOPIC)
    assert offsets[f"{TOPIC}:0"] == 3
    assert offsets[f"{TOPIC}:0:hwm"] == 10
    assert hashlib.sha256(frame).hexdigest()  # frame is what the chunks carry


def test_offsets_never_regress() -> None:
    rt = _runtime({0: PartitionMarks(safe=50, hwm=60)})
    offsets = rt.durable_offsets({0: 40}, TOPIC)  # a stale position (replay in progress)
    assert offsets == {f"{TOPIC}:0": 50, f"{TOPIC}:0:hwm": 60}


def test_lineage_and_staleness() -> None:
    parents: dict[int, int | None] = {8: 3, 3: 2, 2: 1, 1: 0, 0: None}
    lineage = build_lineage(8, parents, max_depth=3)
    assert lineage == {8: 0, 3: 1, 2: 2, 1: 3}
    spec = FederationSpec(name="fed", base_model="m", aggregation={"max_staleness": 3})  # type: ignore[arg-type]
    view = FederationView(spec=spec, fingerprint="", latest=8, head=8, lineage=lineage, shapes={})

    def update(base: int) -> AdapterUpdate:
        return _valid("u").update.model_copy(update={"base_version": base})

    assert staleness_of(update(3), view) == 1
    for base, reason in [(9, RejectReason.FUTURE_BASE_VERSION), (0, RejectReason.TOO_STALE),
                         (5, RejectReason.UNKNOWN_BASE_VERSION)]:  # fmt: skip
        with pytest.raises(RejectedInput) as info:
            staleness_of(update(base), view)
        assert info.value.reason is reason
