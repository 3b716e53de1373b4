"""``pfi aggregator``: consume adapter updates, validate, buffer, merge into versioned global adapters.

One asyncio task runs the consumer loop; decoding, validation and tensor math run in worker threads.
Every state change of a federation happens on that task, so no locks are needed. Exactly-once is
explained in :mod:`services.aggregator.runtime`; partition watermarks (the seek positions) are a lower
bound of everything not yet durable, raised only after the Kafka group commit succeeded (so a
zombie that lost its partitions cannot raise them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from schemas.chunking import ExpiredUpload
from schemas.errors import PFIError, RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.publisher import Publisher
from services.aggregator.runtime import FederationRuntime, Position, Zone
from services.aggregator.state_loader import StateLoader
from services.aggregator.validation import validate_update
from services.aggregator.versioning import VersionWriter
from services.health import HealthServer
from services.keystore import ClientKeys
from services.settings import AggregatorSettings, PFISettings
from services.stack.topics import consumer_limits, producer_limits
from services.store.versions import CommitConflict, VersionStore

log = logging.getLogger("pfi.aggregator")
T = TypeVar("T")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Aggregator) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.owner.forget_state("partitions revoked")

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.owner.seek_to_watermarks(list(assigned))


class Aggregator:
    def __init__(
        self, settings: PFISettings, agg: AggregatorSettings, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.agg = agg
        self.registry = registry or CollectorRegistry()
        self.metrics = AggregatorMetrics(self.registry)
        self.instance = agg.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topic = settings.updates_topic
        self.redis = Redis.from_url(settings.redis())
        self.store = VersionStore(self.redis)
        self.keys = ClientKeys(settings)
        self.pool = ThreadPoolExecutor(max_workers=agg.worker_threads, thread_name_prefix="pfi-agg")
        self.loader = StateLoader(self.store, settings, self.run_cpu)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap(),
            group_id=agg.group_id,
            client_id=self.instance,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **consumer_limits(settings),
            max_poll_interval_ms=agg.max_poll_interval_ms,
            session_timeout_ms=agg.session_timeout_ms,
            heartbeat_interval_ms=agg.heartbeat_interval_ms,
            max_poll_records=agg.max_poll_records,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap(),
            client_id=f"{self.instance}-out",
            acks="all",
            enable_idempotence=True,
            **producer_limits(settings),
        )
        self.publisher = Publisher(self.producer, settings, self.instance)
        self.writer = VersionWriter(self.store, self.publisher, self.metrics, self.run_cpu, self.topic)
        self.runtimes: dict[str, FederationRuntime] = {}
        self.processed: dict[int, int] = {}  # partition -> next offset to process
        self.generation = 0
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.health = HealthServer(self.registry, self.ready, agg.host, agg.port)
        self._last_progress = 0.0
        self._last_poll = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    async def run_cpu(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def start(self) -> None:
        await self.health.start()
        await self.redis.ping()
        await self.keys.refresh(self.redis)
        await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        self.started.set()
        log.info("aggregator %s consuming %s (metrics on :%s)", self.instance, self.topic, self.health.port)

    async def run(self) -> None:
        await self.start()
        try:
            while not self.stopping.is_set():
                await self.poll_once()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop consuming; record durable progress; never write a partial version."""
        try:
            async with asyncio.timeout(self.agg.shutdown_timeout_s):
                try:
                    await self.commit_progress()
                except (PFIError, OSError) as err:
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

    # -- rebalance --------------------------------------------------------------------------------
    def forget_state(self, why: str) -> None:
        """Drop every buffer and pending upload: they are disposable and will be replayed."""
        if self.runtimes:
            log.info("dropping in-memory state of %d federation(s): %s", len(self.runtimes), why)
        # New objects, not clear(): this runs in aiokafka's coordinator task while the poll task may be
        # inside a flush that computes the version's offsets from the old ``processed``; emptying that
        # mapping under it would commit the version without offsets (its updates then meet ``seen``
        # in the LIVE zone on replay and are dead-lettered as duplicates).
        self.runtimes = {}
        self.processed = {}
        self.generation += 1
        self.metrics.consumer_lag.clear()  # partitions may have moved: no stale lag from a former owner
        for name in list(self.metrics.buffer_updates._metrics):
            self.metrics.buffer_updates.labels(*name).set(0)

    async def seek_to_watermarks(self, assigned: list[TopicPartition]) -> None:
        marks = await self.store.get_watermarks(self.topic)
        beginnings = await self.consumer.beginning_offsets(assigned) if assigned else {}
        for tp in assigned:
            position = max(marks.get(tp.partition, 0), beginnings.get(tp, 0))
            self.consumer.seek(tp, position)
            self.processed[tp.partition] = position
        self.metrics.assigned_partitions.set(len(assigned))
        log.info("assigned partitions %s at %s", sorted(tp.partition for tp in assigned), self.processed)

    async def resync(self, why: str) -> None:
        self.forget_state(why)
        await self.seek_to_watermarks(list(self.consumer.assignment()))

    # -- the loop ---------------------------------------------------------------------------------
    async def poll_once(self) -> None:
        batch = await self.consumer.getmany(timeout_ms=self.agg.poll_timeout_ms)
        self._last_poll = time.monotonic()
        generation = self.generation
        for tp, records in batch.items():
            for record in records:
                if self.generation != generation or self.stopping.is_set():
                    return  # a rebalance or resync happened: the rest will be re-fetched
                await self.handle(tp.partition, record)
                if self.generation == generation:
                    self.processed[tp.partition] = record.offset + 1
        await self.flush_due()
        if time.monotonic() - self._last_progress >= self.agg.progress_interval_s:
            await self.periodic()
        self.metrics.last_success_ts.set_to_current_time()

    async def handle(self, partition: int, record: ConsumerRecord[Any, Any]) -> None:
        kind = "unknown"
        federation = _key_text(record.key)
        runtime = await self.loader.runtime(self.runtimes, federation) if federation else None
        zone = Zone.LIVE
        if runtime is not None:
            zone = runtime.zone(partition, record.offset)
            if zone is Zone.SKIP:
                self.metrics.replayed_skipped.inc()
                return
            runtime.touch(partition, record.offset)
        envelope: Envelope[Any] | None = None
        try:
            envelope = await self.run_cpu(
                decode_frame, record.value or b"", max_frame_bytes=self.settings.max_update_bytes
            )
            data = envelope.data
            first = (partition, record.offset)  # of the update's first message (chunk)
            if isinstance(data, AdapterUpdateChunk):
                kind = "chunk"
                assembled = await self.on_chunk(runtime, federation, data, (partition, record.offset), zone)
                if assembled is None:
                    return
                envelope, first = assembled
            elif isinstance(data, AdapterUpdate):
                kind = "whole"
            else:
                raise RejectedInput(
                    f"{envelope.type!r} does not belong on the updates topic",
                    reason=RejectReason.UNKNOWN_EVENT_TYPE,
                )
            self.metrics.update_bytes.observe(len(envelope.data.payload))
            await self.on_update(runtime, federation, envelope, (partition, record.offset), zone, first)
        except RejectedInput as err:
            if zone is not Zone.REPLAY:
                await self.reject(runtime, err, envelope, partition, record)
        finally:
            self.metrics.messages_received.labels(kind).inc()

    async def on_chunk(
        self,
        runtime: FederationRuntime | None,
        federation: str | None,
        chunk: AdapterUpdateChunk,
        pos: Position,
        zone: Zone,
    ) -> tuple[Envelope[Any], Position] | None:
        """Feed a chunk to the reassembler; the whole update and its first chunk's position once complete."""
        if runtime is None:
            raise RejectedInput(
                f"unknown federation {chunk.federation!r}", reason=RejectReason.UNKNOWN_FEDERATION
            )
        if chunk.federation != federation:
            raise RejectedInput(
                "message key does not match the chunk's federation", reason=RejectReason.SCHEMA_INVALID
            )
        if zone is Zone.REPLAY and await self.store.is_seen(runtime.name, chunk.update_id):
            # A chunk of an update already in a version: its first chunks may lie below ``safe`` (not
            # replayed), so feeding it would leave an upload that never completes (and expires to the DLQ).
            self.metrics.replayed_skipped.inc()
            return None
        started = runtime.reassembler.first_position_of(chunk.federation, chunk.client_id, chunk.update_id)
        frame = runtime.reassembler.add(chunk, pos)
        for dropped in runtime.reassembler.drain_evicted():
            await self.reject_expired(runtime, dropped)
        self._gauge_chunks()
        if frame is None:
            return None
        envelope: Envelope[Any] = await self.run_cpu(
            decode_frame, frame, max_frame_bytes=self.settings.max_update_bytes, expected=AdapterUpdate
        )
        return envelope, pos if started is None else min(started, pos)

    async def on_update(
        self,
        runtime: FederationRuntime | None,
        federation: str | None,
        envelope: Envelope[Any],
        pos: Position,
        zone: Zone,
        first: Position | None = None,
    ) -> None:
        """``pos``: the update's last message (the one being handled); ``first``: its first message. The
        buffer remembers ``first`` so that no offset stored (``safe``) or watermark passes an earlier chunk
        of a buffered update: a replay must re-read all of its chunks."""
        update: AdapterUpdate = envelope.data
        if runtime is None:
            raise RejectedInput(
                f"unknown federation {update.federation!r}", reason=RejectReason.UNKNOWN_FEDERATION
            )
        if update.federation != federation:
            raise RejectedInput(
                "message key does not match the update's federation", reason=RejectReason.SCHEMA_INVALID
            )
        self.metrics.updates_received.labels(runtime.name).inc()
        self.metrics.global_version.labels(runtime.name).set(runtime.latest)  # also after a load or rollback
        buffered = runtime.is_buffered(update.update_id)
        if buffered or await self.store.is_seen(runtime.name, update.update_id):
            if zone is Zone.REPLAY:
                self.metrics.replayed_skipped.inc()
                return
            if not buffered and await self.store.pointers(runtime.name) != (runtime.latest, runtime.head):
                # Another owner committed this update after we loaded the federation (rebalance overlap):
                # our marks are stale, so "LIVE" is wrong. Reload and replay instead of dead-lettering.
                await self.resync(f"{runtime.name} moved under us (update {update.update_id} committed)")
                return
            raise RejectedInput(
                f"update {update.update_id!r} was already received", reason=RejectReason.DUPLICATE
            )
        await self.keys.ensure(self.redis, update.client_id)
        self.metrics.in_flight.inc()
        try:
            valid = await self.run_cpu(
                validate_update,
                envelope,
                runtime.view(),
                self.keys,
                max_decoded_bytes=self.settings.max_decoded_bytes,
            )
        finally:
            self.metrics.in_flight.dec()
        self.metrics.decode_seconds.observe(valid.decode_seconds)
        self.metrics.staleness.labels(runtime.name).observe(valid.staleness)
        loss = update.metrics.loss_after
        if loss is not None and math.isfinite(loss):
            self.metrics.client_train_loss.labels(runtime.name).observe(loss)
        self.metrics.updates_accepted.labels(runtime.name).inc()
        full = runtime.add(valid, pos if first is None else first)
        self.metrics.buffer_updates.labels(runtime.name).set(len(runtime.buffer))
        self.metrics.buffer_capacity.labels(runtime.name).set(runtime.spec.aggregation.buffer_size)
        if full:
            await self.flush(runtime, handled=pos)

    async def flush(self, runtime: FederationRuntime, handled: Position | None = None) -> None:
        """Commit the buffer as a new version. ``handled`` is the message that filled the buffer: this
        commit fully handles it, so the offsets stored with the version must lie past it (else a replay
        after a crash meets its update in ``seen`` and dead-letters it as a duplicate)."""
        processed = self.processed
        if handled is not None:
            partition, offset = handled
            processed = {**processed, partition: max(processed.get(partition, 0), offset + 1)}
        try:
            version = await self.writer.flush(runtime, processed)
        except CommitConflict as err:
            self.metrics.commit_conflicts.labels(runtime.name).inc()
            log.warning("federation %s moved under us (%s): reloading and replaying", runtime.name, err)
            await self.resync(f"commit conflict on {runtime.name}")
        except Exception:
            # An internal failure (encoding, Redis): never blame the message that filled the buffer.
            # The taken buffer is replayed after the resync, so nothing is lost.
            self.metrics.flush_failures.labels(runtime.name).inc()
            log.exception("flush of %s failed; dropping state and replaying", runtime.name)
            await asyncio.sleep(1.0)  # do not spin if the failure persists
            await self.resync(f"flush failure on {runtime.name}")
        else:
            if version is not None:
                await self.set_live(runtime)
        self.metrics.buffer_updates.labels(runtime.name).set(len(runtime.buffer))

    async def set_live(self, runtime: FederationRuntime) -> None:
        """Refresh the informational ``live`` hash (buffered updates) after a durable commit."""
        await self.store.set_live(
            runtime.name,
            {"buffered": len(runtime.buffer), "instance": self.instance, "updated_at": time.time()},
        )

    async def flush_due(self) -> None:
        for runtime in list(self.runtimes.values()):
            if runtime.buffer.due():
                await self.flush(runtime)

    # -- rejections -------------------------------------------------------------------------------
    async def reject(
        self,
        runtime: FederationRuntime | None,
        err: RejectedInput,
        envelope: Envelope[Any] | None,
        partition: int,
        record: ConsumerRecord[Any, Any],
    ) -> None:
        data = envelope.data if envelope is not None else None
        label = runtime.name if runtime is not None else "unknown"
        self.metrics.updates_rejected.labels(label, err.reason.value).inc()
        if runtime is not None:
            runtime.pending_stats["rejected_total"] += 1
            runtime.pending_stats[f"rejected:{err.reason.value}"] += 1
        log.info("rejected %s@%s:%s: %s (%s)", label, partition, record.offset, err.reason.value, err.message)
        await self.publisher.dead_letter(
            err.reason,
            err.message,
            federation=getattr(data, "federation", None) or (runtime.name if runtime else None),
            client_id=getattr(data, "client_id", None),
            update_id=getattr(data, "update_id", None),
            topic=self.topic,
            partition=partition,
            offset=record.offset,
            original_type=envelope.type if envelope is not None else None,
        )

    async def reject_expired(self, runtime: FederationRuntime, dropped: ExpiredUpload[Position]) -> None:
        why = "evicted (reassembly memory bound)" if dropped.evicted else "expired"
        self.metrics.updates_rejected.labels(runtime.name, dropped.reason.value).inc()
        runtime.pending_stats["rejected_total"] += 1
        runtime.pending_stats[f"rejected:{dropped.reason.value}"] += 1
        pos = dropped.first_position
        await self.publisher.dead_letter(
            dropped.reason,
            f"chunked upload {why} with {dropped.received}/{dropped.count} chunks",
            federation=dropped.federation,
            client_id=dropped.client_id,
            update_id=dropped.update_id,
            topic=self.topic,
            partition=pos[0] if pos else None,
            offset=pos[1] if pos else None,
            original_type=AdapterUpdateChunk.event_type(),
        )

    # -- periodic work ----------------------------------------------------------------------------
    async def periodic(self) -> None:
        self._last_progress = time.monotonic()
        for runtime in list(self.runtimes.values()):
            for dropped in runtime.reassembler.expire():
                await self.reject_expired(runtime, dropped)
        self._gauge_chunks()
        await self.commit_progress()
        await self.keys.refresh(self.redis, force=False)
        self._gauge_lag()

    async def commit_progress(self) -> None:
        """Make rejections and positions of every federation durable, then raise the watermarks."""
        processed = self.processed  # one generation's positions throughout (see forget_state)
        for runtime in list(self.runtimes.values()):
            offsets = runtime.durable_offsets(processed, self.topic)
            stale = any(
                runtime.marks.get(p) is None or runtime.marks[p].hwm < processed.get(p, 0)
                for p in runtime.partitions()
            )
            if not (runtime.is_dirty() or stale) or not offsets:
                continue
            try:
                await self.store.commit_progress(runtime.name, runtime.latest, offsets, runtime.pending_stats)
            except CommitConflict as err:
                self.metrics.commit_conflicts.labels(runtime.name).inc()
                await self.resync(f"progress conflict on {runtime.name}: {err}")
                return
            runtime.mark_durable(offsets, self.topic)
            await self.set_live(runtime)
        await self.raise_watermarks()

    async def raise_watermarks(self) -> None:
        marks: dict[int, int] = {}
        for partition, position in self.processed.items():
            pending = [o for r in self.runtimes.values() if (o := r.first_pending(partition)) is not None]
            marks[partition] = min([position, *pending])
        if not marks:
            return
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "") for p, o in marks.items()}
        try:
            await self.consumer.commit(offsets)  # fails for a zombie: generation fencing
        except Exception as err:
            log.warning("Kafka offset commit failed, watermarks not raised: %s", err)
            return
        await self.store.raise_watermarks(self.topic, marks)

    def _gauge_chunks(self) -> None:
        self.metrics.inflight_uploads.set(sum(r.reassembler.pending_uploads for r in self.runtimes.values()))
        self.metrics.inflight_chunk_bytes.set(
            sum(r.reassembler.pending_bytes for r in self.runtimes.values())
        )

    def _gauge_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(
                    max(0, high - self.processed.get(tp.partition, high))
                )


def _key_text(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None
