"""Aggregation strategies, one per file, and the registry that names them (after Flower's
``framework/py/flwr/serverapp/strategy/``).

* combiners (:class:`~.base.Combiner`, keyed by the spec's ``robust``): :mod:`.weighted_mean` (``none``),
  :mod:`.trimmed_mean`, :mod:`.median`; each states its own DP sensitivity and per-client influence bound;
* server optimizers (:class:`~.base.ServerOptimizer`, keyed by ``server_optimizer``): :mod:`.fedavg`
  (``none``), :mod:`.fedavgm` (``momentum``), :mod:`.fedadam` (``adam``), :mod:`.fedyogi` (``yogi``);
* server DP: :class:`~.gaussian_dp.GaussianDP` wraps whichever combiner the spec names
  (:func:`combiner_for`).

**Adding a strategy**: write one file here with a class that implements the protocol (its docstring
cites the paper and derives its sensitivity / bound), add one line to :data:`COMBINERS` or
:data:`SERVER_OPTIMIZERS`, and add its name to the spec's ``Literal`` in ``schemas/events.py`` (the wire
contract cannot import ``services/``; ``tests/unit/test_agg_strategies.py`` fails until both lists
agree). Everything else (``aggregate``, the bounds, DP, the optimizer state's persistence, the CLI's
choices) follows the registry. Strategies are pure (no I/O) and stateless: state a server optimizer
needs lives in its named moment buffers, persisted with every version.
"""

from __future__ import annotations

import torch

from schemas.events import AggregationSpec
from services.aggregator.math.strategies.base import Combination, Combiner, ServerOptimizer
from services.aggregator.math.strategies.fedadam import FedAdam
from services.aggregator.math.strategies.fedavg import FedAvg
from services.aggregator.math.strategies.fedavgm import FedAvgM
from services.aggregator.math.strategies.fedyogi import FedYogi
from services.aggregator.math.strategies.gaussian_dp import GaussianDP
from services.aggregator.math.strategies.median import Median
from services.aggregator.math.strategies.trimmed_mean import TrimmedMean
from services.aggregator.math.strategies.weighted_mean import WeightedMean

COMBINERS: dict[str, Combiner] = {
    "none": WeightedMean(),
    "trimmed_mean": TrimmedMean(),
    "median": Median(),
}
"""Combiners by the spec's ``robust`` name."""

SERVER_OPTIMIZERS: dict[str, ServerOptimizer] = {
    "none": FedAvg(),
    "momentum": FedAvgM(),
    "adam": FedAdam(),
    "yogi": FedYogi(),
}
"""Server optimizers by the spec's ``server_optimizer`` name."""


def get_combiner(name: str) -> Combiner:
    """The combiner registered as ``name`` (``ValueError`` naming the known ones otherwise)."""
    try:
        return COMBINERS[name]
    except KeyError:
        raise ValueError(f"unknown combiner (robust) {name!r}; known: {sorted(COMBINERS)}") from None


def get_server_optimizer(name: str) -> ServerOptimizer:
    """The server optimizer registered as ``name`` (``ValueError`` naming the known ones otherwise)."""
    try:
        return SERVER_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown server optimizer kind {name!r}; known: {sorted(SERVER_OPTIMIZERS)}"
        ) from None


def combiner_for(spec: AggregationSpec, generator: torch.Generator | None = None) -> Combiner:
    """The spec's combiner, wrapped in :class:`GaussianDP` when it asks for server noise."""
    combiner = get_combiner(spec.robust)
    return GaussianDP(combiner, generator) if spec.dp_noise_multiplier > 0 else combiner


def check_spec(spec: AggregationSpec) -> None:
    """``ValueError`` unless the spec names registered strategies that accept it (on top of the schema's
    own checks): called when a federation is created or loaded."""
    combiner_for(spec).validate(spec)
    get_server_optimizer(spec.server_optimizer).validate(spec)


__all__ = [
    "COMBINERS",
    "SERVER_OPTIMIZERS",
    "Combination",
    "Combiner",
    "GaussianDP",
    "ServerOptimizer",
    "check_spec",
    "combiner_for",
    "get_combiner",
    "get_server_optimizer",
]
