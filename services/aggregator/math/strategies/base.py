"""The two protocols an aggregation strategy implements (after Flower's ``serverapp/strategy``).

A version is made in two steps (see :func:`services.aggregator.math.fedbuff.aggregate`):

1. a :class:`Combiner` turns the buffer's clipped deltas into one pseudo-gradient ``Δ`` (weighted mean,
   trimmed mean, median, ...; the spec's ``robust`` names it). It also states, for the proofs, its L2
   sensitivity (what the server's Gaussian noise is scaled to) and how far one client can move ``Δ``;
2. a :class:`ServerOptimizer` applies ``Δ`` to the global adapter, key by key, with its own moment
   buffers (none, momentum, Adam, ...; the spec's ``server_optimizer`` names it). It also states how
   it amplifies a bound on ``Δ`` into a bound on the global.

Server DP (:mod:`.gaussian_dp`) wraps any combiner. Strategies are stateless singletons, pure (no I/O)
and keyed by their spec name in :mod:`services.aggregator.math.strategies` (the registry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec


class Combination(NamedTuple):
    """What a combiner produced from one buffer."""

    pseudo_gradient: StateDict  # float32, the keys some delta has
    weights: list[float]  # the normalized weight of each update, in buffer order (reported per version)
    noise_std: float = 0.0  # std of the server Gaussian noise added (see :mod:`.gaussian_dp`)


class Combiner(Protocol):
    """Combines the clipped deltas of one buffer into the pseudo-gradient."""

    name: str  # the spec's ``robust`` value that selects it
    min_updates: int  # fewest updates a version of this combiner may have (the schema enforces it)

    def validate(self, spec: AggregationSpec) -> None:
        """Raise ``ValueError`` when ``spec`` cannot be aggregated by this combiner (called when a federation
        is created or loaded; what the schema checks already need not be checked again)."""
        ...

    def combine(
        self,
        global_state: StateDict,
        deltas: Sequence[StateDict],
        raw_weights: Sequence[float],
        total: float,
        spec: AggregationSpec,
    ) -> Combination:
        """``deltas`` are projected and clipped (norm <= ``max_update_norm``); a key absent from a delta is a
        zero delta for that key. ``raw_weights[i] = s(τ_i)·n_i`` and ``total = Σ n_i`` (see fedbuff). A key no
        delta has is left out of the result. Inputs are never modified."""
        ...

    def sensitivity(
        self, spec: AggregationSpec, clip: float, raw_weights: Sequence[float], total: float
    ) -> float:
        """L2 sensitivity of :meth:`combine` when one delta (norm <= ``clip``) is zeroed (see
        :mod:`services.aggregator.math.privacy`): the server noise std is ``dp_noise_multiplier`` times it."""
        ...

    def influence(self, spec: AggregationSpec, n: int, clip: float) -> float:
        """How far (L2) one client's updates (up to ``max_client_updates``) can move the pseudo-gradient of a
        version of ``n`` updates, each clipped to ``clip`` (see :mod:`services.aggregator.math.bounds`)."""
        ...


class ServerOptimizer(Protocol):
    """Applies the pseudo-gradient to the global adapter, one tensor at a time."""

    name: str  # the spec's ``server_optimizer`` value that selects it
    buffers: tuple[str, ...]  # names of its moment buffers (persisted with every version)

    def validate(self, spec: AggregationSpec) -> None:
        """Raise ``ValueError`` when ``spec`` cannot drive this optimizer (see :meth:`Combiner.validate`)."""
        ...

    def step(
        self, delta: torch.Tensor, moments: Mapping[str, torch.Tensor | None], spec: AggregationSpec
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(step, new_moments)`` for one tensor: the global moves by ``step`` (``server_lr`` included).
        ``delta`` is float32; ``moments`` has one entry per buffer name, ``None`` before the first step of
        that key. Returns new tensors; the inputs are not modified."""
        ...

    def bound(self, spec: AggregationSpec, step_bound: float) -> float:
        """How far one client can move the global, over all later versions, when it can move each
        pseudo-gradient by at most ``step_bound`` (``inf`` when no bound in terms of it holds)."""
        ...


def dense(global_state: StateDict, deltas: Sequence[StateDict]) -> list[StateDict]:
    """The deltas as float32 dicts over the same keys (those some delta has, in the global's order), a
    missing key filled with zeros: what the coordinate-wise statistics need."""
    keys = [k for k in global_state if any(k in d for d in deltas)]
    return [
        {k: (d[k].to(torch.float32) if k in d else torch.zeros(global_state[k].shape)) for k in keys}
        for d in deltas
    ]


def order_statistic_influence(spec: AggregationSpec, n: int, clip: float, window: int) -> float:
    """Influence bound of a coordinate-wise statistic averaging ``window`` order statistics of ``n`` values.

    Changing one input value from ``x`` to ``x'`` moves every order statistic of that coordinate in the same
    direction by amounts that sum to ``x' - x``, so the mean of a window of ``m`` order statistics moves by
    at most ``|x' - x| / m``; over all coordinates ``||x' - x|| / m <= 2C / m``. Changing ``r`` values
    (``max_client_updates``) moves the window's sum by at most the sum of their changes: ``2·C·r / m``.
    What the L2 bound does not show: with one attacker and ``k >= 1`` trimmed per side every coordinate
    also stays within the range of the honest values (with ``r > k`` that is lost: keep ``r = 1``).
    """
    return 2.0 * clip * min(spec.max_client_updates, n) / window


def check_min_updates(spec: AggregationSpec, combiner: Combiner) -> None:
    """``ValueError`` unless a full buffer has the ``min_updates`` the combiner needs."""
    if spec.buffer_size < combiner.min_updates:
        raise ValueError(
            f"robust={combiner.name!r} needs buffer_size >= {combiner.min_updates}, got {spec.buffer_size}"
        )
