"""Issue 16, operator view of personalization quality: clients' validation-loss reports (schema bounds,
wire compatibility) and the aggregator's quality monitor (relative changes, clamping, the per-federation
window that counts each client once, bounded cardinality, never failing an update)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from clients.updates import build_update
from schemas.errors import SchemaError, SignatureError
from schemas.events import MAX_REPORTED_LOSS, TrainingMetrics
from schemas.frame import MAGIC, decode_frame, encode_frame, split_raw
from schemas.signing import StaticKeyStore, canonical_signing_bytes, verify_update
from services.aggregator import quality
from services.aggregator.quality import ClientWindow, QualityMonitor, assess, clamp

FED = "fed-q"
FIELDS = ("val_loss_global", "val_loss_personal", "val_loss_prev_global")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(g: float | None = 3.0, p: float | None = None, prev: float | None = None) -> TrainingMetrics:
    return TrainingMetrics(val_loss_global=g, val_loss_personal=p, val_loss_prev_global=prev)


def monitor(**kw: Any) -> tuple[QualityMonitor, CollectorRegistry, Clock]:
    registry = CollectorRegistry()
    clock = Clock()
    return QualityMonitor(registry, clock=clock, **kw), registry, clock


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- the wire contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, -math.inf, -1e-9, -1.0, MAX_REPORTED_LOSS + 1e-6, 1e300, "3.5", True, [1.0]]
)
def test_quality_fields_refuse_non_finite_negative_huge_and_non_numbers(field: str, bad: Any) -> None:
    with pytest.raises(ValidationError):
        TrainingMetrics(**{field: bad})


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400", "-0.5", "101", '"2.0"', "{}"])
def test_a_frame_with_a_bad_report_is_a_schema_error_naming_the_field(raw: str) -> None:
    """What arrives on the wire (a frame header as JSON text) meets the same bounds."""
    envelope = build_update(
        federation=FED,
        client_id="c1",
        spec_fingerprint="0" * 64,
        base_version=0,
        num_samples=1,
        delta={"w": torch.zeros(2)},
        key=None,
        metrics=report(2.0),
    )
    header, payload = split_raw(encode_frame(envelope), max_frame_bytes=1 << 20, max_header_bytes=1 << 16)
    text = json.dumps(header).replace('"val_loss_global": 2.0', f'"val_loss_global": {raw}')
    assert raw in text
    body = text.encode()
    frame = MAGIC + len(body).to_bytes(4, "big") + body + payload
    with pytest.raises(SchemaError) as err:
        decode_frame(frame, max_frame_bytes=1 << 20)
    assert "val_loss_global" in str(err.value)


def test_quality_fields_accept_bounds_and_integers() -> None:
    metrics = TrainingMetrics(val_loss_global=0, val_loss_personal=MAX_REPORTED_LOSS, val_loss_prev_global=2)
    assert (metrics.val_loss_global, metrics.val_loss_personal, metrics.val_loss_prev_global) == (0, 100, 2)
    assert TrainingMetrics().val_loss_global is None


def test_an_update_without_reports_signs_and_frames_exactly_as_before_issue_16() -> None:
    """Signatures cover the canonical dump: absent reports are left out of it, so an old client's update
    (which never had these keys) verifies, and a new one with reports round-trips through a frame."""
    key = b"k" * 32
    old = build_update(
        federation=FED,
        client_id="c1",
        spec_fingerprint="0" * 64,
        base_version=0,
        num_samples=1,
        delta={"w": torch.ones(3)},
        key=key,
        metrics=TrainingMetrics(loss_before=2.0, loss_after=1.5, steps=3),
    )
    signed = canonical_signing_bytes(old)
    assert b"val_loss" not in signed
    metrics = json.loads(signed)["data"]["metrics"]
    assert set(metrics) == {"loss_before", "loss_after", "steps", "train_seconds"}
    new = build_update(
        federation=FED,
        client_id="c1",
        spec_fingerprint="0" * 64,
        base_version=4,
        num_samples=1,
        delta={"w": torch.ones(3)},
        key=key,
        metrics=report(3.0, 2.5, 3.5),
    )
    for envelope in (old, new):
        back = decode_frame(encode_frame(envelope), max_frame_bytes=1 << 20)
        verify_update(back, StaticKeyStore({"c1": key}))
    assert back.data.metrics == report(3.0, 2.5, 3.5)
    # The reports are signed like the rest: a relay cannot rewrite them.
    for forged in (report(3.0, 2.5, 1.0), report(3.0, 2.5, None), TrainingMetrics()):
        tampered = back.model_copy(update={"data": back.data.model_copy(update={"metrics": forged})})
        with pytest.raises(SignatureError):
            verify_update(tampered, StaticKeyStore({"c1": key}))


# -- assessing one report (pure) -------------------------------------------------------------------------


def test_assess_gives_relative_gain_and_change() -> None:
    verdict = assess(report(4.0, 3.0, 5.0))
    assert verdict is not None
    assert verdict.gain == pytest.approx(0.25)  # personal 25 % lower
    assert verdict.change == pytest.approx(-0.2)  # the new global lowered the loss by 20 %
    only_global = assess(report(4.0))
    assert only_global is not None
    assert (only_global.gain, only_global.change) == (None, None)


@pytest.mark.parametrize(
    "metrics",
    [
        report(None, 2.0),  # personal without the global it is relative to
        report(None, None, 2.0),
        report(0.0, 1.0),  # relative to a zero loss: meaningless
        report(3.0, None, 0.0),
    ],
)
def test_assess_refuses_reports_without_a_basis(metrics: TrainingMetrics) -> None:
    assert assess(metrics) is None


def test_assess_refuses_out_of_range_values_that_bypassed_the_schema() -> None:
    forged = TrainingMetrics.model_construct(val_loss_global=math.nan, val_loss_personal=1.0)
    assert assess(forged) is None
    forged = TrainingMetrics.model_construct(val_loss_global=3.0, val_loss_personal=-5.0)
    assert assess(forged) is None


def test_claims_are_clamped() -> None:
    extreme = assess(report(MAX_REPORTED_LOSS, 0.0, 1e-3))
    assert extreme is not None
    assert extreme.gain == 1.0
    assert extreme.change == 1.0  # 100 000x worse counts as +100 %
    assert clamp(-7.0) == -1.0


# -- the monitor -----------------------------------------------------------------------------------------


def test_histograms_and_outcomes() -> None:
    mon, registry, _ = monitor()
    assert mon.observe(FED, "a", 1, report(4.0, 3.0, 5.0)) == "used"
    assert mon.observe(FED, "b", 1, TrainingMetrics(loss_after=2.0)) == "absent"
    assert mon.observe(FED, "c", 1, report(None, 2.0)) == "invalid"
    assert mon.observe(FED, "a", 1, report(4.0, 1.0, 9.0)) == "repeat"
    for outcome in ("used", "absent", "invalid", "repeat"):
        assert value(registry, "pfi_aggregator_quality_reports_total", federation=FED, outcome=outcome) == 1
    gain = "pfi_aggregator_personalization_gain_ratio"
    assert value(registry, f"{gain}_count", federation=FED) == 1
    assert value(registry, f"{gain}_sum", federation=FED) is None  # negative buckets: no _sum exported
    assert value(registry, f"{gain}_bucket", federation=FED, le="0.2") == 0
    assert value(registry, f"{gain}_bucket", federation=FED, le="0.5") == 1
    change = "pfi_aggregator_global_loss_change_ratio"
    assert value(registry, f"{change}_bucket", federation=FED, le="-0.2") == 1
    assert value(registry, f"{change}_bucket", federation=FED, le="-0.5") == 0


def test_window_shares_count_each_client_once_with_its_latest_report() -> None:
    mon, registry, _ = monitor()
    for i in range(4):  # 4 clients: personal helps; the new global is worse for 1 of them
        mon.observe(FED, f"c{i}", 7, report(3.0, 2.5, 3.5 if i else 2.0))
    counts = mon.counts(FED)
    assert (counts.clients, counts.personal, counts.harmed, counts.judged, counts.worse) == (4, 4, 0, 4, 1)
    assert counts.worse_share() == 0.25
    assert value(registry, "pfi_aggregator_global_regressed_clients", federation=FED) == 1
    assert value(registry, "pfi_aggregator_global_change_reporting_clients", federation=FED) == 4
    assert value(registry, "pfi_aggregator_personalization_harmed_clients", federation=FED) == 0
    assert value(registry, "pfi_aggregator_personalization_reporting_clients", federation=FED) == 4
    # c0's next version helps it: its verdict is replaced, not added.
    mon.observe(FED, "c0", 8, report(1.9, 2.5, 2.0))
    counts = mon.counts(FED)
    assert (counts.personal, counts.harmed, counts.judged, counts.worse) == (4, 1, 4, 0)


def test_a_flood_from_one_client_moves_a_share_by_at_most_one_client() -> None:
    mon, registry, _ = monitor()
    honest = 10
    for i in range(honest):
        mon.observe(FED, f"h{i}", 5, report(3.0, 2.8, 3.2))  # everyone: better, and personal helps
    assert mon.counts(FED).worse_share() == 0.0
    for version in range(5, 505):  # the liar claims disaster on every version, twice each
        for _ in range(2):
            mon.observe(FED, "liar", version, report(MAX_REPORTED_LOSS, MAX_REPORTED_LOSS, 0.01))
    counts = mon.counts(FED)
    assert counts.worse_share() == pytest.approx(1 / (honest + 1))
    assert counts.harmed_share() == 0.0  # equal losses: not harmed
    # The repeats were not observed; each version's claim once, clamped to +1.
    change = "pfi_aggregator_global_loss_change_ratio"
    assert value(registry, f"{change}_count", federation=FED) == honest + 500
    # Clamped: every claim of the liar (+999900 %) is +100 %, in the last finite bucket.
    assert value(registry, f"{change}_bucket", federation=FED, le="0.5") == honest
    assert value(registry, f"{change}_bucket", federation=FED, le="1.0") == honest + 500
    assert value(registry, "pfi_aggregator_quality_reports_total", federation=FED, outcome="repeat") == 500


def test_margin_ignores_noise() -> None:
    mon, _, _ = monitor(margin=0.01)
    mon.observe(FED, "a", 1, report(3.0, 3.02, 2.99))  # +0.7 % / +0.3 %: within the margin
    mon.observe(FED, "b", 1, report(3.0, 3.1, 2.9))  # +3.3 % / +3.4 %: harmed, worse
    counts = mon.counts(FED)
    assert (counts.harmed, counts.worse) == (1, 1)


def test_window_keeps_the_last_distinct_clients_and_expires_by_age() -> None:
    mon, registry, clock = monitor(window_clients=3, window_s=60)
    for i in range(5):
        clock.now += 1
        mon.observe(FED, f"c{i}", 1, report(3.0, 4.0 if i < 2 else 2.0))
    counts = mon.counts(FED)
    assert (counts.clients, counts.harmed) == (3, 0)  # c0 and c1 (the harmed ones) fell out
    clock.now += 58  # c2 is 60 s old: still in; c3 and c4 younger
    assert mon.counts(FED).clients == 3
    clock.now += 0.5  # c2 is 60.5 s old
    assert mon.counts(FED).clients == 2
    clock.now += 100
    assert mon.counts(FED).clients == 0
    # Expired windows export nothing (no stale gauge).
    assert value(registry, "pfi_aggregator_personalization_reporting_clients", federation=FED) is None


def test_client_window_counts_stay_consistent() -> None:
    window = ClientWindow(max_clients=4, max_age_s=10)
    entries = [(f"c{i % 6}", i % 3 == 0, i % 2 == 0) for i in range(50)]
    for t, (client, harmed, worse) in enumerate(entries):
        window.put(client, quality._Entry(version=t, harmed=harmed, worse=worse, at=float(t) / 10))
        kept = list(window.entries.values())
        assert window.personal == len(kept) == window.judged
        assert window.harmed == sum(bool(e.harmed) for e in kept)
        assert window.worse == sum(bool(e.worse) for e in kept)
    assert len(window.entries) == 4


def test_cardinality_is_per_federation_whatever_the_clients() -> None:
    mon, registry, _ = monitor(max_federations=3)
    for i in range(300):
        mon.observe(f"fed-{i % 5}", f"client-{i}", i, report(3.0, 2.0 + (i % 3) * 0.6, 3.1))
    label_sets: set[tuple[tuple[str, str], ...]] = set()
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if "quality" in family.name or "personalization" in family.name or "global_" in family.name:
            for sample in family.samples:
                names.add(sample.name)
                label_sets.add(tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le")))
    assert names
    assert {key for labels in label_sets for key, _ in labels} <= {"federation", "outcome"}
    assert not any(v.startswith("client-") for labels in label_sets for _, v in labels)
    assert len(mon.snapshot()) == 3  # windows are bounded too: the least recently reporting went
    assert len(label_sets) <= 5 * len(quality.OUTCOMES) + 5


def test_observe_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    mon, registry, _ = monitor()

    def broken(metrics: TrainingMetrics) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(quality, "assess", broken)
    assert mon.observe(FED, "a", 1, report(3.0, 2.0)) == "error"
    assert value(registry, "pfi_aggregator_quality_reports_total", federation=FED, outcome="error") == 1


def test_monitor_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="margin"):
        QualityMonitor(CollectorRegistry(), margin=1.5)
    with pytest.raises(ValueError, match="window_clients"):
        QualityMonitor(CollectorRegistry(), window_clients=0)
