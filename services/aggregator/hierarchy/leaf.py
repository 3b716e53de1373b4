"""``pfi aggregator --role leaf``: validate and bound the updates of a partition set, fold them into partials.

A leaf is a member of the consumer group ``<group_id>-leaf`` on the updates topic; the group gives each
leaf a partition set (no home-made membership). Updates of hierarchical federations are keyed
``federation/client`` (:func:`services.ingest.producer.update_key`), so every chunk of an upload and every
upload of a client land on one partition and one leaf. A leaf skips messages keyed by a federation alone
(a single federation's, counted ``pfi_hierarchy_leaf_foreign_messages_total``) and a single aggregator skips
those keyed ``federation/client`` (``pfi_aggregator_hierarchical_messages_skipped_total``): leaves and single
aggregators can share one updates topic. Per partition, the leaf:

1. authenticates chunks and reassembles uploads, validates each update exactly as the single aggregator
   does (:func:`services.aggregator.batch.check_and_validate` against the federation's view: signature,
   fingerprint, base version, tensors, finiteness, norm) and refuses duplicates (``seen`` in Redis, and the
   updates this leaf already emitted);
2. bounds (clips) and folds each valid update into a partial grouped by base version
   (:class:`~.partial.PartialBuilder`), at most ``partial_max_updates`` and one update per client a partial;
3. every ``partial_interval_s`` (or when a partial is full) commits **one Kafka transaction** holding the
   partials (to the partials topic, keyed by federation) and the partition's consumed offset
   (``send_offsets_to_transaction``). Its transactional id is ``<group>-<topic>-<partition>``: the leaf that
   gets the partition next initialises the same id, which aborts and fences a zombie's transaction.

**Exactly once, updates -> partials.** The committed offset is ``safe`` = the first message not yet in a
committed partial (an incomplete chunked upload holds it back); the offset's metadata holds ``hwm``, the
position the transaction covered. After a crash or a rebalance the partition is re-read from ``safe``; in
``[safe, hwm)`` (the replay zone) an update that completes there was in a committed partial and is skipped
(remembered for the dedupe), a chunk of an upload that began below ``safe`` belongs to such an update and is
skipped, and nothing is dead-lettered twice. The root reads partials ``read_committed``: an aborted
transaction's partial is never folded.

The parts: :mod:`.leaf_core` (clients, state, dead letters), :mod:`.leaf_intake` (one record into a
partial); here, the partitions, the poll loop and the transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas.errors import RejectedInput
from services.aggregator.batch import decode_frames
from services.aggregator.hierarchy.codec import encode_partial
from services.aggregator.hierarchy.leaf_intake import LeafIntake
from services.aggregator.hierarchy.partial import Partial
from services.aggregator.hierarchy.partitions import TRANSACTION_TIMEOUT_MS, open_partition
from services.aggregator.hierarchy.poll_loop import poll_until_stopped

log = logging.getLogger("pfi.aggregator.leaf")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, leaf: Leaf) -> None:
        self.leaf = leaf

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.leaf.drop([tp.partition for tp in revoked], "revoked")

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.leaf.take(list(assigned))


class Leaf(LeafIntake):
    """A leaf: owns a partition set of the updates topic, emits its partials transactionally."""

    # -- partitions -------------------------------------------------------------------------
    async def take(self, assigned: list[TopicPartition]) -> None:
        """Fence the previous owner (init the partition's transactional id), then seek to the committed
        offset and read the replay zone's end from its metadata."""
        await self.drop([tp.partition for tp in assigned if tp.partition in self.parts], "taken again")
        for tp in assigned:
            self.parts[tp.partition] = await open_partition(
                self.consumer, self.settings, tp, f"{self.group}-{self.topic}-{tp.partition}", self.instance
            )
        self.metrics.assigned.set(len(self.parts))
        log.info(
            "assigned partitions %s at %s",
            sorted(tp.partition for tp in assigned),
            {p: (s.processed, s.hwm) for p, s in self.parts.items()},
        )

    async def drop(self, partitions: list[int], why: str) -> None:
        self.generation += 1
        for p in partitions:
            state = self.parts.pop(p, None)
            if state is None:
                continue
            for reassembler in state.reassemblers.values():
                reassembler.close()
            try:
                await asyncio.wait_for(state.producer.stop(), 10)
            except Exception as err:  # a fenced or broken producer: nothing of it is committed
                log.warning("stopping the producer of partition %s: %s", p, err)
        self.metrics.assigned.set(len(self.parts))
        if partitions:
            log.info("dropped partitions %s (%s)", sorted(partitions), why)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.health.start()
        await self.redis.ping()
        await self.dlq.start()
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        self.started.set()
        log.info("leaf %s consuming %s (metrics on :%s)", self.instance, self.topic, self.health.port)

    async def run(self) -> None:
        await self.start()
        try:
            await poll_until_stopped(
                "leaf", self.stopping, self.poll_once, self.resync, self.metrics.failures, log
            )
        finally:
            await self.shutdown()

    async def resync(self) -> None:
        """Drop every partition's state and take the assignment again (seek to the committed offsets)."""
        assigned = list(self.consumer.assignment())
        await self.drop(list(self.parts), "resync")
        self.runtimes.clear()
        try:
            await self.take(assigned)
        except Exception as err:  # the next cycle tries again
            log.warning("leaf resync failed: %s", err)

    async def shutdown(self) -> None:
        try:
            async with asyncio.timeout(self.agg.shutdown_timeout_s):
                for p in list(self.parts):
                    await self.commit(p, force=True)
                await self.drop(list(self.parts), "shutdown")
                await self.consumer.stop()
                await self.dlq.stop()
        except Exception as err:  # what is not committed is replayed by the next owner
            log.warning("leaf shutdown incomplete: %s", err)
        finally:
            await self.health.stop()
            await self.redis.aclose()
            self.pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop ---------------------------------------------------------------------------
    async def poll_once(self) -> None:
        batch = await self.consumer.getmany(timeout_ms=self.agg.poll_timeout_ms)
        self._last_poll = time.monotonic()
        generation = self.generation
        await self.refresh_views()
        for tp, records in batch.items():
            # One worker-thread hop decodes the partition's whole batch, one Redis round trip answers
            # ``seen`` for its whole updates; the records are then handled one by one, in order.
            decoded = await self.run_cpu(
                decode_frames, [r.value or b"" for r in records], self.settings.max_update_bytes
            )
            self._seen_hint = await self._prefetch_seen(decoded)
            for record, ready in zip(records, decoded, strict=True):
                if self.generation != generation or self.stopping.is_set():
                    return
                state = self.parts.get(tp.partition)
                if state is None or record.offset < state.processed:
                    continue
                await self.handle(tp.partition, state, record, ready)
                state.processed = record.offset + 1
            self._seen_hint = {}
        for p in list(self.parts):
            if self.generation != generation:
                return
            await self.commit(p)

    async def refresh_views(self) -> None:
        """Reload a federation whose versions moved (the root committed): staleness is checked against it."""
        for name, runtime in list(self.runtimes.items()):
            if await self.store.pointers(name) != (runtime.latest, runtime.head):
                del self.runtimes[name]

    async def commit(self, partition: int, *, force: bool = False) -> None:
        """One transaction: the partition's partials and its consumed offset (``safe``, metadata ``hwm``)."""
        state = self.parts.get(partition)
        if state is None:
            return
        due = time.monotonic() - state.last_commit >= self.agg.partial_interval_s
        if not (state.closed or force or due):
            return
        for name, reassembler in state.reassemblers.items():
            for dropped in reassembler.expire():  # an incomplete upload must not hold ``safe`` back forever
                pos = dropped.first_position
                if pos is not None and pos[1] >= state.hwm:
                    err = RejectedInput(
                        f"chunked upload expired with {dropped.received}/{dropped.count} chunks",
                        reason=dropped.reason,
                    )
                    await self.reject(name, err, None, partition, pos[1])
        for name in list(state.builders):
            self.close(name, state)
        safe = state.safe()
        if not state.closed and safe == state.committed and state.processed == state.hwm:
            state.last_commit = time.monotonic()
            return
        partials = state.closed
        encoded = [await self.run_cpu(encode_partial, p) for p in partials]
        producer = state.producer
        tp = TopicPartition(self.topic, partition)
        try:
            # A transaction that does not end in time is a failure: the cycle replays from the last commit
            # with fresh producers (whose initialisation aborts the open transaction).
            async with asyncio.timeout(TRANSACTION_TIMEOUT_MS / 2000):
                await self._transaction(producer, partials, encoded, tp, safe, state.processed)
        except Exception:
            self.metrics.transactions.labels("failed").inc()
            log.exception("leaf transaction of partition %s failed", partition)
            raise  # the cycle fails: the state is dropped and replayed from the last commit
        self.metrics.transactions.labels("committed").inc()
        self.metrics.leaf_last_commit.set_to_current_time()
        for partial, value in zip(partials, encoded, strict=True):
            self.metrics.partials_emitted.labels(partial.federation).inc()
            self.metrics.partial_updates.observe(partial.count)
            self.metrics.partial_bytes.observe(len(value))
        state.closed = []
        state.committed = safe
        state.hwm = max(state.hwm, state.processed)
        state.last_commit = time.monotonic()

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        partials: list[Partial],
        encoded: list[bytes],
        tp: TopicPartition,
        safe: int,
        processed: int,
    ) -> None:
        await producer.begin_transaction()
        try:
            for partial, value in zip(partials, encoded, strict=True):
                await producer.send(self.settings.partials_topic, value, key=partial.federation.encode())
            metadata = json.dumps({"hwm": processed})
            await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(safe, metadata)}, self.group)
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.abort_transaction(), 5)
            raise
