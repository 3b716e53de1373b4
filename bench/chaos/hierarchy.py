"""Chaos run and exactly-once audit of hierarchical aggregation (issue 15), level by level.

* **update -> partial**: every committed partial on the partials topic is read ``read_committed`` (what a
  root can ever see); each sent update must be in exactly one of them (``lost``: in none; ``double``: in
  several, counted once per extra partial).
* **partial -> version**: every update in a committed partial must be in exactly one version (``lost``:
  in a partial but in no version; ``double``: in several versions), and no version may list an update
  that no committed partial carried (``unknown``).

:func:`kill_leaves_and_roots` is the scenario (``kill -9`` of leaves and roots while clients stream
updates, then the audits), used by tests/integration/test_hierarchy.py and ``pfi bench hierarchy-chaos``;
the per-level audit is a dictionary ``{level: {"lost": n, "double": n, ...}}``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from bench.aggregator_data import random_delta
from bench.chaos.audit import Audit, audit_federation, wait_aggregated
from bench.chaos.ledger import ChaosClient
from bench.chaos.processes import AggregatorFleet, ChaosError, Timeline, partition_of
from schemas.events import FederationSpec, TensorEncoding
from services.aggregator.hierarchy.codec import PartialRejected, decode_partial
from services.federation.admin import federation_status
from services.identity import ClientRegistry
from services.ingest.producer import UpdateProducer, update_key
from services.settings import PFISettings
from services.stack.topics import consumer_limits
from services.store.versions import VersionStore
from services.transport import kafka_kwargs

ENCODINGS = (
    TensorEncoding(compression="none"),
    TensorEncoding(compression="zstd"),
    TensorEncoding(dtype="float16", compression="none"),
)


class Sender:
    """Clients sending valid signed updates keyed ``federation/client``; remembers every delta."""

    def __init__(
        self,
        store: VersionStore,
        producer: UpdateProducer,
        clients: list[ChaosClient],
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self.store, self.producer, self.clients, self.shapes = store, producer, clients, shapes
        self.sent: dict[str, list[str]] = {}
        self.stop = asyncio.Event()
        self.deltas: dict[str, tuple[dict[str, torch.Tensor], int]] = {}

    async def run(
        self, per_client: int, gap_s: tuple[float, float], seed: int, stop: asyncio.Event | None = None
    ) -> None:
        """Each client sends ``per_client`` updates, or fewer once ``stop`` is set."""
        self.stop = stop or asyncio.Event()
        await asyncio.gather(
            *(self._client(i, c, per_client, gap_s, seed) for i, c in enumerate(self.clients))
        )

    async def _client(
        self, index: int, client: ChaosClient, count: int, gap_s: tuple[float, float], seed: int
    ) -> None:
        rng = random.Random(seed * 1000 + index)
        fed = client.spec.name
        for i in range(count):
            if self.stop.is_set():
                return
            delta = random_delta(self.shapes, seed=rng.randrange(1 << 30), scale=rng.choice([0.01, 0.5]))
            samples = rng.randint(1, 64)
            envelope = client.update(
                delta,
                base_version=await self.store.latest(fed) or 0,
                num_samples=samples,
                encoding=ENCODINGS[(index + i) % len(ENCODINGS)],
            )
            key = update_key(fed, client.client_id, "hierarchical")
            await self.producer.send(envelope, key=client.key, kafka_key=key)
            uid = envelope.data.update_id
            self.sent.setdefault(fed, []).append(uid)
            # what the aggregator decodes (float16 rounds): the reference uses the same values
            wire = torch.float16 if envelope.data.encoding.dtype == "float16" else torch.float32
            self.deltas[uid] = ({k: v.to(wire).to(torch.float32) for k, v in delta.items()}, samples)
            await asyncio.sleep(rng.uniform(*gap_s))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.sent.values())


async def spread_clients(
    redis: Redis, spec: FederationSpec, per_partition: int, partitions: int
) -> list[ChaosClient]:
    """Clients whose ``federation/client`` keys put ``per_partition`` of them on every partition."""
    out: list[ChaosClient] = []
    for target in range(partitions):
        found = 0
        while found < per_partition:
            cid = f"c-{uuid.uuid4().hex[:8]}"
            if partition_of(update_key(spec.name, cid, "hierarchical"), partitions) == target:
                out.append(ChaosClient(spec, cid, await ClientRegistry(redis).register(spec.name, cid)))
                found += 1
    return out


async def committed_partials(settings: PFISettings, federation: str) -> Counter[str]:
    """Update id -> in how many committed partials of ``federation`` it is (the whole partials topic)."""
    consumer = AIOKafkaConsumer(
        **kafka_kwargs(settings, "admin"),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **consumer_limits(settings),
    )
    await consumer.start()
    counts: Counter[str] = Counter()
    try:
        partitions = consumer.partitions_for_topic(settings.partials_topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(settings.partials_topic) or set()
        tps = [TopicPartition(settings.partials_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # read_committed stops at the last stable offset: read until every partition's position is there
        ends = await consumer.end_offsets(tps)

        async def behind() -> bool:
            for tp in tps:
                if await consumer.position(tp) < ends[tp]:
                    return True
            return False

        while await behind():
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if (record.key or b"").decode("utf-8", "replace") != federation:
                        continue
                    try:
                        partial = decode_partial(record.value or b"", max_bytes=1 << 30)
                    except PartialRejected:
                        continue
                    counts.update(c.update_id for c in partial.contributions)
    finally:
        await consumer.stop()
    return counts


def level_audit(
    sent: Iterable[str], in_partials: Mapping[str, int], in_versions: Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """Lost / double-counted per level (see the module docstring)."""
    sent_ids = set(sent)
    return {
        "update_to_partial": {
            "sent": len(sent_ids),
            "lost": sum(1 for u in sent_ids if in_partials.get(u, 0) == 0),
            "double": sum(n - 1 for u, n in in_partials.items() if n > 1),
            "unknown": sum(1 for u in in_partials if u not in sent_ids),
        },
        "partial_to_version": {
            "in_partials": len(in_partials),
            "lost": sum(1 for u in in_partials if in_versions.get(u, 0) == 0),
            "double": sum(n - 1 for u, n in in_versions.items() if n > 1),
            "unknown": sum(1 for u in in_versions if u not in in_partials),
        },
    }


async def audit_levels(
    settings: PFISettings, store: VersionStore, federation: str, sent: Iterable[str]
) -> dict[str, dict[str, int]]:
    status: dict[str, Any] = await federation_status(store, federation)
    in_versions: Counter[str] = Counter(uid for v in status["versions"] for uid in v["update_ids"])
    return level_audit(sent, await committed_partials(settings, federation), in_versions)


@dataclass
class KillRun:
    sender: Sender
    drained: bool
    audit: Audit
    levels: dict[str, dict[str, int]]
    timeline: str


async def kill_leaves_and_roots(
    settings: PFISettings,
    store: VersionStore,
    fleet: AggregatorFleet,
    producer: UpdateProducer,
    clients: list[ChaosClient],
    shapes: dict[str, tuple[int, ...]],
    *,
    kills: int,
    seed: int,
    leaves: int = 2,
) -> KillRun:
    """One root and ``leaves`` leaves; while clients stream updates, ``kills`` times: ``kill -9`` a leaf (and
    start another), then the root (and start another), each once the previous replacement owns its
    partitions. Then drain and audit (the whole federation, and per level)."""
    note = Timeline()
    rng = random.Random(seed)
    fed = clients[0].spec.name
    root = fleet.start("root-0", role="root")
    running = [fleet.start(f"leaf-{i}", role="leaf", partial_interval_s=0.3) for i in range(leaves)]
    for process in [root, *running]:
        await process.wait_assigned(timeout=60, non_empty=False)
    sender = Sender(store, producer, clients, shapes)
    stop = asyncio.Event()
    sending = asyncio.create_task(sender.run(100_000, (0.2, 1.2), seed=seed, stop=stop))
    try:
        for trial in range(kills):
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            victim = running.pop(0)
            victim.kill9()
            note(f"leaf {victim.name} killed after {sender.total} sent")
            running.append(fleet.start(f"leaf-r{trial}", role="leaf", partial_interval_s=0.3))
            await running[-1].wait_assigned(timeout=60)
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            root.kill9()
            note(f"root {root.name} killed after {sender.total} sent")
            root = fleet.start(f"root-{trial + 1}", role="root")
            await root.wait_assigned(timeout=60)
            note(f"{root.name} owns the partials; {sender.total} sent")
        if sending.done():
            raise ChaosError("the stream ended before the kills did: they did not happen under load")
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.wait_for(sending, 120)
    note(f"stream done: {sender.total}")
    drained = await wait_aggregated(store, sender.sent, timeout=120)
    await asyncio.sleep(2.0)  # nothing else may appear
    audit = await audit_federation(store, fed, sender.sent.get(fed, []))
    levels = await audit_levels(settings, store, fed, sender.sent.get(fed, []))
    return KillRun(sender, drained, audit, levels, str(note))
