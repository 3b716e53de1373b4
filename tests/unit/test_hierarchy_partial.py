"""Partial aggregates (issue 15): leaves' partials folded by a root equal single-aggregator FedBuff.

Every comparison is against a float64 reference of FedBuff's formula computed here, with a stated
tolerance: the hierarchical and the single result may differ only by float32 summation order.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.hierarchy.partial import (
    Accumulation,
    Partial,
    PartialBuilder,
    aggregate_partials,
    stale_bases,
)
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate, effective_samples
from services.aggregator.math.server_optimizer import ServerOptState

P = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"
SHAPES = {P.format(i, m, "A"): (4, 16) for i in range(2) for m in "qv"} | {
    P.format(i, m, "B"): (16, 4) for i in range(2) for m in "qv"
}
# float32 sums of <= 40 terms of magnitude <= ~1: relative error ~1e-6; compared with a 1e-5 margin.
ATOL, RTOL = 2e-5, 1e-5


def rand_state(gen: torch.Generator, scale: float = 1.0) -> StateDict:
    return {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}


def make_updates(seed: int, n: int, bases: list[int]) -> list[tuple[str, str, int, int, StateDict]]:
    """(update id, client id, base version, claimed samples, delta); some deltas far beyond the clip bound."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        scale = rng.choice([0.01, 0.1, 5.0])
        out.append((f"u{i}", f"c{i}", rng.choice(bases), rng.randint(1, 4000), rand_state(gen, scale)))
    return out


def reference(
    global_state: StateDict,
    updates: list[tuple[str, str, int, int, StateDict]],
    spec: AggregationSpec,
    lineage: dict[int, int],
) -> StateDict:
    """FedBuff in float64, written out: global + η · Σ s(τ_i) n_i clip(P(Δ_i)) / Σ n_i (no optimizer)."""
    total = 0.0
    acc = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    for _, _, base, samples, delta in updates:
        d = {k: v.to(torch.float64) for k, v in delta.items() if spec.lora_mode == "fedit" or "lora_B" in k}
        norm = math.sqrt(sum(float((v * v).sum()) for v in d.values()))
        clip = 1.0 if spec.max_update_norm is None else min(1.0, spec.max_update_norm / norm)
        n = 1 if spec.weighting == "uniform" else min(samples, spec.max_num_samples)
        s = (1.0 + lineage[base]) ** -spec.staleness_a
        total += n
        for k, v in d.items():
            acc[k] += s * n * clip * v
    return {k: global_state[k].to(torch.float64) + spec.server_lr * acc[k] / total for k in SHAPES}


def leaves_fold(
    updates: list[tuple[str, str, int, int, StateDict]], spec: AggregationSpec, leaves: int, per_partial: int
) -> Accumulation:
    """Updates spread over ``leaves`` (by client), each leaf emitting partials of <= ``per_partial``."""
    partials: list[Partial] = []
    for leaf in range(leaves):
        builder = PartialBuilder(spec, SHAPES)
        for uid, cid, base, samples, delta in updates[leaf::leaves]:
            builder.add(uid, cid, base, samples, delta)
            if len(builder) >= per_partial:
                partials.append(builder.build("fed", f"p{len(partials)}", "fp"))
        if len(builder):
            partials.append(builder.build("fed", f"p{len(partials)}", "fp"))
    acc = Accumulation()
    for partial in reversed(partials):  # another order than the updates': only the float sums move
        acc.fold(partial)
    return acc


def single(
    global_state: StateDict,
    updates: list[tuple[str, str, int, int, StateDict]],
    spec: AggregationSpec,
    lineage: dict[int, int],
) -> StateDict:
    buffer = [BufferedUpdate(u, c, d, n, lineage[b]) for u, c, b, n, d in updates]
    return aggregate(global_state, buffer, spec).new_global


def close(a: StateDict, b: StateDict) -> bool:
    return all(
        torch.allclose(a[k].to(torch.float64), b[k].to(torch.float64), atol=ATOL, rtol=RTOL) for k in a
    )


@pytest.mark.parametrize(
    "spec",
    [
        AggregationSpec(buffer_size=24, weighting="samples", max_num_samples=1024, max_update_norm=1.0),
        AggregationSpec(buffer_size=24, weighting="uniform", max_update_norm=2.0, server_lr=0.7),
        AggregationSpec(buffer_size=24, weighting="samples", lora_mode="ffa", max_update_norm=1.5),
    ],
    ids=["samples", "uniform", "ffa"],
)
def test_partials_equal_single_fedbuff_on_the_same_updates(spec: AggregationSpec) -> None:
    gen = torch.Generator().manual_seed(1)
    g0 = rand_state(gen)
    lineage = {9: 0, 8: 1, 7: 2, 5: 3, 2: 4}  # several base versions: several staleness weights
    updates = make_updates(7, 24, list(lineage))
    ref = reference(g0, updates, spec, lineage)
    hier = aggregate_partials(g0, leaves_fold(updates, spec, leaves=3, per_partial=4), spec, lineage)
    flat = single(g0, updates, spec, lineage)
    assert close(hier.new_global, ref)
    assert close(flat, ref)
    # Not vacuous: a wrong staleness (every update fresh) is far outside the tolerance.
    fresh = reference(g0, updates, spec, dict.fromkeys(lineage, 0))
    assert not close(hier.new_global, fresh)
    # Weights are the single aggregator's, update by update.
    buffer = [BufferedUpdate(u, c, d, n, lineage[b]) for u, c, b, n, d in updates]
    assert hier.weights == pytest.approx(aggregate(g0, buffer, spec).weights)
    assert sorted(hier.clipped) == sorted(aggregate(g0, buffer, spec).clipped)


