"""Staleness discount ``s(τ)`` of an update trained from a global that is ``τ`` versions old.

* ``constant``:   s(τ) = 1
* ``polynomial``: s(τ) = (1 + τ)^-a; ``a = 0.5`` is FedBuff's 1/√(1+τ) (Nguyen et al. 2022).
* ``hinge``:      s(τ) = 1 if τ ≤ b else 1 / (a(τ - b) + 1) (FedAsync, Xie et al. 2019).

The cut-off at ``max_staleness`` is not applied here: the service rejects such updates
(``RejectReason.TOO_STALE``) before they reach a buffer, so every weight computed here is > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from schemas.events import AggregationSpec

StalenessKind = Literal["constant", "polynomial", "hinge"]


def staleness_weight(tau: int, kind: StalenessKind, a: float, b: float) -> float:
    """The discount of an update of staleness ``tau`` (a value in (0, 1])."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if a < 0 or b < 0:
        raise ValueError(f"staleness parameters must be >= 0, got a={a}, b={b}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + tau) ** -a)
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}")


def from_spec(spec: AggregationSpec) -> Callable[[int], float]:
    """``s(τ)`` as configured by a federation's aggregation spec."""
    kind, a, b = spec.staleness, spec.staleness_a, spec.staleness_b

    def weight(tau: int) -> float:
        return staleness_weight(tau, kind, a, b)

    return weight
