"""Attacks on the aggregator: forged and fake chunks in Kafka, weight inflation, buffer filling, poison
values, update id squatting and broken federations."""

from __future__ import annotations

import math
import uuid
from collections import Counter
from typing import Any

import torch

from bench.attacks.rig import Device, Pair, Rig, l2, random_delta, tiny_spec
from bench.attacks.shared import Attacks, chunk_envelope, forged_chunk
from bench.common import say
from schemas.events import MAX_NUM_SAMPLES
from schemas.frame import encode_frame
from schemas.signing import generate_key
from services.aggregator.math.bounds import influence_bound
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate

# -------------------------------------------------------------------------------------------- chunks


async def forged_chunks(rig: Rig, out: Attacks, victim: Device, attacker: Device) -> Pair:
    """A compromised producer injects chunks under the victim's (fed, client, update id) while the victim's
    chunked upload goes through the ingest: the victim's update is aggregated exactly once."""
    env = victim.update(random_delta(rig.shapes, 7), base_version=await rig.store.latest(rig.main.name) or 0)
    real = rig.messages(victim, env, 2048)
    fed = rig.main.name
    injected = [
        forged_chunk(real[0], key=None),
        forged_chunk(real[1], key=attacker.key),  # claims the victim's ids, signed by another key
        forged_chunk(real[0], key=attacker.key, client_id=attacker.client_id),  # its own, same update id
        forged_chunk(real[-1], key=generate_key(), index=0),
    ]
    statuses = [(await rig.post_update(fed, real[0], victim.token)).status_code]
    await rig.kafka_send(fed, injected)
    for message in real[1:]:
        statuses.append((await rig.post_update(fed, message, victim.token)).status_code)
    await rig.kafka_send(fed, [forged_chunk(real[-1], key=None)])
    pair = (fed, victim.client_id, env.data.update_id)
    if set(statuses) == {202}:
        rig.honest_sent.append(pair)
    landed = await rig.wait_seen([pair], 60.0)
    count = sum(m.update_ids.count(env.data.update_id) for m in await rig.metas(fed))
    out.add(
        "forged_chunks_into_kafka", "chunks", "victim's update aggregated once",
        f"{len(real)} real chunks ({statuses.count(202)} accepted), {len(injected) + 1} forged; "
        f"aggregated {count}x",
        landed and count == 1,
    )  # fmt: skip
    return pair


