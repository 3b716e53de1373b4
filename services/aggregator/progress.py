"""Partitions, durable progress and watermarks of the aggregator (the exactly-once bookkeeping).

Partition watermarks (the seek positions) are a lower bound of everything not yet durable, raised only
after the Kafka group commit succeeded (so a zombie that lost its partitions cannot raise them). They
are stored per federation, in its slot (see :mod:`services.store.versions`): the seek position of a
partition is the minimum over the federations. On a rebalance, a Redis outage or a failed poll cycle the
in-memory state is dropped (:meth:`Progress.forget_state`) and the consumer seeks back to the
watermarks: the state is disposable, a replay never double-counts (see :mod:`services.aggregator.runtime`).
"""

from __future__ import annotations

import logging
import time

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from services.aggregator.core import AggregatorCore
from services.aggregator.runtime import FederationRuntime
from services.store.versions import CommitConflict

log = logging.getLogger("pfi.aggregator")


class Progress(AggregatorCore):
    """Seeks, drops and replays; makes rejections and positions durable; raises the watermarks."""

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

    # -- durable progress ---------------------------------------------------------------------
    async def set_live(self, runtime: FederationRuntime) -> None:
        """Refresh the informational ``live`` hash (buffered updates) after a durable commit."""
        await self.store.set_live(
            runtime.name,
            {"buffered": len(runtime.buffer), "instance": self.instance, "updated_at": time.time()},
        )

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
