"""Poisoned updates (signed, valid, 100x the honest L2 norm) under robust aggregation, end to end.

Design (``services/aggregator/math/fedbuff.py``): with ``norm_policy="clip"`` an over-norm update is *not*
rejected; every delta is clipped to ``C = max_update_norm`` before the merge, and the server step is
``η · agg(clipped deltas)`` (``server_optimizer="none"``, η = ``server_lr``). The bounds this gives, per
version:

* ``robust="none"`` (weighted mean, weights ``s(τ)·n_i / Σ n <= n_i / Σ n``; uniform by default):
  ``||Δ|| <= η·C``;
* ``robust="median"`` / ``"trimmed_mean"`` over n deltas, trimming k per side and averaging a window of m:
  each coordinate ``v`` satisfies ``v² <= (1/m)·Σ_i x_i²`` (mean of the window) and ``v² <= Σ_i x_i² / (k+1)``
  (k+1 values are at least as far from 0), so ``||Δ|| <= η·C·sqrt(n / max(m, k+1))`` (median of 5: 1.29·η·C);
* and with an honest majority inside the trimmed window (f poisoned <= k), every coordinate stays between the
  smallest and largest *honest* value: the poison cannot push the global outside the honest envelope, however
  large its norm.

The test sends, per version, 3 honest + 2 poisoned updates to federations with median and trimmed mean
(and one with clipping only), checks each version's movement against those bounds (and that the service
computed exactly what :func:`aggregate` computes), and checks that without clipping and robust aggregation the
same buffers would have moved the global far more than the bound (so the assertions can fail).

Issue 12 (server-side weighting, poison-proof flush), each against the real stack:

* three honest updates + one attacker (norm 100, ``num_samples = 2**53``) under the default weighting: the
  attacker moves the global by no more than ``influence_bound(spec, 4)`` (what replacing its update by a zero
  delta would change; :mod:`services.aggregator.math.bounds`), while the old defaults would have made the
  global its delta;
* one client trying to fill a whole median buffer: one buffered, one parked for the next version (its
  staleness recomputed), the rest dead-lettered ``client_rate_limited``; the median is never its delta;
* a signed update with a value of 1e20 (finite float32): clipped, the version made, and the next one too.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from redis.asyncio import Redis

from modeling.lora import StateDict
from schemas.errors import RejectReason
from schemas.events import MAX_NUM_SAMPLES, AggregationSpec
from schemas.frame import encode_frame
from services.aggregator.math.bounds import influence_bound
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.store.versions import VersionStore
from tests.support.federations import (
    dead_letters,
    global_state,
    new_client,
    new_federation,
    produce,
    random_delta,
    running_aggregator,
    shapes_of,
    wait_version,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
HONEST, POISONED = 3, 2
N = HONEST + POISONED
CLIP = 1.0  # honest deltas (scale 0.01 on the tiny adapter) have L2 norm ~0.42; the poison ~42
LR = 0.5
VERSIONS = 3


def norm(state: StateDict) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in state.values()))


def sub(a: StateDict, b: StateDict) -> StateDict:
    return {k: a[k] - b[k] for k in a}


def bound(spec: AggregationSpec, n: int) -> float:
    """The design's worst-case L2 movement of the global in one version (see the module docstring)."""
    assert spec.max_update_norm is not None
    assert spec.server_optimizer == "none"
    c = spec.server_lr * spec.max_update_norm
    if spec.robust == "none":
        return c
    k = math.floor(spec.trim_ratio * n)
    m = n - 2 * k
    if spec.robust == "median" or m <= 0:  # the trimmed mean falls back to the median
        k, m = (n - 1) // 2, (1 if n % 2 else 2)
    return c * math.sqrt(n / max(m, k + 1))


