"""Poison-proof flush (issue 12): one float64 norm everywhere, huge finite values clipped, a failing fold
isolated to the update that causes it (fake store and publisher: the real stack is tests/fuzz)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from schemas.chunking import Reassembler
from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AggregationSpec, FederationSpec, TensorEncoding, make_envelope
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.robust import clip_to_norm, l2_norm
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.runtime import FederationRuntime, Position
from services.aggregator.validation import ValidUpdate, merge_norm
from services.aggregator.versioning import PoisonedUpdates, VersionWriter, isolate_poisoned

SHAPES = {"layer.lora_A.weight": (4, 8), "layer.lora_B.weight": (8, 4)}
TOPIC = "t.adapter-updates"


def huge(value: float = 1e20) -> dict[str, torch.Tensor]:
    return {k: torch.full(s, value) for k, s in SHAPES.items()}


def test_a_finite_1e20_update_is_clipped_not_an_overflow() -> None:
    delta = huge()
    assert not math.isfinite(
        float(torch.linalg.vector_norm(delta["layer.lora_B.weight"]))
    )  # the old float32 norm
    agg = AggregationSpec(max_update_norm=2.0)
    norm = merge_norm(delta, agg)  # validation: finite, the same value the merge clips with
    assert norm == pytest.approx(l2_norm(delta))
    assert math.isfinite(norm)
    clipped, _, was = clip_to_norm(delta, 2.0)
    assert was
    assert l2_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    g0 = {k: torch.zeros(s) for k, s in SHAPES.items()}
    buf = [BufferedUpdate("x", "x", delta, 1, 0), BufferedUpdate("y", "y", huge(-3e38), 1, 0)]
    out = aggregate(g0, buf, agg)
    assert out.clipped == ["x", "y"]
    assert all(bool(torch.isfinite(v).all()) for v in out.new_global.values())
    assert l2_norm(out.applied_delta) <= 2.0 * (1 + 1e-6)


def test_validation_uses_the_projected_norm_and_still_refuses_non_finite() -> None:
    delta = {"layer.lora_A.weight": torch.full((4, 8), 10.0), "layer.lora_B.weight": torch.ones(8, 4)}
    ffa = AggregationSpec(lora_mode="ffa")
    assert merge_norm(delta, ffa) == pytest.approx(math.sqrt(32))  # lora_A is not merged under FFA
    assert merge_norm(delta, AggregationSpec()) == pytest.approx(l2_norm(delta))
    delta["layer.lora_A.weight"][0, 0] = math.nan
    with pytest.raises(RejectedInput) as info:
        merge_norm(delta, ffa)
    assert info.value.reason is RejectReason.NON_FINITE


def test_isolation_finds_the_updates_that_make_the_fold_fail() -> None:
    g0 = {k: torch.zeros(s) for k, s in SHAPES.items()}
    ok = [
        BufferedUpdate(f"u{i}", f"c{i}", {k: torch.ones(s) for k, s in SHAPES.items()}, 1, 0)
        for i in range(3)
    ]
    nan = BufferedUpdate("nan", "n", {k: torch.full(s, math.nan) for k, s in SHAPES.items()}, 1, 0)
    wrong = BufferedUpdate("shape", "s", {"layer.lora_A.weight": torch.ones(3, 3)}, 1, 0)
    spec = AggregationSpec(max_update_norm=1.0)
    items = [ok[0], nan, ok[1], wrong, ok[2]]
    with pytest.raises(ValueError, match="shape"):
        aggregate(g0, items, spec)
    bad = isolate_poisoned(g0, items, spec, ServerOptState())
    assert sorted(bad) == ["nan", "shape"]
    assert isolate_poisoned(g0, ok, spec, ServerOptState()) == {}


class FakeStore:
    def __init__(self) -> None:
        self.commits: list[Any] = []

    async def commit_version(self, commit: Any) -> int:
        self.commits.append(commit)
        return int(commit.version)


class FakePublisher:
    def __init__(self) -> None:
        self.announced: list[Any] = []

    def version_envelope(self, event: Any) -> Any:
        return make_envelope(event, source="test")

    async def announce(self, envelope: Any) -> None:
        self.announced.append(envelope)


async def run_here(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def _runtime() -> FederationRuntime:
    spec = FederationSpec(name="fed", base_model="pfi/tiny-llama", aggregation=AggregationSpec(buffer_size=3))
    return FederationRuntime(
        spec=spec,
        latest=0,
        head=0,
        global_state={k: torch.zeros(s) for k, s in SHAPES.items()},
        opt_state=ServerOptState(),
        accountant=RdpAccountant(),
        lineage={0: 0},
        marks={},
        reassembler=Reassembler[Position](max_total_bytes=1 << 20, ttl_s=60, max_update_bytes=1 << 20),
    )


def _valid(update_id: str, client: str, delta: dict[str, torch.Tensor]) -> ValidUpdate:
    update = AdapterUpdate(
        federation="fed", client_id=client, update_id=update_id, base_version=0, num_samples=1,
        spec_fingerprint="0" * 64, encoding=TensorEncoding(), payload_sha256="0" * 64, payload=b"",
    )  # fmt: skip
    return ValidUpdate(update, delta, 0, 1.0, 0.0)


async def test_a_poisoned_buffer_dead_letters_the_culprit_and_the_rest_makes_a_version() -> None:
    store, publisher = FakeStore(), FakePublisher()
    metrics = AggregatorMetrics(CollectorRegistry())
    writer = VersionWriter(store, publisher, metrics, run_here, TOPIC)  # type: ignore[arg-type]
    rt = _runtime()
    ones = {k: torch.ones(s) for k, s in SHAPES.items()}
    # Validation never buffers a NaN; this stands for any update the fold cannot take.
    rt.add(_valid("good1", "a", ones), (0, 0))
    rt.add(_valid("poison", "b", {k: torch.full(s, math.nan) for k, s in SHAPES.items()}), (0, 1))
    assert rt.add(_valid("good2", "c", ones), (0, 2))
    with pytest.raises(PoisonedUpdates) as info:
        await writer.flush(rt, {0: 3})
    assert info.value.update_ids == ["poison"]
    assert store.commits == []
    (refused,) = rt.take_refused()
    assert refused.error.reason is RejectReason.FOLD_FAILED
    assert refused.position == (0, 1)
    assert refused.envelope is not None
    assert refused.envelope.data.update_id == "poison"
    assert len(rt.buffer) == 2
    assert rt.buffer.contains("good1")
    assert rt.buffer.contains("good2")
    # the service dead-letters it (counted in pending_stats) and flushes again: the federation moves on
    rt.pending_stats["rejected_total"] += 1
    version = await writer.flush(rt, {0: 3})
    assert version == 1
    assert rt.latest == 1
    (commit,) = store.commits
    assert commit.stat_increments["rejected_total"] == 1
    assert commit.stat_increments["aggregated_total"] == 2
    assert commit.offsets[f"{TOPIC}:0"] == 3
    assert all(bool(torch.isfinite(v).all()) for v in rt.global_state.values())


async def test_an_unreproducible_fold_failure_keeps_the_replay_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import services.aggregator.versioning as versioning

    def broken(*args: Any) -> Any:
        raise ValueError("not the data")

    monkeypatch.setattr(versioning, "fold_and_encode", broken)
    metrics = AggregatorMetrics(CollectorRegistry())
    writer = VersionWriter(FakeStore(), FakePublisher(), metrics, run_here, TOPIC)  # type: ignore[arg-type]
    rt = _runtime()
    rt.add(_valid("good1", "a", {k: torch.ones(s) for k, s in SHAPES.items()}), (0, 0))
    with pytest.raises(ValueError, match="not the data"):
        await writer.flush(rt, {0: 1})
    assert rt.take_refused() == []
    assert len(rt.buffer) == 1
