"""In-memory state of one federation inside an aggregator, and the offset bookkeeping that makes
aggregation exactly-once.

The buffer is disposable: what makes a message durable is either a committed version (its update id
is in ``seen``) or a progress commit (its rejection counted). Per partition the federation stores two
offsets in Redis, written atomically with its versions/stats:

- ``safe``: every message of the federation below it is durable and can be skipped on replay;
- ``hwm`` (high-water mark): the consumer position at the last commit. Between ``safe`` and ``hwm`` lie
  messages that are durable *unless* still buffered/pending (a buffered update, a chunked upload not yet
  complete). On replay, that zone is reprocessed quietly: updates already in ``seen`` are skipped,
  rejections are neither dead-lettered nor counted again, the rest is re-buffered.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch

from schemas.chunking import Reassembler
from schemas.events import FederationSpec
from services.aggregator.math.fedbuff import AggregationResult, BufferedUpdate, UpdateBuffer
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.validation import FederationView, StateDict, ValidUpdate
from services.store.keys import hwm_field, offset_field

Position = tuple[int, int]  # (partition, offset)


class Zone(Enum):
    SKIP = "skip"  # durable: below the federation's safe offset
    REPLAY = "replay"  # between safe and hwm: reprocess quietly
    LIVE = "live"


@dataclass(frozen=True)
class BufferedInfo:
    position: Position  # of the update's first message (the first chunk, if chunked): replay starts there
    base_version: int


@dataclass
class PartitionMarks:
    safe: int = 0
    hwm: int = 0


@dataclass
class FederationRuntime:
    spec: FederationSpec
    latest: int
    head: int
    global_state: StateDict
    opt_state: ServerOptState
    accountant: RdpAccountant
    lineage: dict[int, int]
    marks: dict[int, PartitionMarks]
    reassembler: Reassembler[Position]
    clock: Callable[[], float] = time.monotonic
    buffer: UpdateBuffer = field(init=False)
    buffered: dict[str, BufferedInfo] = field(default_factory=dict)  # update id -> where/what
    first_dirty: dict[int, int] = field(default_factory=dict)  # partition -> first offset not yet durable
    pending_stats: Counter[str] = field(default_factory=Counter)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        agg = self.spec.aggregation
        self.buffer = UpdateBuffer(agg.buffer_size, agg.flush_timeout_s, clock=self.clock)
        self.fingerprint = self.spec.fingerprint()

    @property
    def name(self) -> str:
        return self.spec.name

    def view(self) -> FederationView:
        return FederationView(
            spec=self.spec,
            fingerprint=self.fingerprint,
            latest=self.latest,
            head=self.head,
            lineage=dict(self.lineage),
            shapes={k: tuple(v.shape) for k, v in self.global_state.items()},
        )

    def zone(self, partition: int, offset: int) -> Zone:
        marks = self.marks.get(partition)
        if marks is None:
            return Zone.LIVE
        if offset < marks.safe:
            return Zone.SKIP
        return Zone.REPLAY if offset < marks.hwm else Zone.LIVE

    def touch(self, partition: int, offset: int) -> None:
        """A message of this federation was processed; it is not durable until the next commit."""
        self.first_dirty.setdefault(partition, offset)

    def add(self, valid: ValidUpdate, position: Position) -> bool:
        """Buffer a validated update; True when the buffer is full (flush now)."""
        update = valid.update
        self.buffered[update.update_id] = BufferedInfo(position, update.base_version)
        return self.buffer.add(
            BufferedUpdate(
                update_id=update.update_id,
                client_id=update.client_id,
                delta=valid.delta,
                num_samples=update.num_samples,
                staleness=valid.staleness,
            )
        )

    def is_buffered(self, update_id: str) -> bool:
        return update_id in self.buffered

    def first_pending(self, partition: int) -> int | None:
        """Lowest offset on ``partition`` that a crash now would need to replay for this federation."""
        candidates = [i.position[1] for i in self.buffered.values() if i.position[0] == partition]
        chunk = self.reassembler.oldest_pending_position(lambda pos: pos[0] == partition)
        if chunk is not None:
            candidates.append(chunk[1])
        if partition in self.first_dirty:
            candidates.append(self.first_dirty[partition])
        return min(candidates) if candidates else None

    def partitions(self) -> set[int]:
        return set(self.marks) | set(self.first_dirty) | {i.position[0] for i in self.buffered.values()}

    def durable_offsets(self, processed: Mapping[int, int], topic: str) -> dict[str, int]:
        """Offsets to store with a commit made right now, given the consumer's processed positions.

        ``first_dirty`` is about to become durable, so only buffered updates and pending chunks hold
        ``safe`` back."""
        out: dict[str, int] = {}
        for p in self.partitions():
            if p not in processed:
                continue
            position = processed[p]
            pending = [i.position[1] for i in self.buffered.values() if i.position[0] == p]
            chunk = self.reassembler.oldest_pending_position(lambda pos, q=p: pos[0] == q)  # type: ignore[misc]
            if chunk is not None:
                pending.append(chunk[1])
            safe = min([position, *pending])
            old = self.marks.get(p, PartitionMarks())
            out[offset_field(topic, p)] = max(safe, old.safe)
            out[hwm_field(topic, p)] = max(position, old.hwm)
        return out

    def mark_durable(self, offsets: Mapping[str, int], topic: str) -> None:
        """After a successful commit: remember the stored marks, forget what became durable."""
        for p in self.partitions():
            safe = offsets.get(offset_field(topic, p))
            hwm = offsets.get(hwm_field(topic, p))
            if safe is not None and hwm is not None:
                self.marks[p] = PartitionMarks(safe, hwm)
        self.first_dirty.clear()
        self.pending_stats.clear()

    def is_dirty(self) -> bool:
        return bool(self.first_dirty) or bool(self.pending_stats)

    def take_buffer(self) -> list[tuple[BufferedUpdate, BufferedInfo]]:
        return [(item, self.buffered.pop(item.update_id)) for item in self.buffer.take()]

    def apply(self, result: AggregationResult, version: int) -> None:
        """Adopt a committed version as the new latest."""
        max_depth = self.spec.aggregation.max_staleness
        self.lineage = {version: 0} | {v: d + 1 for v, d in self.lineage.items() if d + 1 <= max_depth}
        self.latest = version
        self.head = version
        self.global_state = result.new_global
        self.opt_state = result.opt_state


def build_lineage(latest: int, parents: Mapping[int, int | None], max_depth: int) -> dict[int, int]:
    """Distances from ``latest`` along parent links, up to ``max_depth``."""
    lineage: dict[int, int] = {}
    current: int | None = latest
    depth = 0
    while current is not None and depth <= max_depth and current not in lineage:
        lineage[current] = depth
        current = parents.get(current)
        depth += 1
    return lineage


def empty_like(state: StateDict) -> StateDict:
    return {k: torch.zeros_like(v) for k, v in state.items()}
