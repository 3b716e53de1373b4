"""The edge agent's quality report (issue 16): what it measures, what it remembers of the previous
global, and that it never puts a value on the wire that the schema would refuse (a fake trainer: the
real one is exercised in tests/integration/test_quality_metrics.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from clients.data import UserData
from clients.quality import (
    DiskQualityMemory,
    InMemoryQualityMemory,
    QualityProbe,
    QualityReport,
    Remembered,
    reportable,
)
from clients.training import PERSONAL, SHARED, AdapterTrainer, EvalResult
from schemas.errors import ConfigError
from schemas.events import MAX_REPORTED_LOSS, FederationSpec, TrainingMetrics

SPEC = FederationSpec(name="fed-q", base_model="pfi/tiny-llama")
USER = UserData("ann", "train text " * 20, "held out text " * 20)


class FakeTrainer:
    """Losses by which adapters are active; records what it was asked."""

    def __init__(self, global_loss: float = 3.0, personal_loss: float = 2.5) -> None:
        self.spec = SPEC
        self.losses = {(SHARED,): global_loss, (SHARED, PERSONAL): personal_loss}
        self.calls: list[dict[str, Any]] = []

    def evaluate(self, adapters: dict[str, Any], texts: list[str], **kw: Any) -> EvalResult:
        self.calls.append(
            {"slots": tuple(k for k, v in adapters.items() if v is not None), "texts": texts, **kw}
        )
        if not texts[0].strip():
            raise ConfigError("no text")
        return EvalResult(self.losses[self.calls[-1]["slots"]], 0.5, 100)


def measure(probe: QualityProbe, trainer: FakeTrainer, version: int, personal: bool = True) -> QualityReport:
    state = {"w": torch.zeros(1)}
    return probe.measure(
        cast(AdapterTrainer, trainer),
        "fed-q",
        version,
        state,
        state if personal else None,
        USER,
        seq_len=64,
        batch_size=4,
    )


def test_reports_global_and_personal_then_the_previous_global_once_it_moved() -> None:
    probe = QualityProbe(sequences=5)
    trainer = FakeTrainer(3.0, 2.5)
    assert measure(probe, trainer, 0) == QualityReport(3.0, 2.5, None)
    assert trainer.calls[0]["texts"] == [USER.heldout_text]  # the held-out text, never the training text
    assert trainer.calls[0]["max_sequences"] == 5
    trainer.losses[(SHARED,)] = 2.8
    assert measure(probe, trainer, 0) == QualityReport(2.8, 2.5, None)  # same version: nothing to compare
    trainer.losses[(SHARED,)] = 2.6
    assert measure(probe, trainer, 3) == QualityReport(2.6, 2.5, 2.8)
    assert measure(probe, trainer, 3, personal=False) == QualityReport(2.6, None, None)


def test_no_report_without_held_out_text_or_when_off() -> None:
    trainer = FakeTrainer()
    empty = UserData("ann", "train", "  ")
    probe = QualityProbe()
    state = {"w": torch.zeros(1)}
    report = probe.measure(
        cast(AdapterTrainer, trainer), "f", 1, state, state, empty, seq_len=8, batch_size=1
    )
    assert report == QualityReport()
    assert measure(QualityProbe(sequences=0), trainer, 1) == QualityReport()
    assert trainer.calls == []
    with pytest.raises(ConfigError):
        QualityProbe(sequences=-1)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -0.1, MAX_REPORTED_LOSS * 2])
def test_a_loss_the_schema_would_refuse_is_left_out(loss: float) -> None:
    probe = QualityProbe()
    report = measure(probe, FakeTrainer(3.0, loss), 1)
    assert report == QualityReport(3.0, None, None)
    TrainingMetrics(**report.fields())  # valid on the wire
    assert measure(QualityProbe(), FakeTrainer(loss, 2.0), 1) == QualityReport()
    assert reportable(loss) is None


def test_another_sample_or_split_is_not_compared() -> None:
    memory = InMemoryQualityMemory()
    trainer = FakeTrainer()
    measure(QualityProbe(memory, sequences=8), trainer, 1)
    assert measure(QualityProbe(memory, sequences=4), trainer, 2).val_loss_prev_global is None


def test_disk_memory_survives_a_restart_and_ignores_a_bad_file(tmp_path: Path) -> None:
    trainer = FakeTrainer(3.0)
    measure(QualityProbe(DiskQualityMemory(tmp_path)), trainer, 1)
    path = tmp_path / "ann" / "quality.json"
    assert path.stat().st_mode & 0o777 == 0o600
    trainer.losses[(SHARED,)] = 2.0
    assert measure(QualityProbe(DiskQualityMemory(tmp_path)), trainer, 2).val_loss_prev_global == 3.0
    for bad in ("not json", "[]", json.dumps({"fed-q": {"version": 1, "loss": "NaN", "split": "x"}})):
        path.write_text(bad)
        assert DiskQualityMemory(tmp_path).load("ann", "fed-q") is None
        assert measure(QualityProbe(DiskQualityMemory(tmp_path)), trainer, 3).val_loss_prev_global is None
    memory = DiskQualityMemory(tmp_path)
    for i in range(100):  # bounded however many federations
        memory.save("ann", f"fed-{i}", Remembered(1, 2.0, "s"))
    assert len(json.loads(path.read_text())) <= 64
    assert memory.load("ann", "fed-99") == Remembered(1, 2.0, "s")
