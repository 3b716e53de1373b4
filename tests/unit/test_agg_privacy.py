"""Server Gaussian mechanism: noise, sensitivity and the RDP accountant."""

from __future__ import annotations

import json
import math

import pytest
import torch

from schemas.events import AggregationSpec
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.aggregator.math.privacy import (
    DEFAULT_ORDERS,
    RdpAccountant,
    add_gaussian_noise,
    robust_sensitivity,
    sensitivity,
)
from services.aggregator.math.robust import (
    StateDict,
    clip_to_norm,
    coordinate_median,
    coordinate_trimmed_mean,
    l2_norm,
    trimmed_window,
)

K = "m.q_proj.lora_B.weight"


def test_noise_is_seeded_and_has_the_requested_std() -> None:
    delta = {K: torch.zeros(200, 500), "m.v_proj.lora_B.weight": torch.ones(3)}
    a = add_gaussian_noise(delta, 0.3, torch.Generator().manual_seed(7))
    b = add_gaussian_noise(delta, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a[K], b[K])
    assert float(a[K].std()) == pytest.approx(0.3, rel=0.02)
    assert abs(float(a[K].mean())) < 0.01
    assert torch.equal(delta[K], torch.zeros(200, 500))  # input untouched
    zero = add_gaussian_noise(delta, 0.0, torch.Generator())
    assert torch.equal(zero[K], delta[K])
    assert zero[K].data_ptr() != delta[K].data_ptr()
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(delta, -1.0, torch.Generator())


