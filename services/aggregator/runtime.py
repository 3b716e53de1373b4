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

**One update per client per buffer** (issue 12; ``max_client_updates``, default 1). An update of a client
that already has its share of the buffer is *parked*: kept in memory, in arrival order, and admitted to the
next buffer right after the flush, with its staleness recomputed against the version just made (refused
``too_stale`` & co. if it no longer fits). A client has at most ``max_client_updates`` parked updates, a
federation ``spec.aggregation.max_parked``; beyond that an update is refused with ``client_rate_limited``.
A parked update counts as buffered everywhere the bookkeeping looks: duplicates (``is_buffered``),
``first_pending`` and ``durable_offsets`` (its first position holds ``safe`` and the watermark back), so a
crash replays it like any buffered update: parked updates are not durable, and need not be. (Replay is
exact for what was in a version; a rate-limit or staleness refusal can differ on replay, as any refusal
that depends on the buffer or the version can: its DLQ record is at least once.)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch

from modeling.lora import StateDict
from schemas.chunking import Reassembler
from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, Envelope, FederationSpec, make_envelope
from services.aggregator.math.fedbuff import AggregationResult, BufferedUpdate, UpdateBuffer
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.validation import FederationView, ValidUpdate, staleness_of
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
    header: AdapterUpdate | None = None  # the update without its payload: to dead-letter it later


@dataclass(frozen=True)
class Refused:
    """An update refused after it was buffered or parked (too stale when a parked one is admitted, or
    isolated by a failed fold): the service dead-letters it (``Aggregator.flush``)."""

    error: RejectedInput
    envelope: Envelope[Any] | None
    position: Position


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
    buffered: dict[str, BufferedInfo] = field(default_factory=dict)  # update id -> where/what (parked too)
    parked: dict[str, ValidUpdate] = field(default_factory=dict)  # update id -> update, in arrival order
    parked_clients: Counter[str] = field(default_factory=Counter)  # client id -> its parked updates
    refused: list[Refused] = field(default_factory=list)  # to dead-letter (see ``take_refused``)
    taken_at: dict[str, float] = field(default_factory=dict)  # update id -> buffer time, of the taken buffer
    first_dirty: dict[int, int] = field(default_factory=dict)  # partition -> first offset not yet durable
    pending_stats: Counter[str] = field(default_factory=Counter)
    fingerprint: str = field(init=False)
    _shapes_cache: tuple[StateDict, Mapping[str, tuple[int, ...]]] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        agg = self.spec.aggregation
        self.buffer = UpdateBuffer(
            agg.buffer_size,
            agg.flush_timeout_s,
            clock=self.clock,
            min_updates=agg.flush_min_updates,
            max_per_client=agg.max_client_updates,
        )
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
            shapes=self._shapes(),
        )

    def _shapes(self) -> Mapping[str, tuple[int, ...]]:
        """The global's tensor shapes, computed once per global state (a view is made per poll batch and
        per update validated ahead of a commit: hundreds of tensors at SmolLM2 size)."""
        if self._shapes_cache is None or self._shapes_cache[0] is not self.global_state:
            shapes = MappingProxyType({k: tuple(v.shape) for k, v in self.global_state.items()})
            self._shapes_cache = (self.global_state, shapes)
        return self._shapes_cache[1]

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
        """Buffer a validated update, or park it when its client already has its share of the buffer (or
        parked updates: a client's updates keep their order); True when the buffer is full (flush now).
        Raises ``RejectedInput`` (``client_rate_limited``) when the client already has its share parked too,
        or the federation holds ``max_parked``."""
        update = valid.update
        client = update.client_id
        info = BufferedInfo(position, update.base_version, update.model_copy(update={"payload": b""}))
        if not self.buffer.has_room_for(client) or self.parked_clients[client] > 0:
            agg = self.spec.aggregation
            if self.parked_clients[client] >= agg.max_client_updates or len(self.parked) >= agg.max_parked:
                raise RejectedInput(
                    f"client {client!r} sends faster than versions are made: {agg.max_client_updates} "
                    f"update(s) per client per buffer and as many waiting for the next "
                    f"({len(self.parked)}/{agg.max_parked} waiting in the federation)",
                    reason=RejectReason.CLIENT_RATE_LIMITED,
                )
            self.buffered[update.update_id] = info
            self.parked[update.update_id] = valid
            self.parked_clients[client] += 1
            return False
        self.buffered[update.update_id] = info
        return self.buffer.add(_buffered(valid, valid.staleness))

    def is_buffered(self, update_id: str) -> bool:
        """Whether ``update_id`` is in the buffer or parked for the next one (a duplicate, if received)."""
        return update_id in self.buffered

    def admit_parked(self) -> None:
        """After a commit: move parked updates, oldest first, into the buffer until it is full (a client's
        beyond its share wait for the buffer after), each with its staleness recomputed against the new
        latest version; one that no longer fits is refused (queued in ``refused`` for the service to
        dead-letter, counted with the next commit)."""
        view: FederationView | None = None
        for update_id in list(self.parked):
            if self.buffer.full():
                return
            valid = self.parked[update_id]
            client = valid.update.client_id
            if not self.buffer.has_room_for(client):
                continue
            del self.parked[update_id]
            self.parked_clients[client] -= 1
            if self.parked_clients[client] <= 0:
                del self.parked_clients[client]
            view = view or self.view()
            try:
                staleness = staleness_of(valid.update, view)
            except RejectedInput as err:
                self._refuse(update_id, err)
                continue
            self.buffer.add(_buffered(valid, staleness))

    def _refuse(self, update_id: str, err: RejectedInput) -> None:
        info = self.buffered.pop(update_id)
        self.touch(*info.position)  # not durable until the next commit counts the rejection
        envelope = None if info.header is None else make_envelope(info.header, source="pfi-aggregator")
        self.refused.append(Refused(err, envelope, info.position))

    def take_refused(self) -> list[Refused]:
        out, self.refused = self.refused, []
        return out

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
        entries = self.buffer.take_entries()
        self.taken_at = {item.update_id: added_at for added_at, item in entries}
        return [(item, self.buffered.pop(item.update_id)) for _, item in entries]

    def restore_buffer(
        self, taken: list[tuple[BufferedUpdate, BufferedInfo]], refuse: Mapping[str, RejectedInput]
    ) -> None:
        """Undo :meth:`take_buffer` after a fold failure: the updates of ``refuse`` are refused (queued for
        the service to dead-letter), the others go back into the buffer with their original times."""
        now = self.clock()
        keep: list[tuple[float, BufferedUpdate]] = []
        for item, info in taken:
            self.buffered[item.update_id] = info
            if item.update_id in refuse:
                self._refuse(item.update_id, refuse[item.update_id])
            else:
                keep.append((self.taken_at.get(item.update_id, now), item))
        self.buffer.restore(keep)

    def apply(self, result: AggregationResult, version: int) -> None:
        """Adopt a committed version as the new latest."""
        max_depth = self.spec.aggregation.max_staleness
        self.lineage = {version: 0} | {v: d + 1 for v, d in self.lineage.items() if d + 1 <= max_depth}
        self.latest = version
        self.head = version
        self.global_state = result.new_global
        self.opt_state = result.opt_state


def _buffered(valid: ValidUpdate, staleness: int) -> BufferedUpdate:
    update = valid.update
    return BufferedUpdate(
        update_id=update.update_id,
        client_id=update.client_id,
        delta=valid.delta,
        num_samples=update.num_samples,
        staleness=staleness,
        norm=valid.norm,  # validation's merge norm: the fold does not compute it again
    )


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