@pytest.mark.parametrize(
    "robust",
    [
        {"robust": "median"},
        {"robust": "trimmed_mean", "trim_ratio": 0.4},  # k = 2 = POISONED per side
        {"robust": "none"},  # clipping alone
    ],
    ids=["median", "trimmed_mean", "clip_only"],
)
async def test_poisoned_updates_move_the_global_within_the_norm_bound(
    pfi_settings: PFISettings, redis_client: Redis, robust: dict[str, object]
) -> None:
    store = VersionStore(redis_client)
    spec = await new_federation(
        store,
        buffer_size=N,
        flush_timeout_s=3600.0,
        max_update_norm=CLIP,
        norm_policy="clip",
        server_lr=LR,
        staleness="constant",
        max_client_updates=1,
        **robust,
    )
    agg_spec = spec.aggregation
    limit = bound(agg_spec, N)
    honest_clients = [await new_client(redis_client, spec) for _ in range(HONEST)]
    attackers = [await new_client(redis_client, spec) for _ in range(POISONED)]
    shapes = shapes_of(await global_state(store, spec.name, 0))
    seed = 1000
    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        for version in range(VERSIONS):
            before = await global_state(store, spec.name, version)
            honest: list[StateDict] = []
            for _ in range(HONEST):
                seed += 1
                honest.append(random_delta(shapes, seed))
            mean_honest = {k: sum(h[k] for h in honest) / HONEST for k in shapes}
            # The attack: 100x the honest norm, pointing against the honest consensus.
            scale = 100.0 * max(norm(h) for h in honest) / norm(mean_honest)
            poison = [{k: -v * scale for k, v in mean_honest.items()}]
            poison.append({k: v * 1.1 for k, v in poison[0].items()})
            deltas = honest + poison
            assert min(norm(p) for p in poison) >= 99.9 * max(norm(h) for h in honest)
            envelopes = [
                c.update(d, base_version=version, num_samples=10)
                for c, d in zip(honest_clients + attackers, deltas, strict=True)
            ]
            await produce(producer, [encode_frame(e) for e in envelopes], spec.name.encode())
            await wait_version(store, spec.name, version + 1)
            after = await global_state(store, spec.name, version + 1)
            moved = sub(after, before)

            # 1. the design's bound, derived from the spec
            assert norm(moved) <= limit * (1 + 1e-5), (norm(moved), limit)
            # 2. the service computed exactly the robust aggregate of these (clipped) deltas
            buffer = [
                BufferedUpdate(e.data.update_id, e.data.client_id, d, 10, 0)
                for e, d in zip(envelopes, deltas, strict=True)
            ]
            expected = aggregate(before, buffer, agg_spec).applied_delta
            assert norm(sub(moved, expected)) <= 1e-5 * max(1.0, norm(expected))
            # 3. robust: the poison cannot leave the honest envelope (f <= k trimmed per side)
            if agg_spec.robust != "none":
                for key in shapes:
                    stacked = torch.stack([h[key] for h in honest]) * LR
                    assert bool((moved[key] >= stacked.min(0).values - 1e-6).all())
                    assert bool((moved[key] <= stacked.max(0).values + 1e-6).all())
            # 4. the counterfactual: no clipping, no robust statistic -> the poison dominates
            naive = agg_spec.model_copy(update={"robust": "none", "max_update_norm": None})
            undefended = aggregate(before, buffer, naive).applied_delta
            assert norm(undefended) > 10 * limit, (norm(undefended), limit)
            clipped = sample_clipped(agg, spec.name)
            assert clipped >= POISONED * (version + 1)  # the poisoned ones were clipped, not rejected

        # Nothing was dead-lettered: under "clip" an over-norm update is accepted and bounded.
        assert await dead_letters(pfi_settings, 0, within=0.5, settle=0.5) == []


def sample_clipped(agg: object, name: str) -> float:
    registry = agg.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value("pfi_aggregator_updates_clipped_total", {"federation": name})
    return 0.0 if value is None else float(value)


def cosine(a: StateDict, b: StateDict) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    return dot / (norm(a) * norm(b))


