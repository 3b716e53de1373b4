"""Work done once per poll batch instead of once per message (see :class:`BatchPreparer`).

Per message the aggregator needs a frame decode (worker thread), a duplicate check (a Redis round trip)
and, for an update, its validation (worker thread). For small updates those hops and round trips cost
more than the work itself, so before a partition's records are handled one by one, the preparer:

1. decodes every frame of the batch in **one** worker-thread call;
2. checks the candidate updates against ``seen`` in **one** pipelined Redis round trip;
3. validates the candidates in **one** worker-thread call, against the federation's view of that moment.

Handling then stays strictly sequential (:meth:`Aggregator.handle`), in offset order, and only uses a
prepared answer where it is exactly what the sequential path would compute at the record's turn:

- a decode is a pure function of the record;
- a ``seen`` answer (per client and update id) is prefetched only for an update id that was neither
  buffered (by any client) nor met earlier in the batch for its client (as a whole update or a chunk):
  such a pair can only enter ``seen`` by a commit of ours that buffered it, which cannot happen before
  its turn. A commit by another owner races the same way as
  the sequential check did, and the commit script's fencing (``DUPLICATE``/``CONFLICT``) still refuses it;
- a successful validation is reused with its staleness recomputed when a version was committed in
  between (every other check is independent of the federation's version); a refused update is validated
  again at its turn (rare), so its reason is what the sequential path would give.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord
from prometheus_client import Gauge
from redis.asyncio import Redis

from schemas.chunking import Reassembler
from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame, verify_payload_digest
from schemas.signing import KeyStore, verify_chunk
from services.aggregator.runtime import FederationRuntime, Position, Zone
from services.aggregator.state_loader import FederationUnavailable, StateLoader
from services.aggregator.validation import FederationView, ValidUpdate, staleness_of, validate_update
from services.identity.keys import FederationKeys
from services.settings import PFISettings
from services.store.versions import VersionStore

RunCpu = Callable[..., Awaitable[Any]]
Outcome = tuple[Any, Exception | None]  # (result, or the exception that replaced it)

# Decoded updates validated ahead of their turn are held in memory at once: bound their payload bytes
# (the rest of the batch takes the sequential path), so that a batch of large unchunked updates does
# not hold many decoded deltas beside the FedBuff buffer.
MAX_PREVALIDATED_BYTES = 64 << 20


@dataclass
class Prepared:
    """What was computed ahead of one record's turn (``None`` fields: compute it at the turn)."""

    envelope: Envelope[Any] | None = None
    error: Exception | None = None  # the frame decode failed: raised at the record's turn
    runtime: FederationRuntime | None = None  # the runtime the answers below belong to
    seen: bool | None = None
    valid: ValidUpdate | None = None
    view: FederationView | None = None

    def decoded(self) -> Envelope[Any] | None:
        if self.error is not None:
            raise self.error
        return self.envelope

    def validated(self, runtime: FederationRuntime) -> ValidUpdate | None:
        """The prepared validation, as validating now would give it; None: validate now."""
        if self.valid is None or self.view is None or self.runtime is not runtime:
            return None
        view = self.view
        if (view.latest, view.head, view.lineage) == (runtime.latest, runtime.head, runtime.lineage):
            return self.valid
        # A version was committed since: only the staleness depends on it (raises TOO_STALE & co.).
        return dataclasses.replace(self.valid, staleness=staleness_of(self.valid.update, runtime.view()))


def decode_frames(values: Sequence[bytes | None], max_frame_bytes: int) -> list[Outcome]:
    """Decode many frames (worker thread). Digests are checked later, once: a chunk's by the
    reassembler, an update's payload with its validation (see :func:`check_and_validate`)."""
    out: list[Outcome] = []
    for value in values:
        if value is None:
            out.append((None, None))
            continue
        try:
            out.append((decode_frame(value, max_frame_bytes=max_frame_bytes, verify_digest=False), None))
        except Exception as err:  # re-raised at the record's turn, exactly as a decode there would
            out.append((None, err))
    return out


def check_and_validate(
    envelope: Envelope[Any],
    view: FederationView,
    keys: KeyStore,
    *,
    max_decoded_bytes: int,
    payload_verified: bool = False,
) -> ValidUpdate:
    """The payload digest (MALFORMED when it differs: the frame contradicts itself), hashed once for
    both the frame check and the signature, then every validation check (worker thread).

    ``payload_verified``: the payload's bytes are already authenticated (an update reassembled by
    :func:`add_chunk` from chunks its own client signed, each checked against its signed digest): its
    bytes are not hashed a third time."""
    if not payload_verified:
        verify_payload_digest(envelope)
    return validate_update(envelope, view, keys, max_decoded_bytes=max_decoded_bytes, payload_verified=True)


def validate_many(
    items: Sequence[tuple[Envelope[Any], FederationView, KeyStore]], max_decoded_bytes: int
) -> list[Outcome]:
    """:func:`check_and_validate` of many updates (worker thread), each with its federation's keys."""
    out: list[Outcome] = []
    for envelope, view, keys in items:
        try:
            out.append((check_and_validate(envelope, view, keys, max_decoded_bytes=max_decoded_bytes), None))
        except Exception as err:
            out.append((None, err))
    return out


