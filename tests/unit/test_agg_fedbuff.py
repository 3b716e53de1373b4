"""FedBuff aggregation and the update buffer."""

from __future__ import annotations

import math

import pytest
import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.fedbuff import BufferedUpdate, UpdateBuffer, aggregate
from services.aggregator.math.robust import l2_norm
from services.aggregator.math.server_optimizer import ServerOptState

P = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"
SHAPES = {P.format(i, m, "A"): (4, 16) for i in range(2) for m in "qv"} | {
    P.format(i, m, "B"): (16, 4) for i in range(2) for m in "qv"
}
PLAIN = AggregationSpec(max_update_norm=None, allow_unbounded_norm=True, weighting="samples")


def rand_state(gen: torch.Generator, scale: float = 1.0) -> StateDict:
    return {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}


def updates(gen: torch.Generator, specs: list[tuple[int, int]], scale: float = 1.0) -> list[BufferedUpdate]:
    """One update per (num_samples, staleness)."""
    return [BufferedUpdate(f"u{i}", f"c{i}", rand_state(gen, scale), n, t) for i, (n, t) in enumerate(specs)]


def test_weighted_average_matches_hand_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    g0 = rand_state(gen)
    buf = updates(gen, [(10, 0), (30, 1), (5, 3), (50, 8)])
    spec = PLAIN.model_copy(update={"server_lr": 0.8})
    out = aggregate(g0, buf, spec)
    raw = [(1 + u.staleness) ** -0.5 * u.num_samples for u in buf]
    n_total = sum(u.num_samples for u in buf)  # normalized by samples: the staleness discount is absolute
    assert out.weights == pytest.approx({u.update_id: w / n_total for u, w in zip(buf, raw, strict=True)})
    assert out.staleness_weights["u3"] == pytest.approx(1 / 3)
    for k in SHAPES:
        avg = sum(w * u.delta[k].double() for w, u in zip(raw, buf, strict=True)) / n_total
        assert isinstance(avg, torch.Tensor)
        torch.testing.assert_close(out.new_global[k].double(), g0[k].double() + 0.8 * avg, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.pseudo_gradient[k].double(), avg, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.applied_delta[k], 0.8 * out.pseudo_gradient[k])
        assert out.new_global[k].dtype == torch.float32
    assert out.clipped == []
    assert out.noise_std == 0.0
    assert out.opt_state.step == 1


@pytest.mark.parametrize("tau", [0, 5])
def test_single_update_is_fedasync(tau: int) -> None:
    """K = 1: global += lr * s(tau) * delta (FedAsync's mixing), so staleness discounts even alone."""
    gen = torch.Generator().manual_seed(1)
    g0 = rand_state(gen)
    (u,) = updates(gen, [(7, tau)])
    out = aggregate(g0, [u], PLAIN.model_copy(update={"server_lr": 0.6}))
    s = 1 / math.sqrt(1 + tau)
    assert out.weights == {"u0": pytest.approx(s)}
    assert out.staleness_weights["u0"] == pytest.approx(s)
    for k in SHAPES:
        torch.testing.assert_close(out.pseudo_gradient[k], s * u.delta[k])
        torch.testing.assert_close(out.new_global[k], g0[k] + 0.6 * s * u.delta[k])


def test_staleness_discounts_older_updates() -> None:
    g0 = {k: torch.zeros(s) for k, s in SHAPES.items()}
    up = {k: torch.ones(s) for k, s in SHAPES.items()}
    down = {k: -torch.ones(s) for k, s in SHAPES.items()}
    buf = [BufferedUpdate("fresh", "a", up, 10, 0), BufferedUpdate("stale", "b", down, 10, 8)]
    out = aggregate(g0, buf, PLAIN)
    assert out.weights["fresh"] == pytest.approx(1 / 2)  # s=1, n=10 of 20
    assert out.weights["stale"] == pytest.approx(1 / 6)  # s=1/3
    assert all(bool((v > 0).all()) for v in out.new_global.values())
    flat = aggregate(g0, buf, PLAIN.model_copy(update={"staleness": "constant"}))
    assert all(bool((v == 0).all()) for v in flat.new_global.values())