async def test_one_attacker_claiming_2_53_samples_moves_the_global_within_the_bound(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store = VersionStore(redis_client)
    # The default weighting (uniform) and norm bound; C and η small enough to see the bound.
    spec = await new_federation(
        store,
        buffer_size=4,
        max_client_updates=1,  # the product default (tests/support defaults to K)
        flush_timeout_s=3600.0,
        max_update_norm=CLIP,
        server_lr=LR,
        staleness="constant",
    )
    agg_spec = spec.aggregation
    assert agg_spec.weighting == AggregationSpec().weighting == "uniform"
    limit = influence_bound(agg_spec, 4)
    assert limit == pytest.approx(2 * LR * CLIP / 4)
    honest_clients = [await new_client(redis_client, spec) for _ in range(3)]
    attacker = await new_client(redis_client, spec)
    shapes = shapes_of(await global_state(store, spec.name, 0))
    honest = [random_delta(shapes, 7000 + i) for i in range(3)]
    mean_honest: StateDict = {k: torch.stack([h[k] for h in honest]).mean(0) for k in shapes}
    poison: StateDict = {k: -v * (100.0 / norm(mean_honest)) for k, v in mean_honest.items()}  # L2 norm 100
    envelopes = [
        c.update(d, base_version=0, num_samples=10) for c, d in zip(honest_clients, honest, strict=True)
    ]
    envelopes.append(attacker.update(poison, base_version=0, num_samples=MAX_NUM_SAMPLES))
    async with running_aggregator(pfi_settings), UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(e) for e in envelopes], spec.name.encode())
        await wait_version(store, spec.name, 1)
    before = await global_state(store, spec.name, 0)
    moved = sub(await global_state(store, spec.name, 1), before)
    sent: list[StateDict] = [*honest, poison]
    buffer = [
        BufferedUpdate(e.data.update_id, e.data.client_id, d, e.data.num_samples, 0)
        for e, d in zip(envelopes, sent, strict=True)
    ]
    # the service computed what the math computes
    expected = aggregate(before, buffer, agg_spec).applied_delta
    assert norm(sub(moved, expected)) <= 1e-5 * max(1.0, norm(expected))
    # the attacker's influence: vs. the same version with its update replaced by a zero delta
    zero = {k: torch.zeros(s) for k, s in shapes.items()}
    without = [*buffer[:3], BufferedUpdate("zero", "zero", zero, 10, 0)]
    counterfactual = aggregate(before, without, agg_spec).applied_delta
    assert norm(sub(moved, counterfactual)) <= limit * (1 + 1e-5), (norm(sub(moved, counterfactual)), limit)
    meta = await store.get_meta(spec.name, 1)
    assert meta is not None
    weights = {u.client_id: u.weight for u in meta.updates}
    assert weights[attacker.client_id] == pytest.approx(0.25)  # its 2**53 samples bought nothing
    assert {u.client_id: u.clipped for u in meta.updates}[attacker.client_id]
    # it does not dominate: the global did not become (a scaled copy of) its delta ...
    assert norm(moved) <= LR * CLIP * (1 + 1e-5)
    assert norm(sub(moved, {k: LR * v for k, v in poison.items()})) >= 0.99 * LR * 100.0
    # ... which the old defaults (weights by claimed samples, no norm bound) would have done
    old = agg_spec.model_copy(
        update={"weighting": "samples", "max_num_samples": MAX_NUM_SAMPLES, "max_update_norm": None}
    )
    undefended = aggregate(before, buffer, old).applied_delta
    assert cosine(undefended, poison) > 0.9999
    assert norm(sub(undefended, aggregate(before, without, old).applied_delta)) > 100 * limit


