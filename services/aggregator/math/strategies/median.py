"""Coordinate-wise median (``robust="median"``; Yin et al. 2018).

Per coordinate, the middle clipped value (the mean of the two middle ones for an even count):
:func:`services.aggregator.math.robust.coordinate_median`. Like the trimmed mean it **ignores the
weights** (each update is reported with ``1/n``) and needs at least 3 updates.

The window averaged is ``m = 1`` (odd ``n``) or ``2`` (even): **sensitivity** ``C / m``
(:func:`services.aggregator.math.privacy.robust_sensitivity`), **influence** ``2·C·r / m``
(:func:`.base.order_statistic_influence`).
"""

from __future__ import annotations

from collections.abc import Sequence

from modeling.lora import StateDict
from schemas.events import ROBUST_MIN_UPDATES, AggregationSpec
from services.aggregator.math.privacy import robust_sensitivity
from services.aggregator.math.robust import coordinate_median, trimmed_window
from services.aggregator.math.strategies.base import (
    Combination,
    check_min_updates,
    dense,
    order_statistic_influence,
)


class Median:
    """Coordinate-wise median of the clipped deltas."""

    name = "median"
    min_updates = ROBUST_MIN_UPDATES

    def validate(self, spec: AggregationSpec) -> None:
        """At least 3 updates."""
        check_min_updates(spec, self)

    def combine(
        self,
        global_state: StateDict,
        deltas: Sequence[StateDict],
        raw_weights: Sequence[float],
        total: float,
        spec: AggregationSpec,
    ) -> Combination:
        weights = [1.0 / len(deltas)] * len(deltas)
        return Combination(coordinate_median(dense(global_state, deltas)), weights)

    def sensitivity(
        self, spec: AggregationSpec, clip: float, raw_weights: Sequence[float], total: float
    ) -> float:
        return robust_sensitivity(clip, trimmed_window(len(raw_weights), 0.5, 0))

    def influence(self, spec: AggregationSpec, n: int, clip: float) -> float:
        return order_statistic_influence(spec, n, clip, 1 if n % 2 == 1 else 2)
