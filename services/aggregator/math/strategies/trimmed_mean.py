"""Coordinate-wise trimmed mean (``robust="trimmed_mean"``; Yin et al. 2018).

Per coordinate, drops the ``k`` smallest and ``k`` largest of the ``n`` clipped values and averages the
``m = n - 2k`` left (:func:`services.aggregator.math.robust.coordinate_trimmed_mean`), with
``k = max(⌊trim_ratio·n⌋, 1)`` (``MIN_TRIM``: a timed-out flush of fewer than K still trims one per side).
The statistic **ignores the weights** (staleness and sample counts cannot be honoured by an order
statistic without letting a liar inflate its influence): each update is reported with ``1/n``.

**Sensitivity**: ``C / m`` (:func:`services.aggregator.math.privacy.robust_sensitivity`); **influence**:
``2·C·r / m`` (:func:`.base.order_statistic_influence`).
"""

from __future__ import annotations

from collections.abc import Sequence

from modeling.lora import StateDict
from schemas.events import ROBUST_MIN_UPDATES, AggregationSpec
from services.aggregator.math.privacy import robust_sensitivity
from services.aggregator.math.robust import MIN_TRIM, coordinate_trimmed_mean, trim_count, trimmed_window
from services.aggregator.math.strategies.base import (
    Combination,
    check_min_updates,
    dense,
    order_statistic_influence,
)


class TrimmedMean:
    """Coordinate-wise trimmed mean of the clipped deltas, trimming at least one per side."""

    name = "trimmed_mean"
    min_updates = ROBUST_MIN_UPDATES

    def validate(self, spec: AggregationSpec) -> None:
        """At least 3 updates, and a full buffer trims at least one per side."""
        check_min_updates(spec, self)
        if trim_count(spec.buffer_size, spec.trim_ratio) < MIN_TRIM:
            raise ValueError(
                f"trimmed_mean with trim_ratio={spec.trim_ratio} and buffer_size={spec.buffer_size} trims "
                f"nothing: need floor(trim_ratio * buffer_size) >= {MIN_TRIM}"
            )

    def combine(
        self,
        global_state: StateDict,
        deltas: Sequence[StateDict],
        raw_weights: Sequence[float],
        total: float,
        spec: AggregationSpec,
    ) -> Combination:
        weights = [1.0 / len(deltas)] * len(deltas)
        return Combination(
            coordinate_trimmed_mean(dense(global_state, deltas), spec.trim_ratio, MIN_TRIM), weights
        )

    def sensitivity(
        self, spec: AggregationSpec, clip: float, raw_weights: Sequence[float], total: float
    ) -> float:
        return robust_sensitivity(clip, trimmed_window(len(raw_weights), spec.trim_ratio, MIN_TRIM))

    def influence(self, spec: AggregationSpec, n: int, clip: float) -> float:
        return order_statistic_influence(spec, n, clip, trimmed_window(n, spec.trim_ratio, MIN_TRIM))