async def test_one_client_cannot_fill_a_median_buffer(pfi_settings: PFISettings, redis_client: Redis) -> None:
    store = VersionStore(redis_client)
    spec = await new_federation(
        store,
        buffer_size=3,
        max_client_updates=1,  # the product default (tests/support defaults to K)
        flush_timeout_s=3600.0,
        max_update_norm=CLIP,
        server_lr=LR,
        robust="median",
    )
    a, b, c = [await new_client(redis_client, spec) for _ in range(3)]
    shapes = shapes_of(await global_state(store, spec.name, 0))
    evil = {
        k: torch.full(s, 0.9 / math.sqrt(sum(math.prod(x) for x in shapes.values())))
        for k, s in shapes.items()
    }
    flood = [a.update(evil, base_version=0) for _ in range(5)]
    hb, hc = random_delta(shapes, 11), random_delta(shapes, 12)
    honest = [b.update(hb, base_version=0), c.update(hc, base_version=0)]
    async with running_aggregator(pfi_settings), UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(e) for e in [*flood, *honest]], spec.name.encode())
        await wait_version(store, spec.name, 1)
        limited = await dead_letters(pfi_settings, 3, within=30.0, settle=0.5)
        # the parked second update enters the next buffer: two more honest updates make v2 with it
        hb2, hc2 = random_delta(shapes, 13), random_delta(shapes, 14)
        more = [b.update(hb2, base_version=1), c.update(hc2, base_version=1)]
        await produce(producer, [encode_frame(e) for e in more], spec.name.encode())
        await wait_version(store, spec.name, 2)
    assert sorted((r.reason, r.update_id) for r in limited) == sorted(
        (RejectReason.CLIENT_RATE_LIMITED, e.data.update_id) for e in flood[2:]
    )
    v1, v2 = await store.get_meta(spec.name, 1), await store.get_meta(spec.name, 2)
    assert v1 is not None
    assert v2 is not None
    assert sorted(u.update_id for u in v1.updates) == sorted(e.data.update_id for e in [flood[0], *honest])
    parked = {u.update_id: u for u in v2.updates}[flood[1].data.update_id]
    assert parked.staleness == 1  # recomputed against v1 when it entered the second buffer
    before = await global_state(store, spec.name, 0)
    moved = sub(await global_state(store, spec.name, 1), before)
    for key in shapes:  # a median of three lies between the two honest values: never the flooder's delta
        lo, hi = torch.minimum(hb[key], hc[key]) * LR, torch.maximum(hb[key], hc[key]) * LR
        assert bool((moved[key] >= lo - 1e-6).all())
        assert bool((moved[key] <= hi + 1e-6).all())
    assert norm(sub(moved, {k: LR * v for k, v in evil.items()})) > 0.5 * LR * norm(evil)
    # had the buffer taken the flood, the median would have been the flooder's delta
    flooded = [BufferedUpdate(f"a{i}", a.client_id, evil, 10, 0) for i in range(3)]
    taken = aggregate(before, flooded, spec.aggregation).applied_delta
    assert norm(sub(taken, {k: LR * v for k, v in evil.items()})) < 1e-6


async def test_a_1e20_update_is_clipped_and_the_federation_moves_on(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store = VersionStore(redis_client)
    spec = await new_federation(
        store, buffer_size=3, max_client_updates=1, flush_timeout_s=3600.0, max_update_norm=CLIP
    )
    clients = [await new_client(redis_client, spec) for _ in range(3)]
    shapes = shapes_of(await global_state(store, spec.name, 0))
    bomb = random_delta(shapes, 21)
    key = next(iter(shapes))
    bomb[key][0, 0] = 1e20  # finite in float32; its float32 L2 norm overflows to inf
    assert not math.isfinite(float(torch.linalg.vector_norm(bomb[key])))
    first = [
        clients[0].update(bomb),
        *(c.update(random_delta(shapes, 22 + i)) for i, c in enumerate(clients[1:])),
    ]
    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(e) for e in first], spec.name.encode())
        await wait_version(store, spec.name, 1)
        second = [c.update(random_delta(shapes, 30 + i), base_version=1) for i, c in enumerate(clients)]
        await produce(producer, [encode_frame(e) for e in second], spec.name.encode())
        await wait_version(store, spec.name, 2)
        assert sample_flush_failures(agg, spec.name) == 0.0
    meta = await store.get_meta(spec.name, 1)
    assert meta is not None
    contribution = {u.update_id: u for u in meta.updates}[first[0].data.update_id]
    assert contribution.clipped
    assert contribution.norm == pytest.approx(1e20, rel=1e-3)
    for version in (1, 2):
        state = await global_state(store, spec.name, version)
        assert all(bool(torch.isfinite(v).all()) for v in state.values())
    moved = sub(await global_state(store, spec.name, 1), await global_state(store, spec.name, 0))
    assert norm(moved) <= spec.aggregation.server_lr * CLIP * (1 + 1e-5)
    assert await dead_letters(pfi_settings, 0, within=0.5, settle=0.5) == []


def sample_flush_failures(agg: object, name: str) -> float:
    registry = agg.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value("pfi_aggregator_flush_failures_total", {"federation": name})
    return 0.0 if value is None else float(value)