def test_sensitivity_formulas() -> None:
    assert sensitivity(2.0, [1.0] * 4) == pytest.approx(0.5)  # uniform: C / n
    assert sensitivity(2.0, [1.0, 3.0]) == pytest.approx(2.0 * 3.0 / 4.0)  # C max w / sum w
    assert robust_sensitivity(3.0, trimmed_window(5, 0.2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weights"):
        sensitivity(1.0, [])


def _clipped(gen: torch.Generator, n: int, c: float) -> list[StateDict]:
    return [clip_to_norm({K: torch.randn(4, 5, generator=gen) * 3}, c)[0] for _ in range(n)]


def test_zeroing_one_update_moves_the_aggregate_by_at_most_the_sensitivity() -> None:
    gen = torch.Generator().manual_seed(1)
    c = 1.0
    for trial in range(20):
        ds = _clipped(gen, 5, c)
        w = [float(x) for x in torch.rand(5, generator=gen) + 0.1]
        j = trial % 5
        zeroed = [*ds[:j], {K: torch.zeros(4, 5)}, *ds[j + 1 :]]

        def mean(xs: list[StateDict], w: list[float] = w) -> torch.Tensor:
            return sum(wi * x[K] for wi, x in zip(w, xs, strict=True)) / sum(w)  # type: ignore[return-value]

        assert float((mean(ds) - mean(zeroed)).norm()) <= sensitivity(c, w) + 1e-6
        tm = (coordinate_trimmed_mean(ds, 0.2)[K] - coordinate_trimmed_mean(zeroed, 0.2)[K]).norm()
        assert float(tm) <= robust_sensitivity(c, trimmed_window(5, 0.2)) + 1e-6
        md = (coordinate_median(ds)[K] - coordinate_median(zeroed)[K]).norm()
        assert float(md) <= robust_sensitivity(c, trimmed_window(5, 0.5)) + 1e-6


def test_aggregate_noise_std_uniform_and_weighted() -> None:
    glob = {K: torch.zeros(100, 100)}
    buf = [BufferedUpdate(f"u{i}", f"c{i}", {K: torch.zeros(100, 100)}, i + 1, 0) for i in range(4)]
    spec = AggregationSpec(
        dp_noise_multiplier=1.0, max_update_norm=2.0, weighting="uniform", staleness="constant"
    )
    out = aggregate(glob, buf, spec, generator=torch.Generator().manual_seed(0))
    assert out.noise_std == pytest.approx(1.0 * 2.0 / 4)
    assert float(out.applied_delta[K].std()) == pytest.approx(0.5, rel=0.03)
    weighted = aggregate(
        glob, buf, spec.model_copy(update={"weighting": "samples"}), generator=torch.Generator()
    )
    assert weighted.noise_std == pytest.approx(2.0 * 4 / (1 + 2 + 3 + 4))
    robust = aggregate(glob, buf, spec.model_copy(update={"robust": "median"}), generator=torch.Generator())
    assert robust.noise_std == pytest.approx(2.0 / 2)  # even n: mean of the two middle values
    assert aggregate(glob, buf, spec.model_copy(update={"dp_noise_multiplier": 0.0})).noise_std == 0.0


def test_aggregate_noise_is_reproducible_with_a_generator_and_needs_a_bound() -> None:
    glob = {K: torch.zeros(3, 3)}
    buf = [BufferedUpdate("u", "c", {K: torch.ones(3, 3)}, 1, 0)]
    spec = AggregationSpec(dp_noise_multiplier=0.5)
    a = aggregate(glob, buf, spec, generator=torch.Generator().manual_seed(3))
    b = aggregate(glob, buf, spec, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.new_global[K], b.new_global[K])
    assert not torch.equal(a.new_global[K], torch.ones(3, 3))
    with pytest.raises(ValueError, match="max_update_norm"):
        aggregate(glob, buf, spec.model_copy(update={"max_update_norm": None}))


def test_epsilon_closed_form_for_one_step() -> None:
    orders = (2.0, 4.0, 8.0, 16.0)
    acc = RdpAccountant(orders=orders)
    acc.step(1.5)
    delta = 1e-5
    expected = min(a / (2 * 1.5**2) + math.log(1 / delta) / (a - 1) for a in orders)
    assert acc.epsilon(delta) == pytest.approx(expected, rel=1e-12)
    eps, order = acc.epsilon_and_order(delta)
    assert order in orders
    assert eps == pytest.approx(expected)


def test_epsilon_monotone_in_noise_and_steps() -> None:
    def eps(sigma: float, steps: int) -> float:
        acc = RdpAccountant()
        acc.step(sigma, count=steps)
        return acc.epsilon(1e-5)

    assert eps(0.8, 10) > eps(1.0, 10) > eps(2.0, 10) > eps(4.0, 10)
    assert eps(1.0, 1) < eps(1.0, 10) < eps(1.0, 100)


def test_composition_count_and_edge_cases() -> None:
    one_by_one, batched = RdpAccountant(), RdpAccountant()
    for _ in range(3):
        one_by_one.step(1.1)
    batched.step(1.1, count=3)
    assert one_by_one.epsilon(1e-6) == pytest.approx(batched.epsilon(1e-6))
    assert one_by_one.steps == 3
    assert RdpAccountant().epsilon(1e-5) == 0.0  # nothing released yet
    no_noise = RdpAccountant()
    no_noise.step(0.0)
    assert no_noise.epsilon(1e-5) == math.inf
    with pytest.raises(ValueError, match="delta"):
        one_by_one.epsilon(0.0)
    with pytest.raises(ValueError, match="orders"):
        RdpAccountant(orders=(1.0, 2.0))


def test_accountant_serialization_round_trip() -> None:
    acc = RdpAccountant()
    acc.step(1.3, count=5)
    restored = RdpAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert restored.orders == DEFAULT_ORDERS
    assert restored.steps == 5
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    restored.step(1.3)
    acc.step(1.3)
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    inf = RdpAccountant()
    inf.step(0.0)
    text = json.dumps(inf.to_dict(), allow_nan=False)  # strict JSON
    assert RdpAccountant.from_dict(json.loads(text)).epsilon(1e-5) == math.inf


def test_noise_does_not_touch_frozen_ffa_keys() -> None:
    a_key = "m.q_proj.lora_A.weight"
    glob = {a_key: torch.ones(2, 4), K: torch.zeros(4, 2)}
    buf = [BufferedUpdate("u", "c", {K: torch.ones(4, 2)}, 1, 0)]
    out = aggregate(
        glob, buf, AggregationSpec(lora_mode="ffa", dp_noise_multiplier=1.0), generator=torch.Generator()
    )
    assert torch.equal(out.new_global[a_key], glob[a_key])
    assert l2_norm(out.applied_delta) > 0
