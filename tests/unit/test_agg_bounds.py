"""Server-side weighting (issue 12): what AggregationSpec refuses, and the one-client influence bound."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from modeling.lora import StateDict
from schemas.events import MAX_NUM_SAMPLES, AggregationSpec
from services.aggregator.math.bounds import influence_bound, max_share, step_influence
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate, effective_samples
from services.aggregator.math.robust import l2_norm, trim_count, trimmed_window

SHAPES = {"a": (6, 5), "b": (5, 6)}


def test_defaults_cannot_be_inflated_and_are_norm_bounded() -> None:
    spec = AggregationSpec()
    assert spec.weighting == "uniform"
    assert spec.max_update_norm is not None
    assert spec.max_num_samples == 1024
    assert effective_samples(MAX_NUM_SAMPLES, spec) == 1
    samples = spec.model_copy(update={"weighting": "samples"})
    assert effective_samples(MAX_NUM_SAMPLES, samples) == 1024
    assert effective_samples(10, samples) == 10
    assert math.isfinite(influence_bound(spec))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"robust": "trimmed_mean", "buffer_size": 4, "trim_ratio": 0.1}, "trims nothing"),
        ({"robust": "trimmed_mean", "buffer_size": 9, "trim_ratio": 0.1}, "trims nothing"),
        ({"robust": "median", "buffer_size": 2}, "buffer_size >= 3"),
        ({"robust": "trimmed_mean", "buffer_size": 2, "trim_ratio": 0.49}, "buffer_size >= 3"),
        ({"max_update_norm": None}, "allow_unbounded_norm"),
        ({"max_update_norm": None, "allow_unbounded_norm": True, "dp_noise_multiplier": 1.0}, "DP noise"),
        ({"min_updates": 5, "buffer_size": 4}, "min_updates"),
        ({"max_client_updates": 5, "buffer_size": 4}, "max_client_updates"),
        ({"max_num_samples": 0}, "max_num_samples"),
        ({"max_update_norm": 1e30}, "max_update_norm"),
    ],
)
def test_spec_refuses_configurations_that_do_not_bound_a_client(
    fields: dict[str, object], match: str
) -> None:
    with pytest.raises(ValidationError, match=match):
        AggregationSpec.model_validate(fields)


def test_accepted_robust_configurations_and_flush_minimum() -> None:
    assert AggregationSpec(robust="trimmed_mean", buffer_size=4).trim_ratio * 4 >= 1  # default ratio 0.25
    assert AggregationSpec(robust="trimmed_mean", buffer_size=10, trim_ratio=0.1).flush_min_updates == 3
    assert AggregationSpec(robust="median", buffer_size=3).flush_min_updates == 3
    assert AggregationSpec(robust="median", buffer_size=8, min_updates=5).flush_min_updates == 5
    assert AggregationSpec().flush_min_updates == 1
    assert AggregationSpec(max_update_norm=None, allow_unbounded_norm=True).max_update_norm is None
    assert AggregationSpec(buffer_size=5).max_parked == 20


def test_a_smaller_timed_out_version_still_trims_one_per_side() -> None:
    # K = 10, ratio 0.1: a full buffer trims 1; a timed-out flush of 3..9 trims 1 too (floor would give 0)
    for n in range(3, 10):
        assert trim_count(n, 0.1, 1) == 1
        assert trimmed_window(n, 0.1, 1) == n - 2
    assert trim_count(2, 0.1, 1) == 0  # nothing could remain: the service never folds 2 (minimum 3)
    assert trim_count(20, 0.1, 1) == 2


def test_bound_formulas() -> None:
    spec = AggregationSpec(buffer_size=4, max_update_norm=2.0, server_lr=0.5)
    assert max_share(spec, 4) == pytest.approx(0.25)
    assert influence_bound(spec, 4) == pytest.approx(2 * 0.5 * 2.0 / 4)
    assert influence_bound(spec) == pytest.approx(2 * 0.5 * 2.0)  # a timed-out version of one update
    assert influence_bound(spec.model_copy(update={"min_updates": 2})) == pytest.approx(2 * 0.5 * 2.0 / 2)
    samples = spec.model_copy(update={"weighting": "samples", "max_num_samples": 9})
    assert max_share(samples, 4) == pytest.approx(9 / 12)
    median = AggregationSpec(robust="median", buffer_size=4, max_update_norm=2.0)
    assert step_influence(median, 3) == pytest.approx(4.0)  # odd: one order statistic
    assert step_influence(median, 4) == pytest.approx(2.0)  # even: mean of two
    assert influence_bound(median) == pytest.approx(4.0)  # versions of 3 or 4 updates
    trimmed = AggregationSpec(robust="trimmed_mean", buffer_size=10, trim_ratio=0.2, max_update_norm=1.0)
    assert step_influence(trimmed, 10) == pytest.approx(2.0 / 6)
    assert influence_bound(trimmed) == pytest.approx(2.0)  # n = 3 trims 1 per side: a window of 1
    two = spec.model_copy(update={"max_client_updates": 2})
    assert influence_bound(two, 4) == pytest.approx(2 * influence_bound(spec, 4))
    assert max_share(samples.model_copy(update={"max_client_updates": 2}), 4) == pytest.approx(18 / 20)
    assert step_influence(median.model_copy(update={"max_client_updates": 2}), 3) == pytest.approx(8.0)
    momentum = spec.model_copy(update={"server_optimizer": "momentum", "momentum": 0.75})
    assert influence_bound(momentum, 4) == pytest.approx(influence_bound(spec, 4) * 4)
    assert influence_bound(spec.model_copy(update={"server_optimizer": "adam"})) == math.inf
    unbounded = AggregationSpec(max_update_norm=None, allow_unbounded_norm=True)
    assert influence_bound(unbounded) == math.inf


def _rand(gen: torch.Generator, scale: float) -> StateDict:
    return {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}


def _sub(a: StateDict, b: StateDict) -> StateDict:
    return {k: a[k] - b[k] for k in a}


SPECS = {
    "uniform": AggregationSpec(buffer_size=5, max_update_norm=1.0, server_lr=0.7),
    "samples-capped": AggregationSpec(
        buffer_size=5, max_update_norm=1.0, weighting="samples", max_num_samples=64, server_lr=0.7
    ),
    "trimmed": AggregationSpec(buffer_size=5, max_update_norm=1.0, robust="trimmed_mean", trim_ratio=0.2),
    "median": AggregationSpec(buffer_size=5, max_update_norm=1.0, robust="median"),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("n", [3, 4, 5])
def test_one_client_moves_the_global_within_the_bound(name: str, n: int) -> None:
    """Replace one client's update (a zero delta, 10 samples) by the worst attacks we can think of (huge
    norm in several directions, 2**53 claimed samples, fresh): the global moves within the bound."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(n)
    g0 = _rand(gen, 1.0)
    honest = [BufferedUpdate(f"h{i}", f"h{i}", _rand(gen, 0.3), 10, i % 3) for i in range(n - 1)]
    zero = {k: torch.zeros(s) for k, s in SHAPES.items()}
    base = aggregate(g0, [*honest, BufferedUpdate("x", "x", zero, 10, 2)], spec).applied_delta
    bound = influence_bound(spec, n)
    mean_honest = {k: torch.stack([h.delta[k] for h in honest]).mean(0) for k in SHAPES}
    attacks: list[StateDict] = [
        {k: -v * 1e6 for k, v in mean_honest.items()},  # against the honest consensus, 1e6 x
        _rand(gen, 1e20),  # a finite float32 value of 1e20: clipped, not an overflow
        {k: torch.full(s, 3e38) for k, s in SHAPES.items()},
    ]
    worst = 0.0
    for attack in attacks:
        for claimed in (1, 64, MAX_NUM_SAMPLES):
            moved = aggregate(g0, [*honest, BufferedUpdate("x", "x", attack, claimed, 0)], spec).applied_delta
            influence = l2_norm(_sub(moved, base))
            assert influence <= bound * (1 + 1e-5), (influence, bound)
            worst = max(worst, influence)
    # not vacuous: the attacks get near it (order statistics keep a lone attacker within the honest values:
    # there the honest spread, not the bound, is what limits it)
    assert worst > (0.4 if spec.robust == "none" else 0.1) * bound


def test_uncapped_samples_would_let_one_client_take_the_version() -> None:
    """The counterfactual the defaults close: samples weighting with the claim uncapped and no clip."""
    gen = torch.Generator().manual_seed(9)
    g0 = _rand(gen, 1.0)
    honest = [BufferedUpdate(f"h{i}", f"h{i}", _rand(gen, 0.3), 10, 0) for i in range(3)]
    attack = {k: torch.full(s, 5.0) for k, s in SHAPES.items()}
    buf = [*honest, BufferedUpdate("x", "x", attack, MAX_NUM_SAMPLES, 0)]
    naive = AggregationSpec(
        weighting="samples", max_num_samples=MAX_NUM_SAMPLES, max_update_norm=None, allow_unbounded_norm=True
    )
    taken = aggregate(g0, buf, naive).applied_delta
    assert l2_norm(_sub(taken, attack)) < 1e-6 * l2_norm(attack)  # the global is the attacker's delta
    defended = aggregate(g0, buf, AggregationSpec(max_update_norm=1.0))
    assert defended.weights["x"] == pytest.approx(0.25)
    assert l2_norm(defended.applied_delta) <= 1.0 + 1e-6