async def test_a_parked_update_is_replayed_after_a_restart(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    """Parked updates live in memory only: the offsets stored with v1 must not pass the parked one, so a new
    aggregator process replays it into the next version, exactly once."""
    store = VersionStore(redis_client)
    spec = await new_federation(store, buffer_size=3, max_client_updates=1, flush_timeout_s=3600.0)
    a, b, c = [await new_client(redis_client, spec) for _ in range(3)]
    shapes = shapes_of(await global_state(store, spec.name, 0))
    a1, a2 = a.update(random_delta(shapes, 41)), a.update(random_delta(shapes, 42))
    first = [a1, a2, b.update(random_delta(shapes, 43)), c.update(random_delta(shapes, 44))]
    async with running_aggregator(pfi_settings), UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(e) for e in first], spec.name.encode())
        await wait_version(store, spec.name, 1)
    second = [
        b.update(random_delta(shapes, 45), base_version=1),
        c.update(random_delta(shapes, 46), base_version=1),
    ]
    async with running_aggregator(pfi_settings), UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(e) for e in second], spec.name.encode())
        await wait_version(store, spec.name, 2)
        await asyncio.sleep(1.0)  # a third version, or a dead letter, would show up by now
    assert await store.head(spec.name) == 2
    v1, v2 = await store.get_meta(spec.name, 1), await store.get_meta(spec.name, 2)
    assert v1 is not None
    assert v2 is not None
    assert [u.update_id for u in v1.updates] == [e.data.update_id for e in (a1, *first[2:])]
    assert sorted(u.update_id for u in v2.updates) == sorted(e.data.update_id for e in (a2, *second))
    assert {u.update_id: u.staleness for u in v2.updates}[a2.data.update_id] == 1
    assert await dead_letters(pfi_settings, 0, within=0.5, settle=0.5) == []


async def test_an_update_the_fold_cannot_take_is_dead_lettered_and_the_rest_aggregated(
    pfi_settings: PFISettings, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation leaves nothing the fold fails on, so this stands in a fold that raises for one client's
    updates (a deterministic data failure): that update is dead-lettered ``fold_failed``, the others make
    the version, and the federation goes on (no resync, no replay of the same buffer forever)."""
    import services.aggregator.versioning as versioning

    store = VersionStore(redis_client)
    spec = await new_federation(store, buffer_size=3, max_client_updates=1, flush_timeout_s=3600.0)
    evil, b, c = [await new_client(redis_client, spec) for _ in range(3)]
    real = versioning.aggregate

    def fold(global_state: StateDict, items: list[BufferedUpdate], *args: object, **kw: object) -> object:
        if any(item.client_id == evil.client_id for item in items):
            raise ValueError("cannot fold this one")
        return real(global_state, items, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(versioning, "aggregate", fold)
    shapes = shapes_of(await global_state(store, spec.name, 0))
    first = [evil.update(random_delta(shapes, 51)), b.update(random_delta(shapes, 52))]
    first.append(c.update(random_delta(shapes, 53)))
    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(e) for e in first], spec.name.encode())
        await wait_version(store, spec.name, 1)
        (record,) = await dead_letters(pfi_settings, 1, within=30.0, settle=0.5)
        second = [x.update(random_delta(shapes, 54 + i), base_version=1) for i, x in enumerate((b, c))]
        second.append(evil.update(random_delta(shapes, 60), base_version=1))
        await produce(producer, [encode_frame(e) for e in second[:2]], spec.name.encode())
        await asyncio.sleep(0.5)
        assert await store.head(spec.name) == 1  # K = 3: the third is still missing
        monkeypatch.setattr(versioning, "aggregate", real)  # the culprit's next update is fine
        await produce(producer, [encode_frame(second[2])], spec.name.encode())
        await wait_version(store, spec.name, 2)
        assert sample_flush_failures(agg, spec.name) == 1.0
    assert record.reason is RejectReason.FOLD_FAILED
    assert record.update_id == first[0].data.update_id
    v1 = await store.get_meta(spec.name, 1)
    assert v1 is not None
    assert [u.update_id for u in v1.updates] == [e.data.update_id for e in first[1:]]
    status_ok = await store.get_meta(spec.name, 2)
    assert status_ok is not None
    assert len(status_ok.updates) == 3
