"""On-device personalization: fit the personal adapter against the current global, then gate it.

The recipe (FedALT / APFL / Gboard style, measured in ``pfi demo``'s report):

1. the user's training text is split in time: the **last** ``validation_fraction`` of its paragraphs is
   the validation split (:func:`validation_split`), the rest is what the adapter is fitted on;
2. the personal adapter is fitted **relative to the current global adapter**: the global is loaded in
   the shared slot and frozen (``train_shared=False``), only the personal LoRA trains, with its own
   steps and learning rate (:class:`PersonalizeConfig`), starting from the adapter the device already
   has (or a fresh one);
3. a gate ``g`` from a small grid (0, 0.25, ..., 1) scales the personal LoRA's output; the device
   scores its validation split with the global active at every ``g`` and keeps the best one
   (:func:`choose_gate`). ``g = 0`` (personal off, the global alone) is always in the grid, so the chosen
   gate is never worse than the global on the user's own validation text.

The service serves ``global + g * personal`` per row (``PUT .../adapter?gate=g``); the personal adapter
itself is kept unscaled on the device so later rounds continue from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from clients.data import UserData, split_user_text
from clients.training import PERSONAL, SHARED, AdapterTrainer, TrainConfig
from modeling.lora import StateDict
from schemas.errors import ConfigError

DEFAULT_GATES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PersonalizeConfig:
    """The personal step's recipe. Defaults: see the module doc and the demo report's measurements."""

    steps: int = 24
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 4e-3
    validation_fraction: float = 0.1
    gates: tuple[float, ...] = DEFAULT_GATES
    eval_seq_len: int = 128
    # The gate grid scores at most this many validation sequences per gate (1,024 tokens at 128): the
    # device's cost stays bounded however long the user's history is.
    max_validation_sequences: int = 8
    warm_start: bool = True  # continue from the device's personal adapter (False: a fresh one)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2 or self.eval_seq_len < 2:
            raise ConfigError("personalize: steps >= 0, batch_size >= 1, seq_len >= 2, eval_seq_len >= 2")
        if self.max_validation_sequences < 1:
            raise ConfigError("personalize: max_validation_sequences must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("personalize: lr must be a finite number > 0")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError("personalize: validation_fraction must be in (0, 1)")
        if not self.gates or any(not (0.0 <= g <= 1.0) for g in self.gates):
            raise ConfigError("personalize: gates must be in [0, 1]")
        if 0.0 not in self.gates:
            raise ConfigError("personalize: the gate grid must contain 0 (personal off)")


@dataclass(frozen=True)
class PersonalizeResult:
    """``personal``: the fitted (unscaled) adapter; ``gate``: the chosen gate; ``val_nll``: validation
    NLL per gate (``val_nll[0.0]`` = the global alone)."""

    personal: StateDict
    gate: float
    val_nll: dict[float, float]
    val_tokens: int
    steps: int
    seconds: float

    @property
    def val_gain(self) -> float:
        """Relative validation NLL reduction of the chosen gate over the global alone."""
        ref = self.val_nll[0.0]
        return (ref - self.val_nll[self.gate]) / ref if ref else 0.0


def validation_split(train_text: str, fraction: float = 0.1) -> tuple[str, str]:
    """``(fit, validation)``: the last ``fraction`` of the training paragraphs is the validation split
    (the most recent text, the closest to what the user writes next); never the held-out text."""
    return split_user_text(train_text, heldout_fraction=fraction, seed="validation", mode="tail")


def gated(state: Mapping[str, torch.Tensor], gate: float) -> StateDict:
    """The adapter whose LoRA output is ``gate`` times ``state``'s (``lora_B`` scaled; pure)."""
    if not 0.0 <= gate <= 1.0:
        raise ConfigError(f"gate must be in [0, 1], got {gate}")
    return {
        k: (v * gate if ".lora_B." in k or k.endswith("lora_embedding_B") else v) for k, v in state.items()
    }


def choose_gate(val_nll: Mapping[float, float]) -> float:
    """The gate with the lowest validation NLL; ties (and non-finite losses) go to the smaller gate,
    and a gate is chosen over 0 only when it is strictly better than the global alone."""
    if 0.0 not in val_nll:
        raise ConfigError("choose_gate needs the loss at gate 0 (the global alone)")
    best = 0.0
    for gate in sorted(val_nll):
        loss = val_nll[gate]
        if math.isfinite(loss) and loss < val_nll[best]:
            best = gate
    return best


def gate_losses(
    trainer: AdapterTrainer,
    global_adapter: StateDict,
    personal: StateDict,
    texts: Sequence[str],
    gates: Sequence[float],
    *,
    seq_len: int,
    batch_size: int,
    max_sequences: int | None = None,
) -> tuple[dict[float, float], int]:
    """Validation NLL of ``global + g * personal`` for each gate (on the first ``max_sequences`` packed
    sequences of ``texts``; all when None), and the tokens scored."""
    out: dict[float, float] = {}
    tokens = 0
    for gate in sorted(set(gates)):
        adapters: dict[str, StateDict | None] = {SHARED: global_adapter}
        if gate > 0.0:
            adapters[PERSONAL] = gated(personal, gate)
        result = trainer.evaluate(
            adapters, list(texts), seq_len=seq_len, batch_size=batch_size, max_sequences=max_sequences
        )
        out[gate], tokens = result.mean_nll, result.tokens
    return out, tokens


def personalize(
    trainer: AdapterTrainer,
    global_adapter: StateDict,
    personal: StateDict | None,
    data: UserData,
    cfg: PersonalizeConfig,
) -> PersonalizeResult:
    """Fit the personal adapter against ``global_adapter`` (frozen) on the user's training text less its
    validation split, then choose the gate on the validation split (blocking: run it in a worker
    thread). A user without validation text keeps gate 0 (nothing shows that the adapter helps)."""
    started = time.perf_counter()
    fit, validation = validation_split(data.train_text, cfg.validation_fraction)
    if not fit.strip():
        fit, validation = data.train_text, ""
    train = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        personal_lr=cfg.lr,
        seed=cfg.seed,
        train_shared=False,
        eval_sequences=1,
    )
    start = personal if cfg.warm_start else None
    result = trainer.train(global_adapter, start, UserData(data.user_id, fit, ""), train)
    if not validation.strip():
        return PersonalizeResult(
            result.personal, 0.0, {0.0: math.nan}, 0, result.steps, time.perf_counter() - started
        )
    try:
        losses, tokens = gate_losses(
            trainer,
            global_adapter,
            result.personal,
            [validation],
            cfg.gates,
            seq_len=cfg.eval_seq_len,
            batch_size=cfg.batch_size,
            max_sequences=cfg.max_validation_sequences,
        )
    except ConfigError:  # validation text too short to score
        return PersonalizeResult(
            result.personal, 0.0, {0.0: math.nan}, 0, result.steps, time.perf_counter() - started
        )
    return PersonalizeResult(
        personal=result.personal,
        gate=choose_gate(losses),
        val_nll=losses,
        val_tokens=tokens,
        steps=result.steps,
        seconds=time.perf_counter() - started,
    )
