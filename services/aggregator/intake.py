"""Intake of the aggregator: one message of the updates topic, a chunk or a whole update, into a buffer.

No message can stop the process (issue 12): chunks are authenticated (their client's key in that
federation's registry) before the reassembler stores them; uploads are bounded per client and by one
process-wide :class:`~schemas.chunking.ReassemblyBudget`; a federation that cannot be loaded makes its
messages dead-letter (``federation_unavailable``); any other unexpected failure handling one message is
logged and dead-lettered (``internal_error``). Replayed messages (``Zone.REPLAY``) that are already in a
version are skipped, never dead-lettered twice (see :mod:`services.aggregator.runtime`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from aiokafka.structs import ConsumerRecord
from redis.exceptions import RedisError

from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame
from services.aggregator.batch import Prepared, add_chunk, check_and_validate, key_text
from services.aggregator.flushing import Flushing
from services.aggregator.runtime import FederationRuntime, Position, Zone
from services.aggregator.state_loader import FederationUnavailable

log = logging.getLogger("pfi.aggregator")


class Intake(Flushing):
    """Handles each message: decode, authenticate, reassemble, deduplicate, validate, buffer."""

    async def handle(
        self, partition: int, record: ConsumerRecord[Any, Any], ready: Prepared | None = None
    ) -> None:
        kind = "unknown"
        federation = key_text(record.key)
        if federation is not None and "/" in federation:
            # Keyed ``federation/client``: a hierarchical federation's update; its leaves (their own
            # consumer group) aggregate it. Skipped, never dead-lettered: single and leaf groups can share
            # one updates topic (names never contain ``/``, so no single federation is keyed like this).
            self.metrics.hierarchical_skipped.inc()
            return
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
            chunked = False
            if isinstance(data, AdapterUpdateChunk):
                kind = "chunk"
                assembled = await self.on_chunk(
                    runtime, federation, envelope, (partition, record.offset), zone
                )
                if assembled is None:
                    return
                envelope, first = assembled
                chunked = True  # its payload: signed chunks of its own client, each hashed once
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
                runtime, federation, envelope, (partition, record.offset), zone, first, ready, chunked=chunked
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
        *,
        chunked: bool = False,
    ) -> None:
        """``pos``: the update's last message (the one being handled); ``first``: its first message. The
        buffer remembers ``first`` so that no offset stored (``safe``) or watermark passes an earlier chunk
        of a buffered update: a replay must re-read all of its chunks. ``ready``: what its poll batch
        prepared (a ``seen`` answer, a validation), used only where it equals what asking now gives.
        ``chunked``: reassembled by :func:`~services.aggregator.batch.add_chunk` (its payload is not hashed
        again)."""
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
                    payload_verified=chunked,
                )
            finally:
                self.metrics.in_flight.dec()
        self.metrics.decode_seconds.observe(valid.decode_seconds)
        fed_metrics.staleness.observe(valid.staleness)
        loss = update.metrics.loss_after
        if loss is not None and math.isfinite(loss):
            fed_metrics.train_loss.observe(loss)
        fed_metrics.accepted.inc()
        self.quality.observe(runtime.name, update.client_id, update.base_version, update.metrics)  # issue 16
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
