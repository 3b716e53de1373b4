"""``pfi aggregator --role root``: fold the leaves' partials into versions, one root per federation.

The partials topic is keyed by federation, so each federation's partials are on one partition, and the
consumer group ``<group_id>-root`` gives that partition to exactly one root (Kafka elects the owner; a
zombie that lost it is fenced by the version commit's expected ``latest``/``head``). The root reads
``read_committed``: only partials of committed leaf transactions.

Per federation it keeps an :class:`~.partial.Accumulation` and makes a version when the updates counted
reach ``buffer_size`` (K counts updates across leaves; a version may exceed K by less than a partial), or
when the oldest accumulated partial waited ``flush_timeout_s`` (with ``flush_min_updates``), or before a
partial that brings a client already in the accumulation (one update per client per version). Each group's
staleness discount is applied against the root's latest version at that moment
(:func:`~.partial.aggregate_partials`); groups whose base version left the lineage are dropped and counted
``too_stale``. A partial that overlaps updates already accumulated or in ``seen`` is refused whole
(counted ``duplicate``; a sum cannot be taken apart): the ingest's idempotency
(:mod:`services.ingest.idempotency`) keeps device retries from reaching a leaf twice, so only the residual
cases it names can get here.

**Exactly once, partials -> versions.** A version is committed by the single aggregator's Lua script with
the partials topic's offsets (:mod:`.versions`): a crash anywhere replays the accumulation from Kafka;
partials below the federation's stored offset are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from services.aggregator.connections import group_consumer, outbound_producer
from services.aggregator.core import cpu_pool
from services.aggregator.hierarchy.codec import PartialRejected, decode_partial
from services.aggregator.hierarchy.metrics import HierarchyMetrics
from services.aggregator.hierarchy.partial import Accumulation, Partial, stale_bases
from services.aggregator.hierarchy.poll_loop import poll_until_stopped
from services.aggregator.hierarchy.versions import build_commit, fold_and_encode, own_field, safe_field
from services.aggregator.publisher import Publisher
from services.aggregator.runtime import FederationRuntime
from services.aggregator.state_loader import StateLoader
from services.health import HealthServer
from services.settings import AggregatorSettings, PFISettings
from services.store.versions import CommitConflict, NotReplicated, VersionStore

log = logging.getLogger("pfi.aggregator.root")


@dataclass
class RootState:
    runtime: FederationRuntime
    own: dict[int, int]  # partition -> stored "own" offset
    safe: dict[int, int]  # partition -> stored "safe" offset
    acc: Accumulation = field(default_factory=Accumulation)
    first: dict[int, int] = field(default_factory=dict)  # partition -> offset of the first partial in acc
    since: float | None = None  # clock of the first partial in acc
    stats: dict[str, int] = field(default_factory=dict)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, root: Root) -> None:
        self.root = root

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.root.forget("partitions revoked")

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.root.seek(list(assigned))


class Root:
    def __init__(
        self, settings: PFISettings, agg: AggregatorSettings, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.agg = agg
        self.registry = registry or CollectorRegistry()
        self.metrics = HierarchyMetrics(self.registry)
        self.instance = agg.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topic = settings.partials_topic
        self.redis = Redis.from_url(settings.redis())
        self.store = VersionStore(
            self.redis,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        self.pool = cpu_pool(agg)
        self.loader = StateLoader(self.store, settings, self.run_cpu)
        self.consumer = group_consumer(
            settings, agg, group_id=f"{agg.group_id}-root", client_id=self.instance, read_committed=True
        )
        self.producer = outbound_producer(settings, client_id=f"{self.instance}-out")
        self.publisher = Publisher(self.producer, settings, self.instance)
        self.states: dict[str, RootState] = {}
        self.runtimes: dict[str, FederationRuntime] = {}
        self.processed: dict[int, int] = {}
        self.generation = 0
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.health = HealthServer(self.registry, self.ready, agg.host, agg.port)
        self._last_poll = 0.0

    async def run_cpu(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def ready(self) -> tuple[bool, dict[str, str]]:
        recent = time.monotonic() - self._last_poll < max(30.0, self.agg.max_poll_interval_ms / 1000)
        ok = self.started.is_set() and recent
        return ok, {"kafka": "ok" if ok else "not polling"}

    # -- partitions -------------------------------------------------------------------------
    def forget(self, why: str) -> None:
        """Drop every accumulation (disposable: replayed from the stored offsets)."""
        if self.states:
            log.info("root dropping %d federation(s): %s", len(self.states), why)
        self.states, self.runtimes, self.processed = {}, {}, {}
        self.generation += 1

    async def seek(self, assigned: list[TopicPartition]) -> None:
        """Seek each partition to the largest ``safe`` offset any federation stored for it."""
        mine = {tp.partition for tp in assigned}
        marks: dict[int, int] = {}
        for fed in await self.store.list_federations():
            stored = await self.store.get_offsets(fed)
            for p in mine:
                value = stored.get(safe_field(self.topic, p))
                if value is not None:
                    marks[p] = max(marks.get(p, 0), value)
        beginnings = await self.consumer.beginning_offsets(assigned) if assigned else {}
        for tp in assigned:
            position = max(marks.get(tp.partition, 0), beginnings.get(tp, 0))
            self.consumer.seek(tp, position)
            self.processed[tp.partition] = position
        self.metrics.assigned.set(len(assigned))
        log.info("assigned partitions %s at %s", sorted(mine), self.processed)

    async def resync(self, why: str) -> None:
        self.forget(why)
        await self.seek(list(self.consumer.assignment()))

    async def recover(self) -> None:
        """After a failed poll cycle: replay from the stored offsets (a failure: retried next cycle)."""
        try:
            await self.resync("poll failure")
        except Exception as err:
            log.warning("root resync failed: %s", err)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.health.start()
        await self.redis.ping()
        await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        self.started.set()
        log.info("root %s consuming %s (metrics on :%s)", self.instance, self.topic, self.health.port)

    async def run(self) -> None:
        await self.start()
        try:
            await poll_until_stopped(
                "root", self.stopping, self.poll_once, self.recover, self.metrics.failures, log
            )
        finally:
            try:
                async with asyncio.timeout(self.agg.shutdown_timeout_s):
                    await self.consumer.stop()
                    await self.producer.stop()
            except Exception as err:
                log.warning("root shutdown incomplete: %s", err)
            await self.health.stop()
            await self.redis.aclose()
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def poll_once(self) -> None:
        batch = await self.consumer.getmany(timeout_ms=self.agg.poll_timeout_ms)
        self._last_poll = time.monotonic()
        generation = self.generation
        for tp, records in batch.items():
            for record in records:
                if self.generation != generation or self.stopping.is_set():
                    return
                await self.handle(tp.partition, record)
                if self.generation == generation:
                    self.processed[tp.partition] = record.offset + 1
        for name, state in list(self.states.items()):
            agg = state.runtime.spec.aggregation
            due = state.since is not None and time.monotonic() - state.since >= agg.flush_timeout_s
            if due and state.acc.count >= agg.flush_min_updates and self.generation == generation:
                await self.flush(name, None)
        for name, state in self.states.items():
            self.metrics.root_pending.labels(name).set(state.acc.count)

    async def state_of(self, name: str) -> RootState | None:
        state = self.states.get(name)
        if state is not None:
            return state
        runtime = await self.loader.runtime(self.runtimes, name)
        if runtime is None:
            return None
        stored = await self.store.get_offsets(name)
        own: dict[int, int] = {}
        safe: dict[int, int] = {}
        for fld, value in stored.items():
            head, _, rest = fld.rpartition(":")
            if fld.startswith(f"{self.topic}:") and rest.isdigit() and head == self.topic:
                own[int(rest)] = value
            elif fld.startswith(f"{self.topic}:") and fld.endswith(":wm"):
                number = fld[len(self.topic) + 1 : -3]
                if number.isdigit():
                    safe[int(number)] = value
        state = self.states[name] = RootState(runtime, own, safe)
        return state

    async def handle(self, partition: int, record: ConsumerRecord[Any, Any]) -> None:
        name = (record.key or b"").decode("utf-8", "replace")
        state = await self.state_of(name) if name else None
        if state is None:
            self.metrics.partials_refused.labels("unknown", "unknown_federation").inc()
            return
        if record.offset < state.own.get(partition, 0):
            return  # in a version already
        try:
            partial: Partial = await self.run_cpu(
                decode_partial, record.value or b"", max_bytes=self.settings.kafka_max_message_bytes * 2
            )
            self.check(state, partial)
        except PartialRejected as err:
            self.metrics.partials_refused.labels(name, "malformed").inc()
            log.warning("root refused a partial of %s at %s:%s: %s", name, partition, record.offset, err)
            return
        members = sorted({(c.client_id, c.update_id) for c in partial.contributions})
        seen = await self.store.are_seen([(name, c, u) for c, u in members])
        pending = state.acc.members()
        repeated = [(m, "in a version" if s else "accumulated") for m, s in zip(members, seen, strict=True)
                    if s or m in pending]  # fmt: skip
        if repeated:
            self.metrics.partials_refused.labels(name, "duplicate").inc()
            state.stats["rejected:partial_duplicate"] = (
                state.stats.get("rejected:partial_duplicate", 0) + partial.count
            )
            log.warning(
                "root refused partial %s of %s at %s:%s (%d update(s)): it repeats aggregated updates %s",
                partial.partial_id,
                name,
                partition,
                record.offset,
                partial.count,
                repeated[:5],
            )
            return
        limit = state.runtime.spec.aggregation.max_client_updates
        if state.acc.count and any(
            sum(1 for c in state.acc.contributions if c.client_id == client) + 1 > limit
            for client in partial.clients()
        ):
            await self.flush(name, (partition, record.offset))  # one update per client per version
            state = self.states.get(name)
            if state is None:
                return
        state.acc.fold(partial)
        state.first.setdefault(partition, record.offset)
        if state.since is None:
            state.since = time.monotonic()
        self.metrics.partials_folded.labels(name).inc()
        self.metrics.root_last_fold.set_to_current_time()
        if record.timestamp:
            self.metrics.partial_lag.observe(max(0.0, time.time() - record.timestamp / 1000))
        if state.acc.count >= state.runtime.spec.aggregation.buffer_size:
            await self.flush(name, (partition, record.offset + 1))

    def check(self, state: RootState, partial: Partial) -> None:
        runtime = state.runtime
        if partial.federation != runtime.name or partial.spec_fingerprint != runtime.fingerprint:
            raise PartialRejected("the partial is for another federation or spec")
        for group in partial.groups.values():
            for key, tensor in group.weighted_sum.items():
                ref = runtime.global_state.get(key)
                if ref is None or ref.shape != tensor.shape:
                    raise PartialRejected(f"tensor {key!r} does not fit the federation's adapter")

    async def flush(self, name: str, upto: tuple[int, int] | None) -> None:
        """Commit the accumulation as a version. ``upto``: (partition, offset) where the next unprocessed
        partial of this partition starts (the offsets stored lie there, not past it)."""
        state = self.states[name]
        runtime = state.runtime
        started = time.perf_counter()
        stale = stale_bases(state.acc.groups, runtime.lineage)
        stats = dict(state.stats)
        if stale:
            keep = Accumulation()
            keep.groups = {b: g for b, g in state.acc.groups.items() if b not in stale}
            keep.contributions = [c for c in state.acc.contributions if c.base_version not in stale]
            keep.partial_ids = state.acc.partial_ids
            dropped = state.acc.count - keep.count
            stats["rejected:too_stale"] = stats.get("rejected:too_stale", 0) + dropped
            self.metrics.root_stale_dropped.labels(name).inc(dropped)
            state.acc = keep
        processed = dict(self.processed)
        if upto is not None:
            processed[upto[0]] = upto[1]
        offsets: dict[str, int] = {}
        for p in set(state.first) | set(state.own):
            if p in processed:
                offsets[own_field(self.topic, p)] = max(processed[p], state.own.get(p, 0))
        for p, position in processed.items():
            pending = [s.first[p] for n, s in self.states.items() if n != name and p in s.first]
            offsets[safe_field(self.topic, p)] = max(min([position, *pending]), state.safe.get(p, 0))
        if not state.acc.contributions:
            await self.store.commit_progress(name, runtime.latest, offsets, stats)
            self._advance(state, offsets)
            return
        result, encoded = await self.run_cpu(
            fold_and_encode,
            runtime.global_state,
            state.acc,
            runtime.spec.aggregation,
            runtime.lineage,
            runtime.opt_state,
        )
        commit, accountant, envelope = build_commit(
            runtime, state.acc, result, encoded, offsets, self.publisher, stats, started
        )
        replicated = True
        try:
            await self.store.commit_version(commit)
        except CommitConflict as err:
            await self.resync(f"{name} moved under us ({err})")
            return
        except NotReplicated:
            replicated = False
        version = commit.version
        runtime.apply(result, version)
        runtime.accountant = accountant  # type: ignore[assignment]
        self.metrics.root_versions.labels(name).inc()
        self.metrics.root_updates.labels(name).inc(state.acc.count)
        log.info(
            "%s v%d <- %d update(s) in %d partial(s)",
            name,
            version,
            state.acc.count,
            len(state.acc.partial_ids),
        )
        self._advance(state, offsets)
        if replicated:
            await self.publisher.announce(envelope)  # type: ignore[arg-type]

    def _advance(self, state: RootState, offsets: dict[str, int]) -> None:
        for fld, value in offsets.items():
            number = fld[len(self.topic) + 1 :]
            if number.endswith(":wm"):
                state.safe[int(number[:-3])] = value
            else:
                state.own[int(number)] = value
        state.acc = Accumulation()
        state.first = {}
        state.since = None
        state.stats = {}
