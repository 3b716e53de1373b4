"""The serving backend interface: what the request logic (:mod:`..engine`, :mod:`..served_federation`,
:mod:`..batcher`) needs from the code that holds and runs a model, and nothing more.

A backend (:class:`ServingBackend`) builds :class:`ModelStack` objects. A stack is one servable model of
one federation: the base with the global adapter ``version`` merged in (``kind`` "merged"), or the base
alone (``kind`` "base", for comparisons). The request logic never touches a module or a tensor: it
tokenizes with :attr:`ModelStack.tokens`, hands batches of rows to the model thread and reads back one
result per row. Row and result types (:class:`ScoreRow`, :class:`GenRow`, :class:`ScoreOut`,
:class:`GenOut`) are part of the contract.

Contract (what the callers rely on; a new backend must keep every point):

* **Build a merged global stack** (:meth:`ServingBackend.build_merged`): base + the global adapter of
  one federation version, able to serve ``slots`` distinct personal adapters in one batch. Called in a
  worker thread, never on the event loop, possibly while other stacks of the same base serve batches:
  the base must only be read (older versions and other federations share it). A global adapter that
  does not fit the base raises :class:`~schemas.errors.ConfigError`.
* **Bind personal adapters** (:meth:`ModelStack.bind`): for one batch, give each distinct adapter of
  the rows a slot (``NO_SLOT`` for rows without one) and return the slot of each row; at most
  :attr:`ModelStack.slots` distinct adapters per batch (the batcher never forms larger batches).
  Personal adapters stay unmerged; a binding may survive across batches (a cache of hot users).
* **Score** / **generate** (:meth:`ModelStack.score`, :meth:`ModelStack.generate`): one call serves all
  rows of a batch, each with its own personal adapter or none (base + global only). A row's result
  does not depend on the batch it landed in (up to float rounding); the batcher has already bounded
  the rows and padded tokens. Model thread only (:mod:`..batcher`): calls never overlap. A generation
  row with ``on_token`` gets each new token through it as soon as it is chosen, and ends at once
  (``GenOut.finish_reason`` "stopped") when it returns False; the batch's other rows go on.
* **Let go of evicted adapters** (:meth:`ModelStack.release_evicted`): after each batch, and on demand,
  forget every bound adapter whose ``evicted`` flag is set (left the cache, replaced or deleted): the
  model must not keep a copy of a deleted adapter. :meth:`ModelStack.bound_adapters` says what is bound.

The fields of :class:`ModelStack` below ``build_seconds`` (leases, publication time, first use) belong to
the event loop that serves the federation (:class:`..served_federation.ServedFederation`); backends
leave them alone.

Adding a backend: a module or package under :mod:`services.personalization.backends` with a
:class:`ServingBackend` and a :class:`ModelStack` subclass, and one line in
:data:`services.personalization.backends.BACKENDS`; ``PFI_SERVE_BACKEND`` selects it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch

from modeling.base import BaseModel
from schemas.events import FederationSpec
from schemas.records import VersionMeta
from services.personalization.user_adapters import PersonalAdapter

NO_SLOT = -1  # the slot of a row served without a personal adapter
StackKind = Literal["merged", "base"]


class TokenCodec(Protocol):
    """The tokenizer calls the request logic makes (limits, prompt ids, decoded text)."""

    @property
    def max_positions(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class ScoreRow:
    ids: list[int]
    adapter: PersonalAdapter | None
    #: The ids ``ids[1 : 1 + context_len]`` are retrieved context (after BOS): they condition the rest
    #: but are not scored as targets (the text's tokens are).
    context_len: int = 0


@dataclass(frozen=True)
class ScoreOut:
    nll_sum: float
    correct: int
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")


@dataclass(frozen=True)
class GenRow:
    ids: list[int]
    adapter: PersonalAdapter | None
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    #: Called on the model thread with each new token as soon as it is chosen (never EOS); returning
    #: False ends the row after that token (finish "stopped"): streaming, stop strings, disconnects.
    on_token: Callable[[int], bool] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenOut:
    tokens: list[int]
    finish_reason: str  # "eos" | "length" | "stopped" (the row's ``on_token`` returned False)


class ModelStack(ABC):
    """One servable model of ``federation``: base + global ``version`` ("merged") or the base alone
    ("base", ``version`` -1). Compared by identity (the batcher never mixes two stacks in a batch)."""

    def __init__(
        self,
        *,
        federation: str,
        version: int,
        kind: StackKind,
        tokens: TokenCodec,
        slots: int = 0,
        meta: VersionMeta | None = None,
    ) -> None:
        self.federation = federation
        self.version = version
        self.kind: StackKind = kind
        self.tokens = tokens
        self.slots = slots  # distinct personal adapters one batch may use
        self.meta = meta  # the version's metadata (its digest names the content merged in)
        self.build_seconds = 0.0
        # -- event loop (the served federation) ------------------------------------------------------
        self.published_at: float | None = None  # unix time of the announcement that made us build it
        self.refs = 0  # leases: requests (and ``current``) holding this stack
        self.first_served = False

    @property
    def digest(self) -> str | None:
        return None if self.meta is None else self.meta.digest

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.federation!r}, v{self.version}, {self.kind}, refs={self.refs})"

    # -- model thread -------------------------------------------------------------------------------
    @abstractmethod
    def bind(self, adapters: Sequence[PersonalAdapter | None]) -> list[int]:
        """The slot of each row's adapter (``NO_SLOT``: none), binding those not bound yet."""

    @abstractmethod
    def score(self, rows: Sequence[ScoreRow]) -> list[ScoreOut]:
        """Per row: summed next-token NLL, correct argmax predictions and predicted positions."""

    @abstractmethod
    def generate(self, rows: Sequence[GenRow]) -> list[GenOut]:
        """Per row: up to ``max_new_tokens`` new tokens (EOS ends a row early)."""

    @abstractmethod
    def release_evicted(self) -> None:
        """Forget every bound adapter whose ``evicted`` flag is set."""

    @abstractmethod
    def bound_adapters(self) -> list[PersonalAdapter]:
        """The personal adapters bound to slots now."""


class ServingBackend(ABC):
    """Builds the model stacks a federation serves (see the module docstring for the contract)."""

    name: ClassVar[str]  # the value of ``PFI_SERVE_BACKEND`` that selects it

    @abstractmethod
    def build_merged(
        self,
        base: BaseModel,
        spec: FederationSpec,
        version: int,
        global_state: Mapping[str, torch.Tensor],
        *,
        slots: int,
        meta: VersionMeta | None = None,
    ) -> ModelStack:
        """Base + ``global_state`` (PEFT-keyed LoRA A/B tensors of ``spec``'s adapter) as ``version``,
        with ``slots`` personal adapter slots. Worker thread; ``base`` is only read."""

    @abstractmethod
    def base_only(self, base: BaseModel, federation: str) -> ModelStack:
        """The base alone (no global, no personal adapters), for "base only" comparisons."""
