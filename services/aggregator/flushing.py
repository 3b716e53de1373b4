"""Versions of the aggregator: commit a full or timed-out buffer, dead-letter what its fold refused.

A commit writes the new version and the offsets its updates came from in one atomic step
(:class:`~services.aggregator.versioning.VersionWriter`); a failure never blames the message that filled
the buffer: a deterministic fold failure isolates and dead-letters the culprits (issue 12), anything else
drops the in-memory state and replays it from the watermarks.
"""

from __future__ import annotations

import asyncio
import logging

from services.aggregator.progress import Progress
from services.aggregator.runtime import FederationRuntime, Position
from services.aggregator.versioning import PoisonedUpdates
from services.store.versions import CommitConflict

log = logging.getLogger("pfi.aggregator")


class Flushing(Progress):
    """Commits buffers as versions."""

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
