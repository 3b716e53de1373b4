"""Server-side differential privacy as a wrapper around any combiner (the Gaussian mechanism).

:class:`GaussianDP` adds i.i.d. ``N(0, std²)`` noise to the pseudo-gradient of the combiner it wraps, with
``std = dp_noise_multiplier · sensitivity`` and the sensitivity the wrapped combiner states for its own
statistic (weighted mean: ``C·max w / Σ n``; trimmed mean / median: ``C / m``; see
:mod:`services.aggregator.math.privacy` for the adjacency and the derivations). :func:`account` spends the
privacy of one released version in the federation's RDP accountant (Mironov 2017). The noise does not
depend on any client and is not part of the per-client influence bound, which is the wrapped one's.
As Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy; clipping itself is the
aggregation's first step (every delta, with or without DP), so it is not repeated here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.privacy import RdpAccountant, add_gaussian_noise
from services.aggregator.math.strategies.base import Combination, Combiner


class GaussianDP:
    """``inner``'s combination plus Gaussian noise scaled to ``inner``'s sensitivity.

    ``generator`` drives the noise (a fresh, OS-seeded one per combination when ``None``).
    """

    def __init__(self, inner: Combiner, generator: torch.Generator | None = None) -> None:
        self.inner = inner
        self.generator = generator
        self.name = inner.name
        self.min_updates = inner.min_updates

    def validate(self, spec: AggregationSpec) -> None:
        """The wrapped combiner's checks, and a clipping bound to scale the noise to."""
        self.inner.validate(spec)
        if spec.max_update_norm is None:
            raise ValueError("server DP noise needs max_update_norm (the clipping bound) to be set")

    def combine(
        self,
        global_state: StateDict,
        deltas: Sequence[StateDict],
        raw_weights: Sequence[float],
        total: float,
        spec: AggregationSpec,
    ) -> Combination:
        plain = self.inner.combine(global_state, deltas, raw_weights, total, spec)
        if spec.max_update_norm is None:
            raise ValueError("server DP noise needs max_update_norm (the clipping bound) to be set")
        std = spec.dp_noise_multiplier * self.inner.sensitivity(
            spec, spec.max_update_norm, raw_weights, total
        )
        generator = self.generator
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        return Combination(add_gaussian_noise(plain.pseudo_gradient, std, generator), plain.weights, std)

    def sensitivity(
        self, spec: AggregationSpec, clip: float, raw_weights: Sequence[float], total: float
    ) -> float:
        return self.inner.sensitivity(spec, clip, raw_weights, total)

    def influence(self, spec: AggregationSpec, n: int, clip: float) -> float:
        return self.inner.influence(spec, n, clip)


def account(accountant: RdpAccountant, spec: AggregationSpec) -> tuple[RdpAccountant, float | None]:
    """The accountant after one more version released under ``spec`` (a new one; the input is left as it
    was) and the ε spent so far at ``dp_delta``; without server noise: the same accountant and ``None``."""
    if not spec.dp_noise_multiplier > 0:
        return accountant, None
    spent = copy.deepcopy(accountant)
    spent.step(spec.dp_noise_multiplier)
    return spent, spent.epsilon(spec.dp_delta)