def add_chunk(
    reassembler: Reassembler[Position],
    envelope: Envelope[AdapterUpdateChunk],
    keys: KeyStore,
    pos: Position,
    max_frame_bytes: int,
) -> Envelope[Any] | None:
    """Authenticate a chunk, place it and, when it completes its upload, decode the whole frame: one
    worker-thread call. The signature (its client's key, over the header with ``chunk_sha256``) is
    checked before the reassembler stores anything, and the reassembler checks the payload against
    ``chunk_sha256``: an unsigned or forged chunk never reaches an upload (SIGNATURE_INVALID)."""
    chunk = envelope.data
    verify_chunk(envelope, keys, payload_verified=True)  # the reassembler hashes the payload next
    frame = reassembler.add(chunk, pos)
    if frame is None:
        return None
    whole: Envelope[AdapterUpdate] = decode_frame(
        frame,
        max_frame_bytes=max_frame_bytes,
        expected=AdapterUpdate,
        verify_digest=False,  # its bytes are the chunks': each hashed and signed (see check_and_validate)
    )
    update = whole.data
    if (update.federation, update.client_id, update.update_id) != (
        chunk.federation,
        chunk.client_id,
        chunk.update_id,
    ):
        # The chunks' signatures authenticate the payload only for the client that signed them.
        raise RejectedInput(
            "the chunks name another federation, client or update id than the update they carry",
            reason=RejectReason.SCHEMA_INVALID,
        )
    return whole


class BatchPreparer:
    def __init__(
        self,
        loader: StateLoader,
        store: VersionStore,
        keys: FederationKeys,
        redis: Redis,
        settings: PFISettings,
        run_cpu: RunCpu,
        in_flight: Gauge,
    ) -> None:
        self.loader = loader
        self.store = store
        self.keys = keys
        self.redis = redis
        self.settings = settings
        self.run_cpu = run_cpu
        self.in_flight = in_flight  # updates being decoded/validated right now

    async def prepare(
        self,
        runtimes: dict[str, FederationRuntime],
        partition: int,
        records: Sequence[ConsumerRecord[Any, Any]],
    ) -> list[Prepared]:
        prepared = [Prepared() for _ in records]
        owners: list[FederationRuntime | None] = []
        values: list[bytes | None] = []
        for record in records:
            federation = key_text(record.key)
            if federation is not None and "/" in federation:  # a leaf's (see Intake.handle)
                owners.append(None)
                values.append(None)
                continue
            try:
                runtime = await self.loader.runtime(runtimes, federation) if federation else None
            except FederationUnavailable:
                runtime = None  # dead-lettered at its turn (FEDERATION_UNAVAILABLE)
            skip = runtime is not None and runtime.zone(partition, record.offset) is Zone.SKIP
            owners.append(runtime)
            values.append(None if skip else record.value or b"")
        decoded = await self.run_cpu(decode_frames, values, self.settings.max_update_bytes)
        met: set[tuple[str, str]] = set()  # (client, update id) met so far in this batch (whole or chunked)
        candidates: list[int] = []
        budget = MAX_PREVALIDATED_BYTES
        for i, (envelope, error) in enumerate(decoded):
            if values[i] is None:
                continue
            prepared[i].envelope, prepared[i].error, prepared[i].runtime = envelope, error, owners[i]
            data = envelope.data if envelope is not None else None
            if not isinstance(data, AdapterUpdate | AdapterUpdateChunk):
                continue
            runtime = owners[i]
            fresh = (data.client_id, data.update_id) not in met
            met.add((data.client_id, data.update_id))
            if (
                isinstance(data, AdapterUpdate)
                and fresh
                and runtime is not None
                and data.federation == runtime.name == key_text(records[i].key)
                and not runtime.is_buffered(data.update_id)
            ):
                candidates.append(i)
        if not candidates:
            return prepared
        seen = await self.store.are_seen(
            [
                (
                    self._owner(prepared[i]).name,
                    self._update(prepared[i]).client_id,
                    self._update(prepared[i]).update_id,
                )
                for i in candidates
            ]
        )
        todo: list[int] = []
        for i, was_seen in zip(candidates, seen, strict=True):
            prepared[i].seen = was_seen
            size = len(self._update(prepared[i]).payload)
            if not was_seen and size <= budget:
                budget -= size
                todo.append(i)
        if not todo:
            return prepared
        for fed, client in {
            (self._owner(prepared[i]).name, self._update(prepared[i]).client_id) for i in todo
        }:
            await self.keys.ensure(self.redis, fed, client)
        views: dict[str, FederationView] = {}
        items: list[tuple[Envelope[Any], FederationView, KeyStore]] = []
        for i in todo:
            runtime = self._owner(prepared[i])
            if runtime.name not in views:
                views[runtime.name] = runtime.view()
            prepared[i].view = views[runtime.name]
            items.append((self._envelope(prepared[i]), views[runtime.name], self.keys.view(runtime.name)))
        self.in_flight.inc(len(items))
        try:
            results = await self.run_cpu(validate_many, items, self.settings.max_decoded_bytes)
        finally:
            self.in_flight.dec(len(items))
        for i, (valid, _) in zip(todo, results, strict=True):
            prepared[i].valid = valid  # a refusal is validated again at its turn
        return prepared

    @staticmethod
    def _envelope(p: Prepared) -> Envelope[Any]:
        assert p.envelope is not None
        return p.envelope

    @classmethod
    def _update(cls, p: Prepared) -> AdapterUpdate:
        data = cls._envelope(p).data
        assert isinstance(data, AdapterUpdate)
        return data

    @staticmethod
    def _owner(p: Prepared) -> FederationRuntime:
        assert p.runtime is not None
        return p.runtime


def key_text(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None