def test_staleness_is_applied_at_the_root_against_the_version_it_has_then() -> None:
    """A partial built while v3 was latest and folded after two more versions: its updates are discounted
    with τ along the root's lineage at the fold, as single FedBuff discounts an update buffered then."""
    spec = AggregationSpec(buffer_size=8, weighting="samples", max_update_norm=1.0)
    gen = torch.Generator().manual_seed(3)
    g0 = rand_state(gen)
    updates = make_updates(11, 8, [3, 2])
    acc = leaves_fold(updates, spec, leaves=2, per_partial=3)
    before = {3: 0, 2: 1}
    after = {5: 0, 4: 1, 3: 2, 2: 3}
    early = aggregate_partials(g0, acc, spec, before)
    late = aggregate_partials(g0, acc, spec, after)
    assert close(early.new_global, reference(g0, updates, spec, before))
    assert close(late.new_global, reference(g0, updates, spec, after))
    assert close(late.new_global, single(g0, updates, spec, after))
    assert not close(early.new_global, late.new_global)
    assert stale_bases(acc.groups, {5: 0, 4: 1, 3: 2}) == [2]
    with pytest.raises(ValueError, match="not on the lineage"):
        aggregate_partials(g0, acc, spec, {5: 0, 4: 1, 3: 2})


def test_dp_noise_is_added_once_with_single_fedbuffs_std_and_stream() -> None:
    spec = AggregationSpec(buffer_size=6, weighting="samples", max_update_norm=1.0, dp_noise_multiplier=0.8)
    gen = torch.Generator().manual_seed(5)
    g0 = rand_state(gen)
    lineage = {4: 0, 3: 1, 1: 2}
    updates = make_updates(13, 6, list(lineage))
    acc = leaves_fold(updates, spec, leaves=2, per_partial=2)
    hier = aggregate_partials(g0, acc, spec, lineage, generator=torch.Generator().manual_seed(42))
    buffer = [BufferedUpdate(u, c, d, n, lineage[b]) for u, c, b, n, d in updates]
    flat = aggregate(g0, buffer, spec, generator=torch.Generator().manual_seed(42))
    assert hier.noise_std == pytest.approx(flat.noise_std, rel=1e-12)
    assert hier.noise_std > 0
    assert close(hier.new_global, flat.new_global)  # same noise draws: equal up to summation order


def test_server_optimizer_state_carries_over_like_single() -> None:
    spec = AggregationSpec(buffer_size=5, server_optimizer="adam", max_update_norm=1.0, server_lr=0.1)
    gen = torch.Generator().manual_seed(8)
    g0 = rand_state(gen)
    lineage = {0: 0}
    updates = make_updates(17, 5, [0])
    hier = aggregate_partials(g0, leaves_fold(updates, spec, 2, 2), spec, lineage, ServerOptState())
    buffer = [BufferedUpdate(u, c, d, n, 0) for u, c, b, n, d in updates]
    flat = aggregate(g0, buffer, spec, ServerOptState())
    assert close(hier.new_global, flat.new_global)
    assert hier.opt_state.kind == flat.opt_state.kind == "adam"


def test_builder_refuses_duplicates_foreign_keys_and_non_finite_deltas_without_changing() -> None:
    spec = AggregationSpec(max_update_norm=1.0)
    builder = PartialBuilder(spec, SHAPES)
    gen = torch.Generator().manual_seed(0)
    builder.add("u1", "c1", 0, 3, rand_state(gen))
    with pytest.raises(ValueError, match="already"):
        builder.add("u1", "c1", 0, 3, rand_state(gen))
    with pytest.raises(ValueError, match="does not fit"):
        builder.add("u2", "c2", 0, 3, {"other.weight": torch.zeros(2)})
    bad = rand_state(gen)
    next(iter(bad.values()))[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        builder.add("u3", "c3", 0, 3, bad)
    assert len(builder) == 1
    partial = builder.build("fed", "p", "fp")
    assert partial.count == 1
    assert len(builder) == 0
    assert partial.groups[0].samples == effective_samples(3, spec) == 1


def test_empty_accumulation_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        aggregate_partials(
            rand_state(torch.Generator().manual_seed(0)), Accumulation(), AggregationSpec(), {0: 0}
        )


@pytest.mark.parametrize("robust", ["trimmed_mean", "median"])
def test_spec_refuses_robust_combiners_with_the_hierarchy(robust: str) -> None:
    with pytest.raises(ValidationError, match="hierarchical"):
        AggregationSpec(buffer_size=8, robust=robust, topology="hierarchical")
    assert AggregationSpec(buffer_size=8, robust=robust).topology == "single"
    assert AggregationSpec(topology="hierarchical", dp_noise_multiplier=1.0).topology == "hierarchical"
