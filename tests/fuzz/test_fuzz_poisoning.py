"""Poisoned updates (signed, valid, 100x the honest L2 norm) under robust aggregation, end to end.

Design (``services/aggregator/math/fedbuff.py``): with ``norm_policy="clip"`` an over-norm update is *not*
rejected; every delta is clipped to ``C = max_update_norm`` before the merge, and the server step is
``η · agg(clipped deltas)`` (``server_optimizer="none"``, η = ``server_lr``). The bounds this gives, per
version:

* ``robust="none"`` (weighted mean, weights ``s(τ)·n_i / Σ n <= n_i / Σ n``): ``||Δ|| <= η·C``;
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
"""

from __future__ import annotations

import math

import pytest
import torch
from redis.asyncio import Redis

from clients.updates import UpdateProducer
from schemas.events import AggregationSpec
from schemas.frame import encode_frame
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
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

StateDict = dict[str, torch.Tensor]
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
