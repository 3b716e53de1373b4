"""The strategy registry (combiners, server optimizers, the DP wrapper) and FedYogi (Reddi et al. 2021)."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.bounds import influence_bound
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.server_optimizer import ServerOptState, apply_server_update
from services.aggregator.math.strategies import (
    COMBINERS,
    SERVER_OPTIMIZERS,
    GaussianDP,
    check_spec,
    combiner_for,
    get_combiner,
    get_server_optimizer,
)
from services.aggregator.math.strategies.gaussian_dp import account

KA, KB = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def spec_names(field: str) -> set[str]:
    return set(typing.get_args(AggregationSpec.model_fields[field].annotation))


def test_registry_and_spec_name_the_same_strategies() -> None:
    assert set(COMBINERS) == spec_names("robust")
    assert set(SERVER_OPTIMIZERS) == spec_names("server_optimizer")
    for name, combiner in COMBINERS.items():
        assert combiner.name == name
    for name, optimizer in SERVER_OPTIMIZERS.items():
        assert optimizer.name == name


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown combiner.*'median'"):
        get_combiner("krum")
    with pytest.raises(ValueError, match=r"unknown server optimizer kind.*'yogi'"):
        get_server_optimizer("lamb")
    flat = ServerOptState(kind="adam").to_tensors()
    flat["meta::kind"] = torch.tensor(list(b"lamb"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown server optimizer kind 'lamb'"):
        ServerOptState.from_tensors(flat)


def test_check_spec_restates_the_combiners_needs() -> None:
    for robust in COMBINERS:
        check_spec(AggregationSpec(robust=robust))  # type: ignore[arg-type]
    # model_construct skips the schema's validators: the combiners' own checks still refuse
    with pytest.raises(ValueError, match="needs buffer_size >= 3"):
        check_spec(AggregationSpec.model_construct(robust="median", buffer_size=2))
    with pytest.raises(ValueError, match="trims nothing"):
        check_spec(AggregationSpec.model_construct(robust="trimmed_mean", buffer_size=3, trim_ratio=0.25))
    with pytest.raises(ValueError, match="max_update_norm"):
        check_spec(AggregationSpec.model_construct(max_update_norm=None, dp_noise_multiplier=1.0))


def test_dp_wraps_any_combiner_with_its_own_sensitivity() -> None:
    for robust, inner in COMBINERS.items():
        spec = AggregationSpec(robust=robust, dp_noise_multiplier=2.0, max_update_norm=3.0, buffer_size=5)  # type: ignore[arg-type]
        wrapped = combiner_for(spec)
        assert isinstance(wrapped, GaussianDP)
        assert wrapped.inner is inner
        raw = [1.0, 0.5, 1.0, 0.25, 1.0]
        assert wrapped.sensitivity(spec, 3.0, raw, 5.0) == inner.sensitivity(spec, 3.0, raw, 5.0)
        assert wrapped.influence(spec, 5, 3.0) == inner.influence(spec, 5, 3.0)
    assert combiner_for(AggregationSpec()) is COMBINERS["none"]
    assert COMBINERS["median"].sensitivity(AggregationSpec(robust="median"), 3.0, [1.0] * 4, 4.0) == 1.5
    acc = RdpAccountant()
    same, eps = account(acc, AggregationSpec())
    assert same is acc
    assert eps is None
    spent, eps = account(acc, AggregationSpec(dp_noise_multiplier=1.0))
    assert spent is not acc
    assert acc.steps == 0
    assert spent.steps == 1
    assert eps is not None
    assert eps > 0


def make_global(gen: torch.Generator) -> StateDict:
    return {KA: torch.randn(4, 6, generator=gen), KB: torch.randn(6, 4, generator=gen)}


def test_yogi_matches_reference_over_three_steps() -> None:
    gen = torch.Generator().manual_seed(11)
    g0 = make_global(gen)
    ds = [{k: torch.randn(v.shape, generator=gen) * s for k, v in g0.items()} for s in (1.0, 0.1, 2.0)]
    spec = AggregationSpec(
        server_optimizer="yogi", adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-3, server_lr=0.1
    )
    g, state = g0, None
    for d in ds:
        g, _, state = apply_server_update(g, d, spec, state)
    assert state is not None
    assert state.kind == "yogi"
    assert state.step == 3
    for k in g0:
        x = g0[k].double()
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        for d in ds:
            dd = d[k].double()
            m = 0.9 * m + 0.1 * dd
            v = v - 0.01 * dd * dd * torch.sign(v - dd * dd)  # Reddi et al. 2021, Alg. 2 (FedYogi)
            x = x + 0.1 * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(g[k], x.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.buffers["v"][k], v.float(), rtol=1e-5, atol=1e-7)
        assert bool((state.buffers["v"][k] >= 0).all())


def test_yogi_forgets_additively_where_adam_forgets_multiplicatively() -> None:
    g0 = {KB: torch.zeros(3)}
    big, small = {KB: torch.full((3,), 10.0)}, {KB: torch.full((3,), 0.1)}
    moments = {}
    for kind in ("adam", "yogi"):
        spec = AggregationSpec(server_optimizer=kind, adam_beta2=0.5)  # type: ignore[arg-type]
        _, _, s1 = apply_server_update(g0, big, spec)
        _, _, s2 = apply_server_update(g0, small, spec, s1)
        moments[kind] = (s1.buffers["v"][KB][0].item(), s2.buffers["v"][KB][0].item())
    assert moments["adam"][0] == pytest.approx(50.0) == moments["yogi"][0]  # the first step is Adam's
    assert moments["adam"][1] == pytest.approx(0.5 * 50.0 + 0.5 * 0.01)  # halved at once
    assert moments["yogi"][1] == pytest.approx(50.0 - 0.5 * 0.01)  # decreases by (1-β2)·Δ² only


def test_yogi_state_round_trip_bound_and_aggregate() -> None:
    gen = torch.Generator().manual_seed(12)
    g0 = make_global(gen)
    spec = AggregationSpec(server_optimizer="yogi", buffer_size=2)
    buffer = [
        BufferedUpdate(
            f"u{i}", f"c{i}", {k: torch.randn(v.shape, generator=gen) for k, v in g0.items()}, 1, 0
        )
        for i in range(2)
    ]
    result = aggregate(g0, buffer, spec)
    assert result.opt_state.kind == "yogi"
    assert set(result.opt_state.buffers) == {"m", "v"}
    restored = ServerOptState.from_tensors(result.opt_state.to_tensors())
    again = aggregate(result.new_global, buffer, spec, restored)
    direct = aggregate(result.new_global, buffer, spec, result.opt_state)
    for k in g0:
        assert torch.equal(again.new_global[k], direct.new_global[k])
    assert influence_bound(spec) == math.inf  # per-coordinate division: no L2 bound in terms of C
    check_spec(spec)