def test_sample_vs_uniform_weighting() -> None:
    g0 = {k: torch.zeros(s) for k, s in SHAPES.items()}
    one = {k: torch.ones(s) for k, s in SHAPES.items()}
    zero = {k: torch.zeros(s) for k, s in SHAPES.items()}
    buf = [BufferedUpdate("big", "a", one, 30, 0), BufferedUpdate("small", "b", zero, 10, 0)]
    by_samples = aggregate(g0, buf, PLAIN)
    uniform = aggregate(g0, buf, PLAIN.model_copy(update={"weighting": "uniform"}))
    k = next(iter(SHAPES))
    assert float(by_samples.new_global[k][0, 0]) == pytest.approx(0.75)
    assert float(uniform.new_global[k][0, 0]) == pytest.approx(0.5)


def test_clipping_bounds_each_update() -> None:
    gen = torch.Generator().manual_seed(2)
    g0 = rand_state(gen)
    big = BufferedUpdate("big", "x", rand_state(gen, 50.0), 1, 0)
    buf = [*updates(gen, [(1, 0), (1, 0)], scale=0.01), big]
    spec = AggregationSpec(max_update_norm=2.0, staleness="constant", weighting="uniform")
    out = aggregate(g0, buf, spec)
    assert out.clipped == ["big"]
    assert out.norms["big"] == pytest.approx(l2_norm(buf[2].delta))
    assert out.norms["big"] > 2.0
    # the big update can move the mean by at most 2 / 3 (plus the two tiny ones)
    assert l2_norm(out.applied_delta) <= 2.0 / 3 + 0.02
    assert l2_norm(out.applied_delta) == pytest.approx(2.0 / 3, abs=0.02)


@pytest.mark.parametrize("robust", ["trimmed_mean", "median"])
def test_robust_options_resist_a_poisoned_update(robust: str) -> None:
    gen = torch.Generator().manual_seed(3)
    g0 = rand_state(gen)
    target = rand_state(gen)
    clean = [
        BufferedUpdate(
            f"c{i}",
            f"c{i}",
            {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in target.items()},
            10,
            0,
        )
        for i in range(6)
    ]
    poison = BufferedUpdate("evil", "evil", {k: v * 100.0 for k, v in clean[0].delta.items()}, 10, 0)
    spec = AggregationSpec(
        robust=robust, trim_ratio=0.2, buffer_size=7, max_update_norm=None, allow_unbounded_norm=True
    )
    out = aggregate(g0, [*clean, poison], spec)
    assert out.weights == pytest.approx({u: 1 / 7 for u in out.weights})
    for k in SHAPES:
        stack = torch.stack([u.delta[k] for u in clean])
        moved = out.new_global[k] - g0[k]
        assert bool((moved >= stack.min(0).values - 1e-5).all())
        assert bool((moved <= stack.max(0).values + 1e-5).all())
    naive = aggregate(g0, [*clean, poison], PLAIN)
    err = l2_norm({k: out.applied_delta[k] - target[k] for k in SHAPES})
    naive_err = l2_norm({k: naive.applied_delta[k] - target[k] for k in SHAPES})
    assert err < 0.05 * naive_err


def test_inputs_are_not_mutated() -> None:
    gen = torch.Generator().manual_seed(4)
    g0 = rand_state(gen)
    buf = updates(gen, [(3, 0), (4, 2)], scale=100.0)
    g_copy = {k: v.clone() for k, v in g0.items()}
    d_copies = [{k: v.clone() for k, v in u.delta.items()} for u in buf]
    spec = AggregationSpec(server_optimizer="momentum", dp_noise_multiplier=1.0, max_update_norm=1.0)
    first = aggregate(g0, buf, spec, generator=torch.Generator().manual_seed(0))
    m_copy = {k: v.clone() for k, v in first.opt_state.buffers["m"].items()}
    second = aggregate(
        first.new_global, buf, spec, first.opt_state, generator=torch.Generator().manual_seed(1)
    )
    for k in SHAPES:
        assert torch.equal(g0[k], g_copy[k])
        assert first.new_global[k].data_ptr() != g0[k].data_ptr()
        assert torch.equal(first.opt_state.buffers["m"][k], m_copy[k])
        for u, c in zip(buf, d_copies, strict=True):
            assert torch.equal(u.delta[k], c[k])
    assert second.opt_state.step == 2


