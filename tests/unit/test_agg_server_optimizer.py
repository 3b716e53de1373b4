"""Server optimizers (FedAvg / FedAvgM / FedAdam) and the persistence of their state."""

from __future__ import annotations

import pytest
import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.server_optimizer import ServerOptState, apply_server_update

KA, KB = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def make_global(gen: torch.Generator) -> StateDict:
    return {KA: torch.randn(4, 6, generator=gen), KB: torch.randn(6, 4, generator=gen)}


def deltas(gen: torch.Generator, n: int) -> list[StateDict]:
    return [{KA: torch.randn(4, 6, generator=gen), KB: torch.randn(6, 4, generator=gen)} for _ in range(n)]


def run(spec: AggregationSpec, g: StateDict, ds: list[StateDict]) -> tuple[StateDict, ServerOptState]:
    state = None
    for d in ds:
        g, _, state = apply_server_update(g, d, spec, state)
    assert state is not None
    return g, state


def test_none_is_plain_lr_step() -> None:
    gen = torch.Generator().manual_seed(0)
    g0, (d,) = make_global(gen), deltas(gen, 1)
    new, step, state = apply_server_update(g0, d, AggregationSpec(server_lr=0.5))
    for k in g0:
        torch.testing.assert_close(new[k], g0[k] + 0.5 * d[k])
        torch.testing.assert_close(step[k], 0.5 * d[k])
    assert state.kind == "none"
    assert state.step == 1
    assert state.buffers == {}


def test_momentum_matches_reference_over_three_steps() -> None:
    gen = torch.Generator().manual_seed(1)
    g0, ds = make_global(gen), deltas(gen, 3)
    spec = AggregationSpec(server_optimizer="momentum", momentum=0.8, server_lr=0.7)
    got, state = run(spec, g0, ds)
    for k in g0:
        x, m = g0[k].double(), torch.zeros_like(g0[k], dtype=torch.float64)
        for d in ds:
            m = 0.8 * m + d[k].double()
            x = x + 0.7 * m
        torch.testing.assert_close(got[k], x.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.buffers["m"][k], m.float(), rtol=1e-5, atol=1e-6)
    assert state.step == 3


def test_adam_matches_reference_over_three_steps() -> None:
    gen = torch.Generator().manual_seed(2)
    g0, ds = make_global(gen), deltas(gen, 3)
    spec = AggregationSpec(
        server_optimizer="adam", adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-3, server_lr=0.1
    )
    got, state = run(spec, g0, ds)
    for k in g0:
        x = g0[k].double()
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        for d in ds:
            dd = d[k].double()
            m = 0.9 * m + 0.1 * dd
            v = 0.99 * v + 0.01 * dd * dd
            x = x + 0.1 * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(got[k], x.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.buffers["v"][k], v.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["none", "momentum", "adam"])
def test_keys_absent_from_delta_are_untouched(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    g0, (d1, d2) = make_global(gen), deltas(gen, 2)
    spec = AggregationSpec(server_optimizer=kind)
    g1, step, s1 = apply_server_update(g0, d1, spec)
    g2, step, s2 = apply_server_update(g1, {KB: d2[KB]}, spec, s1)  # FFA-like: no lora_A
    assert torch.equal(g2[KA], g1[KA])
    assert set(step) == {KB}
    for name in s1.buffers:  # moment of the absent key is carried over unchanged
        assert torch.equal(s2.buffers[name][KA], s1.buffers[name][KA])


def test_inputs_are_not_mutated_and_outputs_are_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    g0 = {k: v.double() for k, v in make_global(gen).items()}
    ds = deltas(gen, 2)
    spec = AggregationSpec(server_optimizer="adam")
    g1, _, s1 = apply_server_update(g0, ds[0], spec)
    copies = (
        {k: v.clone() for k, v in g1.items()},
        {n: {k: v.clone() for k, v in b.items()} for n, b in s1.buffers.items()},
    )
    g0_copy = {k: v.clone() for k, v in g0.items()}
    d_copy = {k: v.clone() for k, v in ds[1].items()}
    g2, _, _ = apply_server_update(g1, ds[1], spec, s1)
    assert all(v.dtype == torch.float32 for v in g2.values())
    for k in g0:
        assert torch.equal(g0[k], g0_copy[k])
        assert torch.equal(ds[1][k], d_copy[k])
        assert torch.equal(g1[k], copies[0][k])
        for n in s1.buffers:
            assert torch.equal(s1.buffers[n][k], copies[1][n][k])


def test_state_serialization_round_trip_and_resume() -> None:
    gen = torch.Generator().manual_seed(5)
    g0, ds = make_global(gen), deltas(gen, 3)
    spec = AggregationSpec(server_optimizer="adam")
    g2, state = run(spec, g0, ds[:2])
    flat = state.to_tensors()
    assert {f"m::{KA}", f"v::{KB}", "meta::step", "meta::kind"} <= set(flat)
    restored = ServerOptState.from_tensors(flat)
    assert restored.kind == "adam"
    assert restored.step == 2
    for name in ("m", "v"):
        for k in g0:
            assert torch.equal(restored.buffers[name][k], state.buffers[name][k])
    a, _, _ = apply_server_update(g2, ds[2], spec, state)
    b, _, _ = apply_server_update(g2, ds[2], spec, restored)
    for k in g0:
        assert torch.equal(a[k], b[k])


def test_state_survives_safetensors() -> None:
    st = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(6)
    _, state = run(AggregationSpec(server_optimizer="momentum"), make_global(gen), deltas(gen, 2))
    restored = ServerOptState.from_tensors(st.load(st.save(state.to_tensors())))
    assert restored.kind == "momentum"
    assert restored.step == 2
    assert torch.equal(restored.buffers["m"][KA], state.buffers["m"][KA])


def test_changed_optimizer_kind_discards_old_state() -> None:
    gen = torch.Generator().manual_seed(7)
    g0, (d1, d2) = make_global(gen), deltas(gen, 2)
    _, _, s1 = apply_server_update(g0, d1, AggregationSpec(server_optimizer="momentum"))
    spec = AggregationSpec(server_optimizer="adam")
    fresh, _, s_fresh = apply_server_update(g0, d2, spec)
    switched, _, s_switched = apply_server_update(g0, d2, spec, s1)
    assert s_switched.step == 1 == s_fresh.step
    for k in g0:
        assert torch.equal(fresh[k], switched[k])


def test_bad_inputs_raise() -> None:
    g = {KA: torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="not in the global"):
        apply_server_update(g, {KB: torch.zeros(2, 2)}, AggregationSpec())
    with pytest.raises(ValueError, match="shape"):
        apply_server_update(g, {KA: torch.zeros(2, 3)}, AggregationSpec())
    with pytest.raises(ValueError, match="not a serialized"):
        ServerOptState.from_tensors({"m::x": torch.zeros(1)})
