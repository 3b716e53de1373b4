"""Hierarchical aggregation (issue 15) with real ``pfi aggregator --role leaf|root`` processes, Kafka, Redis.

1. Two leaves and one root make versions equal to single-aggregator FedBuff over the same updates: each
   version's blob is recomputed here with :func:`~services.aggregator.math.fedbuff.aggregate` from its
   parent's blob and the deltas of the updates its metadata lists (with their staleness).
2. ``kill -9`` of a leaf and of the root mid-stream: every update in exactly one version, nothing lost.
3. A single aggregator on the same updates topic skips a hierarchical federation's messages (keyed
   ``federation/client``, its leaves' to aggregate): none is dead-lettered or aggregated, and the single
   federation's updates on that topic are still aggregated.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from redis.asyncio import Redis

from bench.chaos.hierarchy import ENCODINGS, Sender, kill_leaves_and_roots, spread_clients
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.federation.admin import create_federation
from services.ingest.producer import UpdateProducer, update_key
from services.ingest.topology import TopologyCache
from services.settings import PFISettings
from services.store import keys
from services.store.versions import VersionStore
from tests.ops.promql import exported_names, referenced_names
from tests.support.federations import (
    dead_letters,
    global_state,
    new_client,
    random_delta,
    running_aggregator,
    sample,
    shapes_of,
    tiny_spec,
    wait_for,
    wait_version,
)
from tests.support.processes import (
    aggregator_fleet,
    audit_federation,
    wait_aggregated,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def check_versions_equal_single(
    store: VersionStore, name: str, deltas: dict[str, tuple[dict[str, torch.Tensor], int]]
) -> int:
    """Every version v >= 1 recomputed by single FedBuff from v's parent and v's updates; returns how many."""
    spec = (await store.require_spec(name)).aggregation
    head = await store.head(name)
    assert head is not None
    for v in range(1, head + 1):
        meta = await store.get_meta(name, v)
        assert meta is not None
        parent = await global_state(store, name, meta.parent)
        buffer = [
            BufferedUpdate(
                u.update_id, u.client_id, deltas[u.update_id][0], deltas[u.update_id][1], u.staleness
            )
            for u in meta.updates
        ]
        expected = aggregate(parent, buffer, spec).new_global
        got = await global_state(store, name, v)
        for key, tensor in expected.items():
            assert torch.allclose(got[key], tensor, atol=1e-5, rtol=1e-5), (
                f"v{v} {key}: max diff {(got[key] - tensor).abs().max()}"
            )
    return head


async def test_two_leaves_and_a_root_equal_single_fedbuff(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    settings = pfi_settings.model_copy(update={"chunk_bytes": 4096})
    store = VersionStore(redis_client)
    spec = tiny_spec(
        buffer_size=4,
        flush_timeout_s=1.5,
        max_staleness=64,
        keep_versions=1000,
        topology="hierarchical",
        weighting="samples",
        max_update_norm=1.0,
        max_client_updates=1,
    )
    await create_federation(store, spec)
    clients = await spread_clients(redis_client, spec, 2, settings.update_partitions)
    shapes = {k: tuple(v.shape) for k, v in (await global_state(store, spec.name)).items()}
    async with aggregator_fleet(settings, tmp_path / "logs") as fleet, UpdateProducer(settings) as producer:
        root = fleet.start("root", role="root")
        leaves = [fleet.start(f"leaf-{i}", role="leaf", partial_interval_s=0.3) for i in range(2)]
        for process in [root, *leaves]:
            await process.wait_assigned(timeout=60, non_empty=False)
        sender = Sender(store, producer, clients, shapes)
        await sender.run(4, (0.05, 0.4), seed=15)
        assert await wait_aggregated(store, sender.sent, timeout=90)
        audit = await audit_federation(store, spec.name, sender.sent[spec.name])
        leaf_metrics = [p.metrics() for p in leaves]
        pages = [_scrape(p.metrics_port()) for p in [root, *leaves]]
    assert audit.problems == []
    versions = await check_versions_equal_single(store, spec.name, sender.deltas)
    assert versions >= 3
    # both leaves did work (the updates are keyed by client over the 3 partitions)
    emitted = [
        sum(v for k, v in m.items() if k.startswith("pfi_hierarchy_partials_emitted_total"))
        for m in leaf_metrics
    ]
    # Every hierarchy metric the dashboards and alert rules name is exported by a leaf or the root.
    exported: set[str] = set()
    for page in pages:
        exported |= set(exported_names(page))
    used = {n for n in referenced_names() if n.startswith("pfi_hierarchy_")}
    assert used, "no hierarchy metric on a dashboard or in a rule?"
    assert used <= exported, f"used but not exported: {sorted(used - exported)}"
    assert all(e > 0 for e in emitted), emitted


async def test_kill9_of_a_leaf_and_the_root_loses_and_double_counts_nothing(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    settings = pfi_settings.model_copy(update={"chunk_bytes": 4096})
    store = VersionStore(redis_client)
    spec = tiny_spec(
        buffer_size=3,
        flush_timeout_s=1.0,
        max_staleness=64,
        keep_versions=1000,
        topology="hierarchical",
        max_client_updates=1,
    )
    await create_federation(store, spec)
    clients = await spread_clients(redis_client, spec, 2, settings.update_partitions)
    shapes = {k: tuple(v.shape) for k, v in (await global_state(store, spec.name)).items()}
    async with aggregator_fleet(settings, tmp_path / "logs") as fleet, UpdateProducer(settings) as producer:
        run = await kill_leaves_and_roots(settings, store, fleet, producer, clients, shapes, kills=2, seed=7)
    drained, audit, levels, sender = run.drained, run.audit, run.levels, run.sender
    assert drained, {"levels": levels, "problems": audit.problems, "timeline": run.timeline}
    assert audit.problems == [], audit.problems
    for level, counts in levels.items():  # each update in exactly one partial, each of those in one version
        assert counts["lost"] == counts["double"] == counts["unknown"] == 0, (level, counts)
    assert levels["update_to_partial"]["sent"] == sender.total
    await check_versions_equal_single(store, spec.name, sender.deltas)


async def test_a_single_aggregator_skips_a_hierarchical_federations_messages(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    settings = pfi_settings.model_copy(update={"chunk_bytes": 4096})  # some updates travel as chunks
    store = VersionStore(redis_client)
    hier = tiny_spec(topology="hierarchical", buffer_size=2, flush_timeout_s=0.5)
    single = tiny_spec(buffer_size=2)
    for spec in (hier, single):
        await create_federation(store, spec)
    shapes = shapes_of(await global_state(store, single.name))
    hier_clients = [await new_client(redis_client, hier) for _ in range(3)]
    single_clients = [await new_client(redis_client, single) for _ in range(2)]
    skipped_metric = "pfi_aggregator_hierarchical_messages_skipped_total"
    async with running_aggregator(settings) as agg, UpdateProducer(settings) as producer:
        hier_messages = 0
        for i, client in enumerate(hier_clients):
            for j, encoding in enumerate(ENCODINGS):
                envelope = client.update(random_delta(shapes, seed=10 * i + j), encoding=encoding)
                key = update_key(hier.name, client.client_id, "hierarchical")
                hier_messages += await producer.send(envelope, key=client.key, kafka_key=key)
        for i, client in enumerate(single_clients):  # keyed by the federation: the single aggregator's
            await producer.send(client.update(random_delta(shapes, seed=100 + i)), key=client.key)
        await wait_version(store, single.name, 1)
        await wait_for(lambda: sample(agg, skipped_metric) >= hier_messages, timeout=30)
        assert hier_messages > len(hier_clients) * len(ENCODINGS)  # chunked uploads were skipped too
        # had it buffered any of them, a version of the hierarchical federation would be due by now
        records = await dead_letters(settings, 0, within=5.0, settle=3.0)
        skipped = sample(agg, skipped_metric)
        hier_seen = [
            sample(agg, f"pfi_aggregator_updates_{what}_total", federation=hier.name)
            for what in ("received", "accepted", "aggregated")
        ]
        single_aggregated = sample(agg, "pfi_aggregator_updates_aggregated_total", federation=single.name)
    assert records == [], [(r.reason, r.detail) for r in records]
    assert skipped == hier_messages  # every message (whole or chunk), once
    assert hier_seen == [0.0, 0.0, 0.0]
    assert await store.head(hier.name) == 0  # no version made from its updates
    assert single_aggregated == 2
    meta = await store.get_meta(single.name, 1)
    assert meta is not None
    assert {u.client_id for u in meta.updates} == {c.client_id for c in single_clients}


def _scrape(port: int | None) -> str:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode("utf-8")


async def test_ingest_keys_updates_of_hierarchical_federations_by_client(redis_client: Redis) -> None:
    """The HTTPS ingest's Kafka key: by federation (single) or ``federation/client`` (hierarchical)."""
    store = VersionStore(redis_client)
    hier, single = tiny_spec(topology="hierarchical"), tiny_spec()
    assert await store.put_spec(hier)
    assert await store.put_spec(single)
    await redis_client.set(keys.spec("broken-spec"), b"{not json")
    cache = TopologyCache(ttl_s=60.0)
    assert await cache.key(redis_client, hier.name, "c1") == f"{hier.name}/c1"
    assert await cache.key(redis_client, single.name, "c1") == single.name
    assert await cache.key(redis_client, "no-such-federation", "c1") == "no-such-federation"
    assert await cache.key(redis_client, "broken-spec", "c1") == "broken-spec"