def test_key_absent_from_a_delta_counts_as_zero_and_untouched_keys_are_copied() -> None:
    ka, kb = P.format(0, "q", "A"), P.format(0, "q", "B")
    g0 = {ka: torch.zeros(4, 16, dtype=torch.float64), kb: torch.zeros(16, 4)}
    buf = [BufferedUpdate("a", "a", {kb: torch.ones(16, 4)}, 1, 0), BufferedUpdate("b", "b", {}, 1, 0)]
    out = aggregate(g0, buf, PLAIN.model_copy(update={"staleness": "constant"}))
    assert torch.equal(out.new_global[kb], torch.full((16, 4), 0.5))
    assert set(out.applied_delta) == {kb}
    assert torch.equal(out.new_global[ka], torch.zeros(4, 16))
    assert out.new_global[ka].dtype == torch.float32


def test_guards_raise() -> None:
    gen = torch.Generator().manual_seed(5)
    g0 = rand_state(gen)
    k = next(iter(SHAPES))
    with pytest.raises(ValueError, match="empty"):
        aggregate(g0, [], PLAIN)
    with pytest.raises(ValueError, match="not in the global"):
        aggregate(g0, [BufferedUpdate("u", "c", {"unknown.lora_B.weight": torch.zeros(1)}, 1, 0)], PLAIN)
    with pytest.raises(ValueError, match="shape"):
        aggregate(g0, [BufferedUpdate("u", "c", {k: torch.zeros(5, 5)}, 1, 0)], PLAIN)
    u = BufferedUpdate("u", "c", {k: torch.zeros(SHAPES[k])}, 1, 0)
    with pytest.raises(ValueError, match="twice"):
        aggregate(g0, [u, u], PLAIN)
    with pytest.raises(ValueError, match="non-finite"):
        aggregate(g0, [BufferedUpdate("u", "c", {k: torch.full(SHAPES[k], math.nan)}, 1, 0)], PLAIN)
    with pytest.raises(ValueError, match="num_samples"):
        BufferedUpdate("u", "c", {}, 0, 0)
    with pytest.raises(ValueError, match="staleness"):
        BufferedUpdate("u", "c", {}, 1, -1)


def test_server_momentum_through_aggregate() -> None:
    gen = torch.Generator().manual_seed(6)
    g = rand_state(gen)
    spec = PLAIN.model_copy(update={"server_optimizer": "momentum", "momentum": 0.5})
    state: ServerOptState | None = None
    deltas = []
    for _ in range(3):
        (u,) = updates(gen, [(1, 0)])
        deltas.append(u.delta)
        res = aggregate(g, [u], spec, state)
        g, state = res.new_global, res.opt_state
    k = next(iter(SHAPES))
    m = deltas[0][k]
    for d in deltas[1:]:
        m = 0.5 * m + d[k]
    torch.testing.assert_close(res.applied_delta[k], m)
    assert state is not None
    assert state.step == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _u(i: int, client: str | None = None) -> BufferedUpdate:
    return BufferedUpdate(f"u{i}", client or f"c{i}", {}, 1, 0)


def test_update_buffer_flushes_at_k() -> None:
    buf = UpdateBuffer(3, 10.0, clock=FakeClock())
    assert not buf.add(_u(0))
    assert not buf.add(_u(1))
    assert buf.add(_u(2))
    assert len(buf) == 3
    assert buf.contains("u1")
    assert not buf.contains("u9")
    with pytest.raises(ValueError, match="already buffered"):
        buf.add(_u(1))
    assert [u.update_id for u in buf.take()] == ["u0", "u1", "u2"]
    assert len(buf) == 0
    assert buf.take() == []


def test_update_buffer_timeout_uses_the_oldest_entry() -> None:
    clock = FakeClock()
    buf = UpdateBuffer(4, 10.0, clock=clock)
    assert not buf.due()
    assert buf.deadline() is None
    buf.add(_u(0))
    clock.now += 6
    buf.add(_u(1))
    assert buf.deadline() == pytest.approx(110.0)
    assert not buf.due()
    clock.now += 4
    assert buf.due()
    assert not buf.due(now=105.0)
    assert buf.due(now=200.0)
    buf.clear()
    assert not buf.due()
    assert len(buf) == 0
    k1 = UpdateBuffer(1, 1.0, clock=clock)
    assert k1.add(_u(0))  # K = 1: FedAsync flushes on every update
    with pytest.raises(ValueError, match="buffer_size"):
        UpdateBuffer(0, 1.0)
