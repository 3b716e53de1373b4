"""What an edge agent reports about its model's quality with each update (issue 16): numbers only.

After local training the agent scores a small fixed sample of the user's **held-out** text (the part
never trained on, nor used to choose a personal gate: the report is an unbiased estimate) under

* the global version it trained from, alone: ``val_loss_global``;
* that global plus the personal adapter as it will be served (gated, when the agent gates it):
  ``val_loss_personal``;

and remembers ``val_loss_global`` with its version, so the next round on a **newer** global reports the
previous one as ``val_loss_prev_global`` (the same sample, the same split: comparable; a different split,
sample size or federation spec means no previous value). Each value goes out only if it is finite and in
``0..MAX_REPORTED_LOSS`` (the schema's bounds): a diverged loss is left out, never sent as text or as
an out-of-range number that would get the whole update refused.

Cost: two forward passes over ``sequences`` (default 8) packed sequences per round, next to the
training's ``steps x batch_size`` forward + backward passes. The service only monitors these numbers
(services/aggregator/quality.py); nothing is weighted by them. Memory of the previous global's loss:
``<state_dir>/<user>/quality.json`` when the agent has a state directory, else in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from clients.data import UserData
from clients.files import atomic_write
from clients.training import PERSONAL, SHARED, AdapterTrainer
from modeling.lora import StateDict
from schemas.errors import ConfigError
from schemas.events import MAX_REPORTED_LOSS

log = logging.getLogger("pfi.edge.quality")

DEFAULT_SEQUENCES = 8
MEMORY_FILE = "quality.json"
MAX_REMEMBERED = 64  # federations remembered per user (the file stays tiny)


@dataclass(frozen=True)
class QualityReport:
    """The three reported losses (``None``: not measured, or not reportable)."""

    val_loss_global: float | None = None
    val_loss_personal: float | None = None
    val_loss_prev_global: float | None = None

    def fields(self) -> dict[str, float | None]:
        """Keyword arguments of :class:`schemas.events.TrainingMetrics`."""
        return asdict(self)


def reportable(value: float | None) -> float | None:
    """``value`` if the wire contract allows it (finite, ``0..MAX_REPORTED_LOSS``), else ``None``."""
    if value is None or not math.isfinite(value) or not 0.0 <= value <= MAX_REPORTED_LOSS:
        return None
    return float(value)


@dataclass(frozen=True)
class Remembered:
    """The last global a client scored: its version and loss, on which sample (``split``: a digest)."""

    version: int
    loss: float
    split: str


class QualityMemory(Protocol):
    def load(self, user_id: str, federation: str) -> Remembered | None: ...
    def save(self, user_id: str, federation: str, entry: Remembered) -> None: ...


class InMemoryQualityMemory:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Remembered] = {}

    def load(self, user_id: str, federation: str) -> Remembered | None:
        return self._entries.get((user_id, federation))

    def save(self, user_id: str, federation: str, entry: Remembered) -> None:
        self._entries[(user_id, federation)] = entry


class DiskQualityMemory:
    """``<state_dir>/<user>/quality.json``: ``{federation: {"version", "loss", "split"}}``, written
    atomically. An unreadable or implausible file is ignored (the next round has no previous value)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, user_id: str) -> Path:
        return self.state_dir / user_id / MEMORY_FILE

    def _read(self, user_id: str) -> dict[str, Remembered]:
        try:
            raw = json.loads(self.path(user_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable %s: %s", self.path(user_id), err)
            return {}
        out: dict[str, Remembered] = {}
        if not isinstance(raw, dict):
            return out
        for federation, item in list(raw.items())[-MAX_REMEMBERED:]:
            try:
                entry = Remembered(int(item["version"]), float(item["loss"]), str(item["split"]))
            except (KeyError, TypeError, ValueError):
                continue
            if entry.version >= 0 and reportable(entry.loss) is not None:
                out[str(federation)] = entry
        return out

    def load(self, user_id: str, federation: str) -> Remembered | None:
        return self._read(user_id).get(federation)

    def save(self, user_id: str, federation: str, entry: Remembered) -> None:
        entries = self._read(user_id)
        entries.pop(federation, None)
        entries[federation] = entry
        body = {name: asdict(e) for name, e in list(entries.items())[-MAX_REMEMBERED:]}
        atomic_write(self.path(user_id), json.dumps(body, sort_keys=True).encode(), mode=0o600)


def split_digest(text: str, *, seq_len: int, sequences: int, fingerprint: str) -> str:
    """Identifies the sample scored: two losses are comparable only when this is the same."""
    parts = f"{fingerprint}\x1f{seq_len}\x1f{sequences}\x1f".encode() + text.encode("utf-8")
    return hashlib.sha256(parts).hexdigest()


class QualityProbe:
    """Measures an agent's :class:`QualityReport` each round (blocking: call it in the trainer's worker
    thread, like training). ``sequences=0`` turns reporting off."""

    def __init__(self, memory: QualityMemory | None = None, *, sequences: int = DEFAULT_SEQUENCES) -> None:
        if sequences < 0:
            raise ConfigError("quality sequences must be >= 0")
        self.memory = memory if memory is not None else InMemoryQualityMemory()
        self.sequences = sequences

    def measure(
        self,
        trainer: AdapterTrainer,
        federation: str,
        version: int,
        global_adapter: StateDict,
        personal: StateDict | None,
        data: UserData,
        *,
        seq_len: int,
        batch_size: int,
    ) -> QualityReport:
        """Score the held-out sample under ``global_adapter`` (version ``version``) alone and with
        ``personal`` (as served: pass the gated adapter when it is gated; ``None``: no personal report);
        report the previous global's remembered loss when this global is another version."""
        text = data.heldout_text
        if self.sequences == 0 or not text.strip():
            return QualityReport()

        def score(adapters: Mapping[str, StateDict | None]) -> float | None:
            try:
                result = trainer.evaluate(
                    adapters, [text], seq_len=seq_len, batch_size=batch_size, max_sequences=self.sequences
                )
            except ConfigError:  # no scorable text (shorter than 2 tokens)
                return None
            return reportable(result.mean_nll)

        val_global = score({SHARED: global_adapter})
        if val_global is None:
            return QualityReport()
        val_personal = score({SHARED: global_adapter, PERSONAL: personal}) if personal is not None else None
        split = split_digest(
            text, seq_len=seq_len, sequences=self.sequences, fingerprint=trainer.spec.fingerprint()
        )
        before = self.memory.load(data.user_id, federation)
        previous = None
        if before is not None and before.split == split and before.version != version:
            previous = reportable(before.loss)
        self.memory.save(data.user_id, federation, Remembered(version, val_global, split))
        return QualityReport(val_global, val_personal, previous)
