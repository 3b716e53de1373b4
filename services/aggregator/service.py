"""``pfi aggregator``: consume adapter updates, validate, buffer, merge into versioned global adapters.

One asyncio task runs the consumer loop; decoding, validation and tensor math run in worker threads.
Every state change of a federation happens on that task, so no locks are needed. Exactly-once is
explained in :mod:`services.aggregator.runtime`; partition watermarks (the seek positions) are a lower
bound of everything not yet durable, raised only after the Kafka group commit succeeded (so a
zombie that lost its partitions cannot raise them). They are stored per federation, in its slot (see
:mod:`services.store.versions`): the seek position of a partition is the minimum over the federations.

No message can stop the process (issue 12): chunks are authenticated (their client's key in that
federation's registry) before the reassembler stores them; uploads are bounded per client and by one
process-wide :class:`~schemas.chunking.ReassemblyBudget`; a federation that cannot be loaded makes its
messages dead-letter (``federation_unavailable``); any other unexpected failure handling one message is
logged and dead-lettered (``internal_error``); a failure outside a message (Kafka, Redis) drops the
in-memory state and replays from the watermarks, backing off, instead of exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.chunking import ReassemblyBudget
from schemas.errors import PFIError, RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame
from services.aggregator.batch import BatchPreparer, Prepared, add_chunk, check_and_validate, key_text
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.publisher import Publisher
from services.aggregator.rejects import Rejections
from services.aggregator.runtime import FederationRuntime, Position, Zone
from services.aggregator.state_loader import FederationUnavailable, StateLoader
from services.aggregator.versioning import PoisonedUpdates, VersionWriter
from services.health import HealthServer
from services.identity.keys import FederationKeys
from services.settings import AggregatorSettings, PFISettings
from services.stack.topics import consumer_limits, producer_limits
from services.store.versions import CommitConflict, VersionStore
from services.transport import kafka_kwargs

log = logging.getLogger("pfi.aggregator")
T = TypeVar("T")


def cpu_pool(agg: AggregatorSettings) -> ThreadPoolExecutor:
    """The worker threads of decoding, validation and the fold, each with ``agg.torch_threads`` intra-op
    threads. Torch's default (one OpenMP thread per core in every worker) makes each small tensor op a
    fork/join across cores: with two workers on two busy cores, validating a 32 MiB update took 10x
    longer than with one thread per worker (see bench/aggregator.py)."""
    return ThreadPoolExecutor(
        max_workers=agg.worker_threads,
        thread_name_prefix="pfi-agg",
        initializer=_init_worker,
        initargs=(agg.torch_threads,),
    )


def _init_worker(torch_threads: int) -> None:
    if torch_threads > 0:
        # OpenMP keeps the thread count per thread: this sets it for this worker (and, through torch's
        # global default, for threads that start torch later; the threads already running keep theirs).
        torch.set_num_threads(torch_threads)


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
        self.consumer = AIOKafkaConsumer(
            **kafka_kwargs(settings, "aggregator"),
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
            **kafka_kwargs(settings, "aggregator"),
            client_id=f"{self.instance}-out",
            acks="all",
            enable_idempotence=True,
            **producer_limits(settings),
        )
        self.publisher = Publisher(self.producer, settings, self.instance)
        self.rejections = Rejections(self.publisher, self.metrics, self.topic)
        self.preparer = BatchPreparer(
            self.loader, self.store, self.keys, self.redis, settings, self.run_cpu, self.metrics.in_flight
        )
        self.writer = VersionWriter(self.store, self.publisher, self.metrics, self.run_cpu, self.topic)
        self.runtimes: dict[str, FederationRuntime] = {}
        self.processed: dict[int, int] = {}  # partition -> next offset to process
        self.generation = 0
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.health = HealthServer(self.registry, self.ready, agg.host, agg.port)
        self._last_progress = 0.0
        self._last_poll = 0.0
        self._live_due: set[str] = set()
        # Federations with a watermark on an assigned partition (read at the seek), loaded or not: raising
        # the partition's seek position raises theirs (see raise_watermarks).
        self._marked: dict[str, set[int]] = {}
        self._wm_written: dict[tuple[str, int], int] = {}  # (federation, partition) -> last raised to

    # -- lifecycle ------------------------------------------------------------------------------
    async def run_cpu(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

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

    # -- rebalance --------------------------------------------------------------------------------
    def forget_state(self, why: str) -> None:
        """Drop every buffer and pending upload: they are disposable and will be replayed."""
        if self.runtimes:
            log.info("dropping in-memory state of %d federation(s): %s", len(self.runtimes), why)
        # New objects, not clear(): this runs in aiokafka's coordinator task while the poll task may be
        # inside a flush that computes the version's offsets from the old ``processed``; emptying that
        # mapping under it would commit the version without offsets (its updates then meet ``seen``
        # in the LIVE zone on replay and are dead-lettered as duplicates).
        dropped, self.runtimes = self.runtimes, {}
        for runtime in dropped.values():
            runtime.reassembler.close()  # its reservations go back to the process-wide budget
        self.processed = {}
        self._marked = {}
        self._wm_written = {}
        self.generation += 1
        self.metrics.consumer_lag.clear()  # partitions may have moved: no stale lag from a former owner
        for name in list(self.metrics.buffer_updates._metrics):
            self.metrics.buffer_updates.labels(*name).set(0)

    async def seek_to_watermarks(self, assigned: list[TopicPartition]) -> None:
        """Seek each partition to the minimum, over the federations with a mark on it, of their marks
        (a partition without any: its beginning)."""
        mine = {tp.partition for tp in assigned}
        by_fed = await self.store.federation_marks(self.topic)
        marks: dict[int, int] = {}
        for fed, partitions in by_fed.items():
            for partition, offset in partitions.items():
                if partition in mine:
                    marks[partition] = min(marks.get(partition, offset), offset)
                    self._marked.setdefault(fed, set()).add(partition)
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

    async def handle(
        self, partition: int, record: ConsumerRecord[Any, Any], ready: Prepared | None = None
    ) -> None:
        kind = "unknown"
        federation = key_text(record.key)
        try:
            runtime = await self.loader.runtime(self.runtimes, federation) if federation else None
        except FederationUnavailable as err:
            self.metrics.messages_received.labels(kind).inc()
            await self.rejections.reject(None, err, None, partition, record.offset, federation=federation)
            return
        zone = Zone.LIVE
        if runtime is not None:
            zone = runtime.zone(partition, record.offset)
            if zone is Zone.SKIP:
                self.metrics.replayed_skipped.inc()
                return
            runtime.touch(partition, record.offset)
        envelope: Envelope[Any] | None = None
        generation = self.generation
        try:
            # Digests are checked once, later: a chunk's by the reassembler, an update's payload with
            # its validation (see ``check_and_validate``). Hashing here too would read every byte twice.
            if ready is not None and (ready.envelope is not None or ready.error is not None):
                envelope = ready.decoded()  # decoded with its batch (raises what the decode raised)
            else:
                envelope = await self.run_cpu(
                    decode_frame,
                    record.value or b"",
                    max_frame_bytes=self.settings.max_update_bytes,
                    verify_digest=False,
                )
            assert envelope is not None
            data = envelope.data
            first = (partition, record.offset)  # of the update's first message (chunk)
            if isinstance(data, AdapterUpdateChunk):
                kind = "chunk"
                assembled = await self.on_chunk(
                    runtime, federation, envelope, (partition, record.offset), zone
                )
                if assembled is None:
                    return
                envelope, first = assembled
                ready = None  # prepared answers are about whole updates only
            elif isinstance(data, AdapterUpdate):
                kind = "whole"
            else:
                raise RejectedInput(
                    f"{envelope.type!r} does not belong on the updates topic",
                    reason=RejectReason.UNKNOWN_EVENT_TYPE,
                )
            self.metrics.update_bytes.observe(len(envelope.data.payload))
            await self.on_update(
                runtime, federation, envelope, (partition, record.offset), zone, first, ready
            )
        except RejectedInput as err:
            if zone is not Zone.REPLAY:
                await self.rejections.reject(runtime, err, envelope, partition, record.offset)
        except RedisError:
            raise  # the store: wait for it and replay (``run``)
        except Exception as err:
            # Last resort: a failure nobody foresaw must not take the process down, nor replay forever.
            self.metrics.internal_errors.inc()
            log.exception("internal error handling %s:%s; dead-lettering it", partition, record.offset)
            if self.generation != generation:
                return  # the state was dropped meanwhile: the message will be replayed
            if zone is not Zone.REPLAY:
                failure = RejectedInput(
                    f"internal error: {type(err).__name__}: {err}", reason=RejectReason.INTERNAL_ERROR
                )
                await self.rejections.reject(runtime, failure, envelope, partition, record.offset)
        finally:
            self.metrics.messages_received.labels(kind).inc()

    async def on_chunk(
        self,
        runtime: FederationRuntime | None,
        federation: str | None,
        envelope: Envelope[AdapterUpdateChunk],
        pos: Position,
        zone: Zone,
    ) -> tuple[Envelope[Any], Position] | None:
        """Authenticate a chunk and feed it to the reassembler; the whole update and its first chunk's
        position once complete."""
        chunk = envelope.data
        if runtime is None:
            raise RejectedInput(
                f"unknown federation {chunk.federation!r}", reason=RejectReason.UNKNOWN_FEDERATION
            )
        if chunk.federation != federation:
            raise RejectedInput(
                "message key does not match the chunk's federation", reason=RejectReason.SCHEMA_INVALID
            )
        if zone is Zone.REPLAY and await self.store.is_seen(runtime.name, chunk.client_id, chunk.update_id):
            # A chunk of an update already in a version: its first chunks may lie below ``safe`` (not
            # replayed), so feeding it would leave an upload that never completes (and expires to the DLQ).
            self.metrics.replayed_skipped.inc()
            return None
        started = runtime.reassembler.first_position_of(chunk)
        await self.keys.ensure(self.redis, runtime.name, chunk.client_id)
        # In a worker thread, with the signature check first and the decode of the whole frame once
        # complete: it hashes the chunk, and the whole frame once complete (tens of ms for a large
        # update), which would stall the event loop and the consumer's fetches. The reassembler is only
        # ever touched by this task, which waits.
        try:
            whole = await self.run_cpu(
                add_chunk,
                runtime.reassembler,
                envelope,
                self.keys.view(runtime.name),
                pos,
                self.settings.max_update_bytes,
            )
        finally:
            self._gauge_chunks()
        if whole is None:
            return None
        return whole, pos if started is None else min(started, pos)

    async def on_update(
        self,
        runtime: FederationRuntime | None,
        federation: str | None,
        envelope: Envelope[Any],
        pos: Position,
        zone: Zone,
        first: Position | None = None,
        ready: Prepared | None = None,
    ) -> None:
        """``pos``: the update's last message (the one being handled); ``first``: its first message. The
        buffer remembers ``first`` so that no offset stored (``safe``) or watermark passes an earlier chunk
        of a buffered update: a replay must re-read all of its chunks. ``ready``: what its poll batch
        prepared (a ``seen`` answer, a validation), used only where it equals what asking now gives."""
        update: AdapterUpdate = envelope.data
        if runtime is None:
            raise RejectedInput(
                f"unknown federation {update.federation!r}", reason=RejectReason.UNKNOWN_FEDERATION
            )
        if update.federation != federation:
            raise RejectedInput(
                "message key does not match the update's federation", reason=RejectReason.SCHEMA_INVALID
            )
        fed_metrics = self.metrics.of(runtime.name)
        fed_metrics.received.inc()
        fed_metrics.version.set(runtime.latest)  # also after a load or rollback
        # Another client's update with this id may be buffered (or parked): ids are deduplicated per
        # client, but the buffer is keyed by update id. Flush it out first (rare: ids are random). False:
        # the state was dropped meanwhile, and this message is replayed.
        if not await self._flush_out(runtime, update):
            return
        buffered = self._buffered_by(runtime, update)
        seen = ready.seen if ready is not None and ready.runtime is runtime else None
        if seen is None and not buffered:
            seen = await self.store.is_seen(runtime.name, update.client_id, update.update_id)
        if buffered or seen:
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
        valid = ready.validated(runtime) if ready is not None else None
        if valid is None:
            await self.keys.ensure(self.redis, runtime.name, update.client_id)
            self.metrics.in_flight.inc()
            try:
                valid = await self.run_cpu(
                    check_and_validate,
                    envelope,
                    runtime.view(),
                    self.keys.view(runtime.name),
                    max_decoded_bytes=self.settings.max_decoded_bytes,
                )
            finally:
                self.metrics.in_flight.dec()
        self.metrics.decode_seconds.observe(valid.decode_seconds)
        fed_metrics.staleness.observe(valid.staleness)
        loss = update.metrics.loss_after
        if loss is not None and math.isfinite(loss):
            fed_metrics.train_loss.observe(loss)
        fed_metrics.accepted.inc()
        full = runtime.add(valid, pos if first is None else first)
        fed_metrics.buffered.set(len(runtime.buffer))
        fed_metrics.capacity.set(runtime.spec.aggregation.buffer_size)
        if full:
            await self.flush(runtime, handled=pos)

    @staticmethod
    def _buffered_by(runtime: FederationRuntime, update: AdapterUpdate) -> bool:
        """Whether this client's update ``update.update_id`` is buffered or parked."""
        info = runtime.buffered.get(update.update_id)
        if info is None:
            return False
        return info.header is None or info.header.client_id == update.client_id

    async def _flush_out(self, runtime: FederationRuntime, update: AdapterUpdate) -> bool:
        """Flush until another client's update with ``update.update_id`` is no longer buffered or parked.
        False when the state was dropped meanwhile (a resync: the caller returns, replay follows)."""
        generation = self.generation
        for _ in range(1000):  # each flush commits the buffer; parked updates refill it: bounded anyway
            if not runtime.is_buffered(update.update_id) or self._buffered_by(runtime, update):
                return True
            before = len(runtime.buffered)
            await self.flush(runtime)
            if self.generation != generation or self.runtimes.get(runtime.name) is not runtime:
                return False
            if len(runtime.buffered) >= before:
                break  # no progress (a failed flush): refuse rather than spin
        if runtime.is_buffered(update.update_id) and not self._buffered_by(runtime, update):
            raise RejectedInput(
                f"update id {update.update_id!r} is being aggregated for another client; send it again",
                reason=RejectReason.DUPLICATE,
            )
        return True

    async def flush(self, runtime: FederationRuntime, handled: Position | None = None) -> None:
        """Commit the buffer as a new version. ``handled`` is the message that filled the buffer: this
        commit fully handles it, so the offsets stored with the version must lie past it (else a replay
        after a crash meets its update in ``seen`` and dead-letters it as a duplicate)."""
        processed = self.processed
        if handled is not None:
            partition, offset = handled
            processed = {**processed, partition: max(processed.get(partition, 0), offset + 1)}
        while True:  # more than once only after poisoned updates, or when parked updates refill the buffer
            try:
                version = await self.writer.flush(runtime, processed)
            except PoisonedUpdates as err:
                # --- issue 12 (helper D1): a deterministic fold failure. The writer isolated the culprits
                # (queued in runtime.refused, reason fold_failed) and put the rest back: dead-letter them,
                # flush the rest (if a version may be made of what is left), never replay the same buffer.
                self.metrics.flush_failures.labels(runtime.name).inc()
                log.warning("flush of %s: %s; dead-lettering and flushing the rest", runtime.name, err)
                await self.dead_letter_refused(runtime)
                if len(runtime.buffer) >= runtime.spec.aggregation.flush_min_updates:
                    continue
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
                    self._live_due.add(runtime.name)  # written once per poll cycle (see refresh_live)
                # issue 12 (D1): parked updates entered the new buffer; some may have been refused (too stale)
                await self.dead_letter_refused(runtime)
                if version is not None and runtime.buffer.full():
                    continue
            break
        self.metrics.buffer_updates.labels(runtime.name).set(len(runtime.buffer))

    async def dead_letter_refused(self, runtime: FederationRuntime) -> None:
        """Dead-letter updates refused after they were buffered or parked (issue 12, helper D1): a parked
        update too stale for the next buffer, or one whose fold failed. Counted with the next commit."""
        for refused in runtime.take_refused():
            partition, offset = refused.position
            await self.rejections.reject(runtime, refused.error, refused.envelope, partition, offset)

    async def set_live(self, runtime: FederationRuntime) -> None:
        """Refresh the informational ``live`` hash (buffered updates) after a durable commit."""
        await self.store.set_live(
            runtime.name,
            {"buffered": len(runtime.buffer), "instance": self.instance, "updated_at": time.time()},
        )

    async def refresh_live(self) -> None:
        """``set_live`` of the federations that committed in this poll cycle: one write per cycle, not
        per version (it is information only: the commit itself is what is durable)."""
        due, self._live_due = self._live_due, set()
        for name in due:
            if (runtime := self.runtimes.get(name)) is not None:
                await self.set_live(runtime)

    async def flush_due(self) -> None:
        for runtime in list(self.runtimes.values()):
            if runtime.buffer.due():
                await self.flush(runtime)

    # -- periodic work ----------------------------------------------------------------------------
    async def periodic(self) -> None:
        self._last_progress = time.monotonic()
        for runtime in list(self.runtimes.values()):
            for dropped in runtime.reassembler.expire():
                await self.rejections.expired(runtime, dropped)
        self._gauge_chunks()
        await self.commit_progress()
        await self.keys.refresh(self.redis, list(self.runtimes))  # rate-limited; reloads moved epochs only
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
        """Commit the partition positions to Kafka (fencing), then raise the federations' watermarks.

        Per federation and partition: its own first pending message, or the processed position when it
        has none (loaded federations, on the partitions they have messages or marks on), and the processed
        position for the federations known (from the seek) to have a mark on the partition but not loaded
        since: they have had no message there since the seek, which was at or below their mark."""
        processed = self.processed  # one generation's positions throughout (see forget_state)
        runtimes = self.runtimes
        marks: dict[int, int] = {}
        for partition, position in processed.items():
            pending = [o for r in runtimes.values() if (o := r.first_pending(partition)) is not None]
            marks[partition] = min([position, *pending])
        if not marks:
            return
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "") for p, o in marks.items()}
        try:
            await self.consumer.commit(offsets)  # fails for a zombie: generation fencing
        except Exception as err:
            log.warning("Kafka offset commit failed, watermarks not raised: %s", err)
            return
        by_fed: dict[str, dict[int, int]] = {}
        for fed, partitions in self._marked.items():
            by_fed[fed] = {p: processed[p] for p in partitions if p in processed}
        for fed, runtime in runtimes.items():
            own = by_fed.setdefault(fed, {})
            for p in runtime.partitions() | set(own):
                if p in processed:
                    first = runtime.first_pending(p)
                    own[p] = processed[p] if first is None else min(processed[p], first)
        by_fed = {
            fed: {p: o for p, o in parts.items() if self._wm_written.get((fed, p)) != o}
            for fed, parts in by_fed.items()
        }
        by_fed = {fed: parts for fed, parts in by_fed.items() if parts}
        if not by_fed:
            return
        await self.store.raise_watermarks(self.topic, by_fed)
        for fed, parts in by_fed.items():
            for p, o in parts.items():
                self._wm_written[(fed, p)] = o

    def _gauge_chunks(self) -> None:
        self.metrics.inflight_uploads.set(sum(r.reassembler.pending_uploads for r in self.runtimes.values()))
        self.metrics.inflight_chunk_bytes.set(
            sum(r.reassembler.pending_bytes for r in self.runtimes.values())
        )
        self.metrics.reassembly_reserved.set(self.budget.reserved)

    def _gauge_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(
                    max(0, high - self.processed.get(tp.partition, high))
                )
