"""Versioning by the aggregator, end to end on the real stack (Kafka + Redis, tiny model).

The central check replays the pure FedBuff function version by version: from v0 and the deltas the
test sent, ``aggregate()`` over each version's recorded updates (ids, staleness, sample counts, in
the recorded order) must give the stored blobs, so the service adds nothing, drops nothing and
counts nothing twice. Around it: timeout flushes, chunked uploads interleaved with whole ones,
rollback, retention, a graceful restart with a half-full buffer and a crash right after a commit.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from modeling.blobs import BLOB_ENCODING
from modeling.lora import StateDict
from schemas.codec import decode_tensors
from schemas.events import FederationSpec
from schemas.frame import encode_frame
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.aggregator.math.lora_modes import is_lora_a
from services.aggregator.math.server_optimizer import ServerOptState
from services.federation.admin import federation_status, rollback_federation
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.store.versions import StoreError, VersionStore
from tests.support.federations import (
    Client,
    chunked,
    dead_letters,
    global_state,
    new_client,
    new_federation,
    produce,
    random_delta,
    running_aggregator,
    sample,
    shapes_of,
    wait_for,
    wait_version,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
TOLERANCE = 1e-6


# -- the reference: the pure function, replayed -------------------------------------------------------


async def lineage(store: VersionStore, name: str, version: int) -> list[int]:
    """``[0, ..., version]`` along parent links."""
    chain: list[int] = []
    current: int | None = version
    while current is not None:
        chain.append(current)
        meta = await store.get_meta(name, current)
        assert meta is not None, f"meta of v{current} missing"
        current = meta.parent
    return chain[::-1]


async def replay(
    store: VersionStore, spec: FederationSpec, deltas: dict[str, StateDict], version: int
) -> tuple[dict[int, StateDict], ServerOptState | None]:
    """Global adapters of the lineage of ``version`` as ``aggregate()`` computes them from v0."""
    chain = await lineage(store, spec.name, version)
    assert chain[0] == 0
    state = await global_state(store, spec.name, 0)
    opt: ServerOptState | None = None
    out = {0: state}
    for v in chain[1:]:
        meta = await store.get_meta(spec.name, v)
        assert meta is not None
        assert meta.kind == "aggregate"
        assert meta.updates, f"v{v} has no updates"
        buffer = [
            BufferedUpdate(
                update_id=u.update_id,
                client_id=u.client_id,
                delta=deltas[u.update_id],
                num_samples=u.num_samples,
                staleness=u.staleness,
            )
            for u in meta.updates
        ]
        result = aggregate(state, buffer, spec.aggregation, opt)
        for u in meta.updates:  # what the metadata says about each update is what the math used
            assert u.weight == pytest.approx(result.weights[u.update_id], rel=1e-9)
            assert u.staleness_weight == pytest.approx(result.staleness_weights[u.update_id], rel=1e-9)
            assert u.clipped == (u.update_id in result.clipped)
        state, opt = result.new_global, result.opt_state
        out[v] = state
    return out, opt


def max_diff(a: StateDict, b: StateDict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


async def assert_matches_replay(
    store: VersionStore, spec: FederationSpec, deltas: dict[str, StateDict], version: int
) -> dict[int, StateDict]:
    expected, opt = await replay(store, spec, deltas, version)
    for v, state in expected.items():
        stored = await global_state(store, spec.name, v)
        assert max_diff(stored, state) <= TOLERANCE, f"v{v} differs from the replay"
    if spec.aggregation.server_optimizer != "none":
        blob = await store.get_optimizer(spec.name)
        assert blob, "optimizer state was not stored"
        stored_opt = ServerOptState.from_tensors(
            decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
        )
        assert opt is not None
        assert stored_opt.kind == opt.kind
        assert stored_opt.step == opt.step == len(expected) - 1
        for name, buf in opt.buffers.items():
            assert max_diff(stored_opt.buffers[name], buf) <= TOLERANCE
    return expected


async def assert_matches_replay_without_v0(
    store: VersionStore, fleet: Fleet, version: int
) -> dict[int, StateDict]:
    """Like :func:`replay`, seeded with a freshly initialized v0 (v0's blob may be gone)."""
    from modeling.base import load_base_model
    from modeling.lora import init_adapter

    state = init_adapter(fleet.spec, load_base_model(fleet.spec.base_model).model)
    out = {0: state}
    opt = None
    for v in (await lineage(store, fleet.name, version))[1:]:
        meta = await store.get_meta(fleet.name, v)
        assert meta is not None
        buffer = [
            BufferedUpdate(u.update_id, u.client_id, fleet.deltas[u.update_id], u.num_samples, u.staleness)
            for u in meta.updates
        ]
        result = aggregate(state, buffer, fleet.spec.aggregation, opt)
        state, opt = result.new_global, result.opt_state
        out[v] = state
        blob = await store.get_blob(fleet.name, v)
        if blob is not None:
            stored = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
            assert max_diff(stored, state) <= TOLERANCE, f"v{v}"
    return out


async def assert_counts(store: VersionStore, name: str, sent: int) -> dict[str, Any]:
    """Σ per-version update counts == accepted == aggregated == ``sent``; no update in two versions."""

    async def settled() -> bool:
        status = await federation_status(store, name)
        return bool(status["updates_buffered"] == 0)

    await wait_for(settled, timeout=10, interval=0.1)
    status = await federation_status(store, name)
    per_version = [v["num_updates"] for v in status["versions"] if v["version"] > 0]
    ids = [u for v in status["versions"] for u in v["update_ids"]]
    assert sum(per_version) == status["updates_accepted_total"] == status["updates_aggregated_total"] == sent
    assert len(ids) == len(set(ids)) == sent
    assert status["updates_rejected_total"]["total"] == 0, status["updates_rejected_total"]
    return status


async def assert_no_dead_letters(settings: PFISettings) -> None:
    records = await dead_letters(settings, 0, settle=0.5)
    assert records == [], [(r.reason, r.detail) for r in records]


# -- a small harness ------------------------------------------------------------------------------------


class Fleet:
    """Clients of one federation and every delta they sent (update id -> delta)."""

    def __init__(self, store: VersionStore, spec: FederationSpec, clients: list[Client]) -> None:
        self.store = store
        self.spec = spec
        self.clients = clients
        self.deltas: dict[str, StateDict] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.seed = 0

    @classmethod
    async def create(cls, redis: Redis, n_clients: int, **aggregation: Any) -> Fleet:
        store = VersionStore(redis)
        spec = await new_federation(store, **aggregation)
        fleet = cls(store, spec, [await new_client(redis, spec) for _ in range(n_clients)])
        fleet.shapes = shapes_of(await global_state(store, spec.name, 0))
        return fleet

    @property
    def name(self) -> str:
        return self.spec.name

    def update(self, client: int, base_version: int, num_samples: int = 10, scale: float = 0.01) -> Any:
        self.seed += 1
        delta = random_delta(self.shapes, self.seed * 7919 + client, scale)
        envelope = self.clients[client].update(delta, base_version=base_version, num_samples=num_samples)
        self.deltas[envelope.data.update_id] = delta
        return envelope


# -- tests ----------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "fedit-polynomial": {"lora_mode": "fedit", "staleness": "polynomial", "staleness_a": 0.5},
    "ffa": {"lora_mode": "ffa"},
    "momentum": {"server_optimizer": "momentum", "momentum": 0.8, "server_lr": 0.5},
}
LAGS = (0, 1, 3, 2, 0, 2, 1, 3)  # base_version = current version - lag (clamped at 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_mixed_staleness_matches_the_pure_function(
    variant: str, pfi_settings: PFISettings, redis_client: Redis
) -> None:
    k, rounds, n_clients = 3, 6, 4
    fleet = await Fleet.create(redis_client, n_clients, buffer_size=k, max_staleness=8, **VARIANTS[variant])
    expected_staleness: dict[str, int] = {}
    i = 0
    # Two aggregator runs: the second one loads the global (and optimizer state) back from Redis.
    for first_round, last_round in ((0, rounds // 2), (rounds // 2, rounds)):
        async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
            for r in range(first_round, last_round):
                # Round r: the global is at v_r; clients trained on versions lagging by 0..3.
                for _ in range(k):
                    base = max(0, r - LAGS[i % len(LAGS)])
                    scale = 3.0 if i == 4 else 0.01  # one update over max_update_norm: clipped
                    env = fleet.update(i % n_clients, base, num_samples=1 + (i * 5) % 17, scale=scale)
                    expected_staleness[env.data.update_id] = r - base
                    await produce(producer, [encode_frame(env)], fleet.name.encode())
                    i += 1
                await wait_version(fleet.store, fleet.name, r + 1)
            # The counter moves just after the Redis commit that wait_version saw: wait for it too.
            expected = (last_round - first_round) * k
            await wait_for(
                lambda agg=agg, expected=expected: (
                    sample(agg, "pfi_aggregator_updates_aggregated_total", federation=fleet.name) == expected
                ),
                timeout=10,
            )
    assert await fleet.store.latest(fleet.name) == rounds
    status = await assert_counts(fleet.store, fleet.name, rounds * k)
    recorded: dict[str, int] = {}
    for v in range(1, rounds + 1):
        meta = await fleet.store.get_meta(fleet.name, v)
        assert meta is not None
        assert meta.parent == v - 1
        recorded |= {u.update_id: u.staleness for u in meta.updates}
    assert recorded == expected_staleness
    assert set(recorded.values()) == {0, 1, 2, 3}
    assert status["versions"][-1]["mean_staleness"] is not None

    states = await assert_matches_replay(fleet.store, fleet.spec, fleet.deltas, rounds)
    v0, last = states[0], states[rounds]
    if variant == "ffa":
        for key in v0:
            if is_lora_a(key):
                assert torch.equal(last[key], v0[key]), f"{key} moved under FFA-LoRA"
                assert torch.equal((await global_state(fleet.store, fleet.name))[key], v0[key])
            else:
                assert not torch.equal(last[key], v0[key])
    else:
        assert all(not torch.equal(last[key], v0[key]) for key in v0)
    await assert_no_dead_letters(pfi_settings)


async def test_timeout_flush_makes_a_smaller_version(pfi_settings: PFISettings, redis_client: Redis) -> None:
    fleet = await Fleet.create(redis_client, 3, buffer_size=10, flush_timeout_s=1.0)
    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        for c in range(3):
            await produce(producer, [encode_frame(fleet.update(c, 0))], fleet.name.encode())
        sent_at = time.monotonic()
        await wait_for(
            lambda: sample(agg, "pfi_aggregator_updates_accepted_total", federation=fleet.name) == 3
        )
        assert await fleet.store.head(fleet.name) == 0  # 3 < K: nothing yet
        await wait_version(fleet.store, fleet.name, 1, within=10)
        assert time.monotonic() - sent_at >= 0.8
        meta = await fleet.store.get_meta(fleet.name, 1)
        assert meta is not None
        assert len(meta.updates) == 3
        await assert_counts(fleet.store, fleet.name, 3)
    await assert_matches_replay(fleet.store, fleet.spec, fleet.deltas, 1)
    await assert_no_dead_letters(pfi_settings)


async def test_chunked_updates_interleaved_with_whole_ones(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    fleet = await Fleet.create(redis_client, 3, buffer_size=3)
    key = fleet.name.encode()
    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        # v1: client 0 uploads in chunks; client 1's two whole updates arrive between its chunks.
        keys = [c.key for c in fleet.clients]
        big = chunked(fleet.update(0, 0, num_samples=40), pfi_settings, 2048, keys[0])
        assert len(big) >= 3
        w1, w2 = (encode_frame(fleet.update(1, 0, num_samples=n)) for n in (3, 9))
        await produce(producer, [big[0], w1, big[1], w2, *big[2:]], key)
        await wait_version(fleet.store, fleet.name, 1)
        # v2: two chunked uploads at once (clients 0 and 2), interleaved, and one whole update.
        a = chunked(fleet.update(0, 1, num_samples=7), pfi_settings, 2048, keys[0])
        b = chunked(fleet.update(2, 0, num_samples=12), pfi_settings, 2048, keys[2])
        w3 = encode_frame(fleet.update(1, 1))
        mixed = [m for pair in zip(a, b, strict=False) for m in pair] + a[len(b) :] + b[len(a) :]
        await produce(producer, [mixed[0], w3, *mixed[1:]], key)
        await wait_version(fleet.store, fleet.name, 2)
        chunks = len(big) + len(a) + len(b)
        # Counted once handled (the last chunk's count may trail its version by a moment). At least once,
        # not exactly: a consumer-group rebalance on a loaded machine replays messages above the stored
        # offsets and counts them again; exactly-once is what the version checks below assert.
        await wait_for(lambda: sample(agg, "pfi_aggregator_messages_received_total", kind="chunk") >= chunks)
        assert sample(agg, "pfi_aggregator_messages_received_total", kind="whole") >= 3
        assert sample(agg, "pfi_aggregator_chunked_uploads_in_flight") == 0
        await assert_counts(fleet.store, fleet.name, 6)
    meta1 = await fleet.store.get_meta(fleet.name, 1)
    assert meta1 is not None
    assert [u.num_samples for u in meta1.updates] == [3, 9, 40]  # the chunked one completed last
    await assert_matches_replay(fleet.store, fleet.spec, fleet.deltas, 2)
    await assert_no_dead_letters(pfi_settings)


async def test_rollback_moves_latest_and_aggregation_continues_from_it(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    fleet = await Fleet.create(redis_client, 2, buffer_size=1)
    store, name, key = fleet.store, fleet.name, fleet.name.encode()
    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(fleet.update(c % 2, c)) for c in range(3)], key)
        await wait_version(store, name, 3)
        blobs = {v: await store.get_blob(name, v) for v in range(4)}
        metas = {v: await store.get_meta(name, v) for v in range(4)}

        assert await rollback_federation(store, name, 1) == 3
        assert await store.pointers(name) == (1, 3)
        for v in range(4):  # moved the pointer only
            assert await store.get_blob(name, v) == blobs[v]
            assert await store.get_meta(name, v) == metas[v]
        assert max_diff(await global_state(store, name), await global_state(store, name, 1)) == 0

        # Trained on the rolled-back-to v1: the aggregator (still at v3 in memory) hits a commit
        # conflict, reloads, replays, and commits v4 on top of v1.
        await produce(producer, [encode_frame(fleet.update(0, 1))], key)
        await wait_version(store, name, 4)
        assert sample(agg, "pfi_aggregator_commit_conflicts_total", federation=name) >= 1
        meta4 = await store.get_meta(name, 4)
        assert meta4 is not None
        assert meta4.parent == 1
        assert [u.staleness for u in meta4.updates] == [0]
        await produce(producer, [encode_frame(fleet.update(1, 4))], key)
        await wait_version(store, name, 5)
        meta5 = await store.get_meta(name, 5)
        assert meta5 is not None
        assert meta5.parent == 4
        assert await store.pointers(name) == (5, 5)
        await assert_counts(store, name, 5)
    assert await lineage(store, name, 5) == [0, 1, 4, 5]
    await assert_matches_replay(store, fleet.spec, fleet.deltas, 5)
    for v in (2, 3):  # the abandoned branch is still there, untouched
        assert await store.get_blob(name, v) == blobs[v]
    await assert_no_dead_letters(pfi_settings)


async def test_retention_keeps_last_versions_and_pinned(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    fleet = await Fleet.create(redis_client, 2, buffer_size=1, keep_versions=2)
    store, name, key = fleet.store, fleet.name, fleet.name.encode()
    async with running_aggregator(pfi_settings), UpdateProducer(pfi_settings) as producer:
        await produce(producer, [encode_frame(fleet.update(0, 0))], key)
        await wait_version(store, name, 1)
        await store.pin(name, 1)
        await produce(producer, [encode_frame(fleet.update(v % 2, v)) for v in range(1, 6)], key)
        await wait_version(store, name, 6)
        await assert_counts(store, name, 6)
    assert await store.retained_versions(name) == [1, 5, 6]
    for v in range(7):
        assert await store.get_meta(name, v) is not None, f"meta of v{v} deleted"
        blob = await store.get_blob(name, v)
        assert (blob is not None) == (v in (1, 5, 6)), f"v{v}"
    status = await federation_status(store, name)
    assert status["retained_versions"] == [1, 5, 6]
    assert status["pinned_versions"] == [1]
    assert [v["retained"] for v in status["versions"]] == [v in (1, 5, 6) for v in range(7)]
    with pytest.raises(StoreError, match="not retained"):
        await rollback_federation(store, name, 3)
    # Retained blobs still match the math (the replay reads v0's seed, which was deleted: rebuild it).
    chain_state = await assert_matches_replay_without_v0(store, fleet, 6)
    assert max_diff(chain_state[1], await global_state(store, name, 1)) <= TOLERANCE


async def test_graceful_shutdown_with_a_partial_buffer_then_replay(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    fleet = await Fleet.create(redis_client, 4, buffer_size=4)
    store, name, key = fleet.store, fleet.name, fleet.name.encode()
    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        first = [fleet.update(c, 0) for c in range(2)]
        positions = await produce(producer, [encode_frame(e) for e in first], key)
        await wait_for(lambda: sample(agg, "pfi_aggregator_buffer_updates", federation=name) == 2)
    # Stopped with 2 of 4 buffered: no partial version, nothing counted as aggregated.
    assert await store.pointers(name) == (0, 0)
    assert await store.get_meta(name, 1) is None
    stats = await store.get_stats(name)
    assert stats.get("aggregated_total", 0) == 0
    partition = positions[0][0]
    offsets = await store.get_offsets(name)
    safe = offsets.get(f"{pfi_settings.updates_topic}:{partition}")
    assert safe is None or safe <= positions[0][1], "the buffered updates must stay replayable"

    async with running_aggregator(pfi_settings) as agg, UpdateProducer(pfi_settings) as producer:
        second = [fleet.update(c, 0) for c in range(2, 4)]
        await produce(producer, [encode_frame(e) for e in second], key)
        await wait_version(store, name, 1)
        meta = await store.get_meta(name, 1)
        assert meta is not None
        assert meta.update_ids == [e.data.update_id for e in first + second]
        assert sample(agg, "pfi_aggregator_updates_accepted_total", federation=name) == 4
        await assert_counts(store, name, 4)

    # A third run finds nothing to do: no second version, no duplicates dead-lettered.
    async with running_aggregator(pfi_settings) as agg:
        await wait_for(lambda: sample(agg, "pfi_aggregator_assigned_partitions") > 0, timeout=15)
        await assert_no_dead_letters(pfi_settings)
        assert sample(agg, "pfi_aggregator_updates_accepted_total", federation=name) == 0
    assert await store.pointers(name) == (1, 1)
    await assert_counts(store, name, 4)
    await assert_matches_replay(store, fleet.spec, fleet.deltas, 1)


async def test_crash_right_after_a_version_commit_replays_nothing_twice(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    """The version commit alone must make its updates durable: an aggregator that dies right after
    it (no progress commit, no watermark raised) is followed by one that neither re-aggregates nor
    dead-letters them as duplicates."""
    fleet = await Fleet.create(redis_client, 2, buffer_size=2)
    store, name, key = fleet.store, fleet.name, fleet.name.encode()

    async def crashed(*_: Any) -> None:  # what a killed process leaves behind: nothing more
        return None

    async with running_aggregator(pfi_settings, progress_interval_s=3600) as agg:
        agg.commit_progress = crashed  # type: ignore[method-assign]
        async with UpdateProducer(pfi_settings) as producer:
            await produce(producer, [encode_frame(fleet.update(c, 0)) for c in range(2)], key)
            await wait_version(store, name, 1)
    # No watermark raised (the version commit's own ``safe`` offsets are all a restart has).
    assert not [f for f in await store.get_offsets(name) if f.endswith(":wm")]

    async with running_aggregator(pfi_settings) as agg2, UpdateProducer(pfi_settings) as producer:
        await wait_for(lambda: sample(agg2, "pfi_aggregator_assigned_partitions") > 0, timeout=15)
        await produce(producer, [encode_frame(fleet.update(c, 1)) for c in range(2)], key)
        await wait_version(store, name, 2)
        assert sample(agg2, "pfi_aggregator_updates_accepted_total", federation=name) == 2
        await assert_no_dead_letters(pfi_settings)
        await assert_counts(store, name, 4)
    assert await store.pointers(name) == (2, 2)
    await assert_matches_replay(store, fleet.spec, fleet.deltas, 2)
