"""``pfi aggregator``: consume adapter updates, validate, buffer, merge into versioned global adapters.

One asyncio task runs the consumer loop; decoding, validation and tensor math run in worker threads.
Every state change of a federation happens on that task, so no locks are needed. Exactly-once is
explained in :mod:`services.aggregator.runtime`; partition watermarks (the seek positions) are a lower
bound of everything not yet durable, raised only after the Kafka group commit succeeded (so a
zombie that lost its partitions cannot raise them). They are stored per federation, in its slot (see
:mod:`services.store.versions`): the seek position of a partition is the minimum over the federations.

No message can stop the process (issue 12): see :mod:`services.aggregator.intake`; a failure outside a
message (Kafka, Redis) drops the in-memory state and replays from the watermarks, backing off, instead
of exiting.

:class:`Aggregator` is built in layers, one file per seam (see :mod:`services.aggregator.core`): the
state (:mod:`.core`), partitions, progress and watermarks (:mod:`.progress`), versions
(:mod:`.flushing`), chunk and update intake (:mod:`.intake`), and here the lifecycle and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable

from aiokafka import ConsumerRebalanceListener, TopicPartition
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.chunking import ReassemblyBudget
from schemas.errors import PFIError
from services.aggregator.batch import BatchPreparer
from services.aggregator.connections import group_consumer, outbound_producer
from services.aggregator.core import cpu_pool
from services.aggregator.intake import Intake
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.publisher import Publisher
from services.aggregator.quality import QualityMonitor
from services.aggregator.rejects import Rejections
from services.aggregator.state_loader import StateLoader
from services.aggregator.versioning import VersionWriter
from services.health import HealthServer
from services.identity.keys import FederationKeys
from services.settings import AggregatorSettings, PFISettings
from services.store.versions import VersionStore

__all__ = ["Aggregator", "cpu_pool"]

log = logging.getLogger("pfi.aggregator")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Aggregator) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.owner.forget_state("partitions revoked")

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.owner.seek_to_watermarks(list(assigned))


class Aggregator(Intake):
    """The aggregator service: its state, its lifecycle and the consumer loop (the rest: its bases)."""

    def __init__(
        self, settings: PFISettings, agg: AggregatorSettings, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.agg = agg
        self.registry = registry or CollectorRegistry()
        self.metrics = AggregatorMetrics(self.registry)
        self.quality = QualityMonitor(self.registry)
        self.instance = agg.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topic = settings.updates_topic
        self.redis = Redis.from_url(settings.redis())
        self.store = VersionStore(
            self.redis,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        self.keys = FederationKeys()
        self.pool = cpu_pool(agg)
        self.budget = ReassemblyBudget(settings.max_inflight_chunk_bytes)  # one bound for every federation
        self.loader = StateLoader(
            self.store,
            settings,
            self.run_cpu,
            budget=self.budget,
            on_unavailable=lambda fed: self.metrics.federations_unavailable.labels(fed).inc(),
        )
        self.consumer = group_consumer(settings, agg, group_id=agg.group_id, client_id=self.instance)
        self.producer = outbound_producer(settings, client_id=f"{self.instance}-out")
        self.publisher = Publisher(self.producer, settings, self.instance)
        self.rejections = Rejections(self.publisher, self.metrics, self.topic)
        self.preparer = BatchPreparer(
            self.loader, self.store, self.keys, self.redis, settings, self.run_cpu, self.metrics.in_flight
        )
        self.writer = VersionWriter(self.store, self.publisher, self.metrics, self.run_cpu, self.topic)
        self.runtimes = {}
        self.processed = {}  # partition -> next offset to process
        self.generation = 0
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.health = HealthServer(self.registry, self.ready, agg.host, agg.port)
        self._last_progress = 0.0
        self._last_poll = 0.0
        self._live_due = set()
        self._marked = {}  # federation -> partitions it has a watermark on (see core.AggregatorCore)
        self._wm_written = {}  # (federation, partition) -> last raised to

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.health.start()
        await self.redis.ping()
        await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        self.started.set()
        log.info("aggregator %s consuming %s (metrics on :%s)", self.instance, self.topic, self.health.port)

    async def run(self) -> None:
        await self.start()
        try:
            failures = 0
            while not self.stopping.is_set():
                try:
                    await self.poll_once()
                    failures = 0
                except RedisError as err:  # the store is down: wait for it, then replay (like a crash)
                    await self.wait_for_store(err)
                except Exception as err:  # never exit for one failure (Kafka, a bug): replay, backing off
                    failures += 1
                    await self.recover(err, failures)
        finally:
            await self.shutdown()

    async def wait_for_store(self, err: RedisError) -> None:
        """Redis failed mid-poll: the in-memory state is disposable and Redis commits are atomic, so
        drop the state, wait (backing off) until Redis answers, then seek to its watermarks."""
        self.metrics.store_outages.inc()
        log.warning("Redis failed (%s): dropping in-memory state until it answers again", err)
        self.forget_state("Redis outage")
        delay = 0.25
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            try:
                await self.redis.ping()
                await self.resync("Redis answers again")
                log.info("Redis answers again: replaying from the watermarks")
                return
            except RedisError as again:
                delay = min(delay * 2, 5.0)
                log.warning("Redis still failing (%s); next try in %.1fs", again, delay)

    async def recover(self, err: Exception, failures: int) -> None:
        """A poll cycle failed outside any one message (a Kafka error, a bug): drop the in-memory state
        (disposable), wait (backing off with consecutive failures) and replay from the watermarks."""
        self.metrics.poll_failures.inc()
        log.exception("poll cycle failed (%d in a row): dropping state and replaying", failures, exc_info=err)
        self.forget_state("poll failure")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), min(0.5 * 2 ** min(failures, 6), 30.0))
        if self.stopping.is_set():
            return
        try:
            await self.resync("after a poll failure")
        except Exception as again:  # next cycle tries again (and backs off further)
            log.warning("resync after a poll failure failed: %s", again)

    async def shutdown(self) -> None:
        """Stop consuming; record durable progress; never write a partial version."""
        try:
            async with asyncio.timeout(self.agg.shutdown_timeout_s):
                try:
                    await self.commit_progress()
                except (PFIError, OSError, RedisError) as err:
                    log.warning("final progress commit failed (replay will cover it): %s", err)
                await self.consumer.stop()
                await self.producer.stop()
        except TimeoutError:
            log.error("shutdown exceeded %.1fs; exiting anyway", self.agg.shutdown_timeout_s)
        finally:
            await self.health.stop()
            await self.redis.aclose()
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def ready(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        try:
            await self.redis.ping()
            checks["redis"] = "ok"
        except Exception as err:
            checks["redis"] = f"error: {err}"
        recent = time.monotonic() - self._last_poll < max(30.0, self.agg.max_poll_interval_ms / 1000)
        checks["kafka"] = "ok" if self.started.is_set() and recent else "not polling"
        return all(v == "ok" for v in checks.values()), checks

    # -- the loop ---------------------------------------------------------------------------------
    async def poll_once(self) -> None:
        batch = await self.consumer.getmany(timeout_ms=self.agg.poll_timeout_ms)
        self._last_poll = time.monotonic()
        generation = self.generation
        for tp, records in batch.items():
            if self.generation != generation or self.stopping.is_set():
                return  # a rebalance or resync happened: the rest will be re-fetched
            # Decodes, duplicate checks and validations of the batch, each in one hop (see batch.py);
            # the records are still handled one by one, in order.
            prepared = await self.preparer.prepare(self.runtimes, tp.partition, records)
            for record, ready in zip(records, prepared, strict=True):
                if self.generation != generation or self.stopping.is_set():
                    return  # a rebalance or resync happened: the rest will be re-fetched
                await self.handle(tp.partition, record, ready)
                if self.generation == generation:
                    self.processed[tp.partition] = record.offset + 1
        await self.flush_due()
        await self.refresh_live()
        if time.monotonic() - self._last_progress >= self.agg.progress_interval_s:
            await self.periodic()
        self.metrics.last_success_ts.set_to_current_time()
