"""Staleness discount s(tau)."""

from __future__ import annotations

import itertools
import math

import pytest

from schemas.events import AggregationSpec
from services.aggregator.math.staleness import from_spec, staleness_weight


@pytest.mark.parametrize("tau", [0, 1, 3, 15, 1000])
def test_constant_is_one(tau: int) -> None:
    assert staleness_weight(tau, "constant", 0.5, 4.0) == 1.0


@pytest.mark.parametrize("tau", [0, 1, 2, 3, 8, 99])
def test_polynomial_half_is_fedbuff_inverse_sqrt(tau: int) -> None:
    assert staleness_weight(tau, "polynomial", 0.5, 0.0) == pytest.approx(1.0 / math.sqrt(1 + tau), rel=1e-12)


def test_polynomial_general_exponent() -> None:
    assert staleness_weight(3, "polynomial", 2.0, 0.0) == pytest.approx(1.0 / 16.0)
    assert staleness_weight(5, "polynomial", 0.0, 0.0) == 1.0
    assert staleness_weight(0, "polynomial", 7.0, 0.0) == 1.0


def test_hinge_breakpoints() -> None:
    a, b = 0.5, 4.0
    for tau in range(5):  # no discount up to and including b
        assert staleness_weight(tau, "hinge", a, b) == 1.0
    assert staleness_weight(5, "hinge", a, b) == pytest.approx(1.0 / (0.5 * 1 + 1))
    assert staleness_weight(6, "hinge", a, b) == pytest.approx(0.5)
    assert staleness_weight(14, "hinge", a, b) == pytest.approx(1.0 / 6.0)
    # fractional b: the first discounted staleness is ceil(b)
    assert staleness_weight(2, "hinge", 1.0, 1.5) == pytest.approx(1.0 / 1.5)


@pytest.mark.parametrize("kind", ["constant", "polynomial", "hinge"])
def test_monotone_non_increasing_and_positive(kind: str) -> None:
    values = [staleness_weight(t, kind, 0.7, 2.0) for t in range(50)]  # type: ignore[arg-type]
    assert all(0 < v <= 1 for v in values)
    assert all(x >= y for x, y in itertools.pairwise(values))


def test_negative_staleness_raises() -> None:
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1, "polynomial", 0.5, 0.0)


def test_unknown_kind_and_bad_params_raise() -> None:
    with pytest.raises(ValueError, match="unknown staleness"):
        staleness_weight(1, "exponential", 0.5, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parameters"):
        staleness_weight(1, "polynomial", -0.5, 0.0)


def test_from_spec_uses_configured_function() -> None:
    s = from_spec(AggregationSpec(staleness="hinge", staleness_a=1.0, staleness_b=2.0))
    assert [s(t) for t in (0, 2, 3, 4)] == pytest.approx([1.0, 1.0, 0.5, 1.0 / 3.0])
    s = from_spec(AggregationSpec())  # default: polynomial, a = 0.5
    assert s(3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="staleness"):
        s(-2)