async def fake_uploads(rig: Rig, out: Attacks, victim: Device, count: int, claimed_bytes: int) -> Pair:
    """Large chunked uploads under invented client ids straight into Kafka while the victim's upload is in
    flight: each dead-lettered (signature), the victim's never evicted."""
    fed = rig.main.name
    env = victim.update(random_delta(rig.shapes, 8), base_version=await rig.store.latest(fed) or 0)
    real = rig.messages(victim, env, 2048)
    statuses = [(await rig.post_update(fed, real[0], victim.token)).status_code]
    piece = len(chunk_envelope(real[0]).data.payload)
    invented = [f"ghost-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    fakes = [
        forged_chunk(
            real[0], key=generate_key(), client_id=cid, update_id=f"u-{uuid.uuid4().hex[:12]}",
            total_size=claimed_bytes, count=max(2, claimed_bytes // piece),
        )
        for cid in invented
    ]  # fmt: skip
    await rig.kafka_send(fed, fakes)
    for message in real[1:]:
        statuses.append((await rig.post_update(fed, message, victim.token)).status_code)
    pair = (fed, victim.client_id, env.data.update_id)
    if set(statuses) == {202}:
        rig.honest_sent.append(pair)
    landed = await rig.wait_seen([pair], 60.0)
    ghosts = set(invented)
    records = await rig.wait_dead_letters(lambda rs: sum(r.client_id in ghosts for r in rs) >= count)
    reasons = Counter(str(getattr(r.reason, "value", r.reason)) for r in records if r.client_id in ghosts)
    signature = reasons.get("signature_invalid", 0)
    out.add(
        "fake_large_uploads_into_kafka", "chunks",
        f"{count} dead-lettered (signature_invalid), victim aggregated",
        f"dead-lettered {dict(reasons)}; victim {'aggregated' if landed else 'LOST'}",
        landed and signature == count,
    )  # fmt: skip
    out.figures["fake_uploads"] = {"count": count, "claimed_bytes_each": claimed_bytes}
    return pair


# ------------------------------------------------------------------------------------------- weights


async def weight_inflation(
    rig: Rig, out: Attacks, honest: list[Device], attacker: Device, rounds: int
) -> dict[str, Any]:
    """Per version 3 honest updates + 1 attacker (L2 norm 100, ``num_samples = 2**53``): how far the global
    moved from where the honest updates alone lead, vs. ``influence_bound(spec, n)``."""
    fed = rig.weights.name
    spec = rig.weights.aggregation
    undefended_spec = spec.model_copy(
        update={"weighting": "samples", "max_num_samples": MAX_NUM_SAMPLES, "max_update_norm": None}
    )
    rows: list[dict[str, Any]] = []
    for version in range(1, rounds + 1):
        base = version - 1
        deltas = [random_delta(rig.shapes, 5000 + version * 10 + i) for i in range(len(honest))]
        mean = {k: torch.stack([d[k] for d in deltas]).mean(0) for k in rig.shapes}
        poison = {k: -v * (100.0 / l2(mean)) for k, v in mean.items()}  # against the honest direction
        envs = [d.update(x, base_version=base) for d, x in zip(honest, deltas, strict=True)]
        evil = attacker.update(poison, base_version=base, num_samples=MAX_NUM_SAMPLES)
        order = [*envs[: version % 4], evil, *envs[version % 4 :]]  # the attacker anywhere in the buffer
        for env in order:
            device = attacker if env is evil else honest[envs.index(env)]
            await rig.upload(device, env, honest=env is not evil)
        reached = await rig.wait_head(fed, version, 60.0)
        if not reached:
            out.add("weight_inflation", "weighting", f"v{version} made", "no version", False)
            break
        meta = await rig.store.get_meta(fed, version)
        assert meta is not None
        before = await rig.global_state(fed, base)
        after = await rig.global_state(fed, version)
        moved = {k: after[k] - before[k] for k in before}
        sent = {e.data.update_id: (e, x) for e, x in zip([*envs, evil], [*deltas, poison], strict=True)}

        staleness = {u.update_id: u.staleness for u in meta.updates}

        def buffered(
            update_id: str, sent: dict[str, Any] = sent, staleness: dict[str, int] = staleness
        ) -> Any:
            env, delta = sent[update_id]
            return BufferedUpdate(
                update_id, env.data.client_id, delta, env.data.num_samples, staleness[update_id]
            )

        in_version = [u.update_id for u in meta.updates if u.update_id in sent]
        honest_ids = [u for u in in_version if u != evil.data.update_id]
        honest_only = aggregate(before, [buffered(u) for u in honest_ids], spec).applied_delta
        undefended = aggregate(before, [buffered(u) for u in in_version], undefended_spec).applied_delta
        n = len(meta.updates)
        bound = influence_bound(spec, n)
        shift = l2({k: moved[k] - honest_only[k] for k in moved})
        rows.append(
            {
                "version": version,
                "updates": n,
                "attacker_in_version": evil.data.update_id in in_version,
                "attacker_weight": next(
                    (u.weight for u in meta.updates if u.client_id == attacker.client_id), 0.0
                ),
                "shift_from_honest_only": shift,
                "bound": bound,
                "beyond_bound": shift > bound * (1 + 1e-4),
                "undefended_shift": l2({k: undefended[k] - honest_only[k] for k in moved}),
            }
        )
        say(
            f"  weighting v{version}: shift {shift:.3f} vs bound {bound:.3f} "
            f"(undefended {rows[-1]['undefended_shift']:.1f})"
        )
    beyond = sum(r["beyond_bound"] for r in rows)
    out.add(
        "weight_inflation_2_53_samples", "weighting", f"shift <= bound in all {rounds} versions",
        f"{beyond} of {len(rows)} versions beyond the bound; max shift "
        f"{max((r['shift_from_honest_only'] for r in rows), default=math.nan):.3f} vs bound "
        f"{max((r['bound'] for r in rows), default=math.nan):.3f}",
        beyond == 0 and len(rows) == rounds,
    )  # fmt: skip
    return {"versions": rows, "versions_beyond_bound": beyond, "weighting": spec.weighting}


async def buffer_fill(rig: Rig, out: Attacks, flooder: Device, honest: list[Device], k: int) -> None:
    """One client sends K updates in a row: at most ``max_client_updates`` of them per version."""
    fed = rig.main.name
    base = await rig.store.latest(fed) or 0
    flood = [flooder.update(random_delta(rig.shapes, 900 + i), base_version=base) for i in range(k)]
    for env in flood:
        await rig.upload(flooder, env, honest=False)
    await rig.honest_round(honest, seed=77)
    await rig.honest_round(honest, seed=78)  # the parked one enters a later buffer
    ids = {e.data.update_id for e in flood}
    per_version = [sum(u in ids for u in m.update_ids) for m in await rig.metas(fed)]
    limit = rig.main.aggregation.max_client_updates
    out.add(
        "one_client_fills_buffer", "weighting", f"<= {limit} per version",
        f"{k} sent, {sum(per_version)} aggregated, at most {max(per_version, default=0)} in one version",
        max(per_version, default=0) <= limit,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- poison, ids


async def huge_values(rig: Rig, out: Attacks, bomber: Device, honest: list[Device]) -> None:
    """A signed update with a value of 1e20: the federation still makes the next versions."""
    fed = rig.main.name
    bomb = random_delta(rig.shapes, 31)
    first = next(iter(bomb))
    bomb[first].view(-1)[0] = 1e20
    head = await rig.store.head(fed) or 0
    await rig.upload(bomber, bomber.update(bomb, base_version=await rig.store.latest(fed) or 0), honest=False)
    ok1 = bool(await rig.honest_round(honest, seed=31)) and await rig.wait_seen(
        rig.honest_sent[-len(honest) :]
    )
    await rig.honest_round(honest, seed=32)
    after = await rig.store.head(fed) or 0
    state = await rig.global_state(fed, after)
    finite = all(bool(torch.isfinite(v).all()) for v in state.values())
    out.add(
        "update_with_1e20", "poison", "next versions made, global finite",
        f"v{head} -> v{after}, finite={finite}", ok1 and after >= head + 2 and finite,
    )  # fmt: skip


async def squat(rig: Rig, out: Attacks, victim: Device, squatter: Device) -> Pair:
    """Client B sends an update under client A's next update id first: A's update still aggregates."""
    fed = rig.main.name
    shared = f"upd-{uuid.uuid4().hex[:12]}"
    base = await rig.store.latest(fed) or 0
    await rig.upload(
        squatter,
        squatter.update(random_delta(rig.shapes, 41), base_version=base, update_id=shared),
        honest=False,
    )
    env = victim.update(random_delta(rig.shapes, 42), base_version=base, update_id=shared)
    await rig.upload(victim, env)
    pair = (fed, victim.client_id, shared)
    landed = await rig.wait_seen([pair], 60.0)
    mine = sum(
        (u.client_id, u.update_id) == (victim.client_id, shared)
        for m in await rig.metas(fed)
        for u in m.updates
    )
    out.add(
        "update_id_squatting",
        "ids",
        "victim's update aggregated once",
        f"aggregated {mine}x",
        landed and mine == 1,
    )
    return pair


async def broken_federations(rig: Rig, out: Attacks, device: Device, honest: list[Device]) -> None:
    """Messages keyed with a half-created federation (spec, no v0) and an unknown one: the aggregator keeps
    running and the other federations keep making versions."""
    broken = tiny_spec(f"atkh-{rig.hexid}")
    await rig.store.put_spec(broken)
    rig._created.append(broken.name)
    unknown = f"atku-{uuid.uuid4().hex[:8]}"
    env = device.update(random_delta(rig.shapes, 51), base_version=0)
    await rig.kafka_send(broken.name, [encode_frame(env), b"garbage"])
    await rig.kafka_send(unknown, [encode_frame(env), b"\x00" * 100])
    head = await rig.store.head(rig.main.name) or 0
    sent = await rig.honest_round(honest, seed=52)
    landed = await rig.wait_seen(sent)
    alive = not rig.poll_exits()
    after = await rig.store.head(rig.main.name) or 0
    records = await rig.wait_dead_letters(lambda rs: sum(r.federation == broken.name for r in rs) >= 2)
    reasons = Counter(
        str(getattr(r.reason, "value", r.reason)) for r in records if r.federation == broken.name
    )
    out.add(
        "half_created_and_unknown_federation", "poison", "aggregator keeps running, versions made",
        f"alive={alive}, v{head} -> v{after}; half-created dead-lettered {dict(reasons)}",
        alive and landed and after > head,
    )  # fmt: skip
