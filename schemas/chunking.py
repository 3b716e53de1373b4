"""Updates larger than one Kafka message: split a frame into chunk frames, reassemble them.

A producer calls :func:`split_frame` on the framed ``AdapterUpdate`` and sends every returned
message with the same key (the federation), so all chunks land on one partition, in order. The
aggregator feeds decoded ``AdapterUpdateChunk`` events to a :class:`Reassembler`, which returns the
original frame bytes once the last chunk is in and both the size and the SHA-256 of the whole
agree with the chunk headers.

Reassembly state is bounded, and one client can never disturb another client's upload:

- uploads are keyed by ``(federation, client_id, update_id, total_sha256)``: a chunk that names the same
  ids with other content (another whole digest) is a separate upload that never completes and expires;
  it cannot replace, extend or corrupt the legitimate one. (The aggregator also verifies each chunk's
  signature before it gets here, so only the client itself can even name its ids.)
- each client (per federation) may hold at most ``max_uploads_per_client`` uploads and
  ``max_client_bytes`` bytes in flight; a chunk that would start an upload beyond that is refused
  (UPLOAD_QUOTA) and nothing else changes;
- every upload reserves its whole ``total_size`` at its first chunk from a :class:`ReassemblyBudget`,
  which may be shared by all the reassemblers of a process (one per federation): when the budget is
  full, new uploads are refused (REASSEMBLY_FULL). Uploads in flight are never evicted, and once
  started an upload always has the room to complete;
- an upload older than ``ttl_s`` (counted from its first chunk, so a trickle cannot keep it alive) is
  dropped by :meth:`Reassembler.expire` and comes back as an :class:`ExpiredUpload` for the caller to
  dead-letter with CHUNK_EXPIRED.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from schemas.errors import ChunkError, ConfigError, PayloadTooLargeError, RejectReason
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope, make_envelope
from schemas.frame import encode_frame


class _Comparable(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


P = TypeVar("P", bound=_Comparable)
UploadKey = tuple[str, str, str, str]  # federation, client_id, update_id, total_sha256
ClientKey = tuple[str, str]  # federation, client_id


def split_frame(
    frame: bytes,
    *,
    federation: str,
    client_id: str,
    update_id: str,
    chunk_bytes: int,
    source: str,
    key: bytes | None = None,
) -> list[bytes]:
    """``[frame]`` when it fits in ``chunk_bytes``; else framed ``AdapterUpdateChunk`` messages, in order.

    Chunk event ids are derived from the frame digest and the index, so re-splitting the same
    frame yields the same ids (``source`` + ``id`` is the idempotency key). With ``key`` (the client's
    signing key) every chunk is signed (:func:`schemas.signing.sign_chunk`); verifiers refuse unsigned
    chunks.
    """
    from schemas.signing import sign_chunk  # signing imports this module's siblings, not this one

    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if len(frame) <= chunk_bytes:
        return [frame]
    total_sha = hashlib.sha256(frame).hexdigest()
    count = -(-len(frame) // chunk_bytes)
    view = memoryview(frame)
    out: list[bytes] = []
    for index in range(count):
        piece = bytes(view[index * chunk_bytes : (index + 1) * chunk_bytes])
        chunk = AdapterUpdateChunk(
            federation=federation,
            client_id=client_id,
            update_id=update_id,
            index=index,
            count=count,
            total_size=len(frame),
            total_sha256=total_sha,
            chunk_sha256=hashlib.sha256(piece).hexdigest(),
            payload=piece,
        )
        event_id = hashlib.sha256(f"{total_sha}:{index}:{count}".encode()).hexdigest()[:32]
        envelope = make_envelope(chunk, source=source, subject=update_id, event_id=event_id)
        if key is not None:
            envelope = sign_chunk(envelope, key)
        out.append(encode_frame(envelope))
    return out


class ReassemblyBudget:
    """Bytes reserved by in-flight chunked uploads, bounded by ``max_bytes``: one per process, shared by
    every :class:`Reassembler` (one per federation) so that the bound holds for the whole process.
    Thread-safe (reassemblers run in worker threads)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ConfigError(f"the reassembly bound must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._reserved = 0
        self.lock = threading.Lock()

    @property
    def reserved(self) -> int:
        return self._reserved

    def _try_reserve(self, n: int) -> bool:  # under ``lock``
        if self._reserved + n > self.max_bytes:
            return False
        self._reserved += n
        return True

    def _release(self, n: int) -> None:  # under ``lock``
        self._reserved = max(0, self._reserved - n)


def split_update(envelope: Envelope[AdapterUpdate], chunk_bytes: int, *, key: bytes | None) -> list[bytes]:
    """The messages of one update: its frame, or its ordered chunks signed with ``key`` (the client's key;
    verifiers refuse unsigned chunks, so ``None`` only builds what a test means to be refused)."""
    update = envelope.data
    return split_frame(
        encode_frame(envelope),
        federation=update.federation,
        client_id=update.client_id,
        update_id=update.update_id,
        chunk_bytes=chunk_bytes,
        source=envelope.source,
        key=key,
    )


@dataclass(frozen=True)
class ExpiredUpload(Generic[P]):
    """An incomplete upload that was dropped (TTL expiry, or :meth:`Reassembler.drop`)."""

    federation: str
    client_id: str
    update_id: str
    received: int  # chunks received
    count: int  # chunks expected
    received_bytes: int
    total_size: int
    started_at: float  # clock() at its first chunk
    first_position: P | None
    total_sha256: str = ""
    reason: RejectReason = RejectReason.CHUNK_EXPIRED


@dataclass
class _Upload(Generic[P]):
    count: int
    total_size: int
    started_at: float
    first_position: P | None = None
    parts: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0


@dataclass
class _ClientUse:
    uploads: int = 0
    reserved: int = 0


def upload_key(chunk: AdapterUpdateChunk) -> UploadKey:
    return (chunk.federation, chunk.client_id, chunk.update_id, chunk.total_sha256)


class Reassembler(Generic[P]):
    """Collects chunks per ``(federation, client_id, update_id, total_sha256)``; bounded per client, per
    process (``budget``) and in time (see the module docstring).

    ``max_total_bytes`` sizes a private budget when no shared ``budget`` is given. Use a reassembler from
    one task at a time (the consumer loop); :meth:`close` may come from another task: it returns the
    reservations to the shared budget (a rebalance drops a federation's state).
    """

    def __init__(
        self,
        max_total_bytes: int,
        ttl_s: float,
        max_update_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        budget: ReassemblyBudget | None = None,
        max_uploads_per_client: int = 2,
        max_client_bytes: int | None = None,
    ) -> None:
        if max_update_bytes < 1 or ttl_s <= 0 or max_uploads_per_client < 1:
            raise ConfigError("max_update_bytes, ttl_s and max_uploads_per_client must be positive")
        self.budget = budget if budget is not None else ReassemblyBudget(max_total_bytes)
        self.max_client_bytes = max_update_bytes if max_client_bytes is None else max_client_bytes
        for name, bound in (
            ("reassembly bound", self.budget.max_bytes),
            ("max_client_bytes", self.max_client_bytes),
        ):
            if bound < max_update_bytes:
                raise ConfigError(
                    f"{name} ({bound}) must be >= max_update_bytes ({max_update_bytes}) "
                    "or a single upload could never complete"
                )
        self.max_total_bytes = self.budget.max_bytes
        self.ttl_s = ttl_s
        self.max_update_bytes = max_update_bytes
        self.max_uploads_per_client = max_uploads_per_client
        self._clock = clock
        self._uploads: dict[UploadKey, _Upload[P]] = {}  # insertion order == age order
        self._clients: dict[ClientKey, _ClientUse] = {}
        self._pending_bytes = 0
        self._reserved = 0
        self._closed = False

    @property
    def pending_bytes(self) -> int:
        """Payload bytes buffered for incomplete uploads."""
        return self._pending_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes this reassembler holds of its budget (the total sizes of its incomplete uploads)."""
        return self._reserved

    @property
    def pending_uploads(self) -> int:
        return len(self._uploads)

    def add(self, chunk: AdapterUpdateChunk, position: P | None = None) -> bytes | None:
        """Place one chunk; return the whole frame when this completes its upload, else ``None``.

        Raises :class:`ChunkError` (CHUNK_CORRUPT, CHUNK_DUPLICATE, UPLOAD_QUOTA, REASSEMBLY_FULL) or
        :class:`PayloadTooLargeError` (OVERSIZED). A rejected chunk leaves the state unchanged,
        except when the completed whole fails its checks: then the upload is dropped.
        """
        if not isinstance(chunk, AdapterUpdateChunk):
            raise ChunkError(f"not a chunk: {type(chunk).__name__}", reason=RejectReason.MALFORMED)
        key = upload_key(chunk)
        if chunk.total_size > self.max_update_bytes:
            raise PayloadTooLargeError(
                f"update {chunk.update_id}: {chunk.total_size} bytes, cap {self.max_update_bytes}"
            )
        if chunk.index >= chunk.count:
            raise ChunkError(f"chunk index {chunk.index} >= count {chunk.count}")
        if chunk.count > chunk.total_size:
            raise ChunkError(
                f"count {chunk.count} > total_size {chunk.total_size}: chunks cannot all be non-empty"
            )
        if not chunk.payload:
            raise ChunkError(f"chunk {chunk.index} is empty")
        if hashlib.sha256(chunk.payload).hexdigest() != chunk.chunk_sha256:
            raise ChunkError(f"chunk {chunk.index}: chunk_sha256 does not match the payload")
        upload = self._uploads.get(key)
        if upload is not None:
            if (upload.count, upload.total_size) != (chunk.count, chunk.total_size):
                raise ChunkError(f"chunk {chunk.index}: count/total_size differ from earlier chunks")
            previous = upload.parts.get(chunk.index)
            if previous is not None:
                if previous == chunk.payload:
                    return None  # identical re-delivery: idempotent
                raise ChunkError(
                    f"chunk {chunk.index} delivered twice with different content",
                    reason=RejectReason.CHUNK_DUPLICATE,
                )
            if upload.received_bytes + len(chunk.payload) > upload.total_size:
                raise ChunkError(
                    f"chunk {chunk.index}: chunks add up to more than total_size {upload.total_size}"
                )
        else:
            if len(chunk.payload) > chunk.total_size:
                raise ChunkError(f"chunk {chunk.index} is larger than total_size {chunk.total_size}")
            upload = self._start(key, chunk)
        if position is not None and (upload.first_position is None or position < upload.first_position):
            upload.first_position = position
        upload.parts[chunk.index] = chunk.payload
        upload.received_bytes += len(chunk.payload)
        self._pending_bytes += len(chunk.payload)
        if len(upload.parts) < upload.count:
            return None
        return self._complete(key, upload)

    def _start(self, key: UploadKey, chunk: AdapterUpdateChunk) -> _Upload[P]:
        """A new upload, within its client's quota and the budget (else refused, nothing changed)."""
        client = (chunk.federation, chunk.client_id)
        use = self._clients.get(client, _ClientUse())
        if (
            use.uploads >= self.max_uploads_per_client
            or use.reserved + chunk.total_size > self.max_client_bytes
        ):
            raise ChunkError(
                f"client {chunk.client_id!r} already has {use.uploads} upload(s) of {use.reserved} bytes in "
                f"flight (quota {self.max_uploads_per_client} uploads, {self.max_client_bytes} bytes): "
                f"update {chunk.update_id} refused",
                reason=RejectReason.UPLOAD_QUOTA,
            )
        with self.budget.lock:
            if not self._closed and not self.budget._try_reserve(chunk.total_size):
                raise ChunkError(
                    f"reassembly bound full ({self.budget.reserved} of {self.budget.max_bytes} bytes "
                    f"reserved): update {chunk.update_id} of {chunk.total_size} bytes refused",
                    reason=RejectReason.REASSEMBLY_FULL,
                )
            self._reserved += chunk.total_size
        use.uploads += 1
        use.reserved += chunk.total_size
        self._clients[client] = use
        upload: _Upload[P] = _Upload(chunk.count, chunk.total_size, self._clock())
        self._uploads[key] = upload
        return upload

    def _forget(self, key: UploadKey) -> _Upload[P]:
        """Remove an upload and return its reservation (client quota and budget)."""
        upload = self._uploads.pop(key)
        self._pending_bytes -= upload.received_bytes
        client = (key[0], key[1])
        use = self._clients[client]
        use.uploads -= 1
        use.reserved -= upload.total_size
        if use.uploads <= 0:
            del self._clients[client]
        with self.budget.lock:
            if not self._closed:
                self.budget._release(upload.total_size)
            self._reserved -= upload.total_size
        return upload

    def _complete(self, key: UploadKey, upload: _Upload[P]) -> bytes:
        self._forget(key)
        if upload.received_bytes != upload.total_size:
            raise ChunkError(
                f"update {key[2]}: chunks hold {upload.received_bytes} bytes, expected {upload.total_size}"
            )
        whole = b"".join(upload.parts[i] for i in range(upload.count))
        if hashlib.sha256(whole).hexdigest() != key[3]:
            raise ChunkError(f"update {key[2]}: reassembled bytes do not match total_sha256")
        return whole

    def _drop(self, key: UploadKey) -> ExpiredUpload[P]:
        upload = self._forget(key)
        return ExpiredUpload(
            federation=key[0],
            client_id=key[1],
            update_id=key[2],
            received=len(upload.parts),
            count=upload.count,
            received_bytes=upload.received_bytes,
            total_size=upload.total_size,
            started_at=upload.started_at,
            first_position=upload.first_position,
            total_sha256=key[3],
        )

    def close(self) -> None:
        """Give every reservation back to the budget: the reassembler's state is being thrown away (a
        rebalance or resync). Safe from another task; the reassembler must not be used afterwards."""
        with self.budget.lock:
            if not self._closed:
                self._closed = True
                self.budget._release(self._reserved)

    def expire(self, now: float | None = None) -> list[ExpiredUpload[P]]:
        """Drop and return the uploads whose first chunk arrived more than ``ttl_s`` ago."""
        now = self._clock() if now is None else now
        stale = [k for k, u in self._uploads.items() if now - u.started_at > self.ttl_s]
        return [self._drop(k) for k in stale]

    def drop(self, where: Callable[[P | None], bool] | None = None) -> list[ExpiredUpload[P]]:
        """Forget uploads (all, or those whose first position satisfies ``where``), e.g. on revocation."""
        keys = [k for k, u in self._uploads.items() if where is None or where(u.first_position)]
        return [self._drop(k) for k in keys]

    def first_position_of(self, chunk: AdapterUpdateChunk) -> P | None:
        """First position of the incomplete upload ``chunk`` belongs to (None when none is pending, or it
        had no position). Ask before the ``add`` that completes it: a completed upload is forgotten."""
        upload = self._uploads.get(upload_key(chunk))
        return None if upload is None else upload.first_position

    def client_uploads(self, federation: str, client_id: str) -> int:
        """Incomplete uploads of one client."""
        use = self._clients.get((federation, client_id))
        return 0 if use is None else use.uploads

    def pending_positions(self) -> list[P]:
        """First positions of the incomplete uploads (those added with a position)."""
        return [u.first_position for u in self._uploads.values() if u.first_position is not None]

    def oldest_pending_position(self, where: Callable[[P], bool] | None = None) -> P | None:
        """Smallest first position still in flight (optionally among those matching ``where``)."""
        candidates = [p for p in self.pending_positions() if where is None or where(p)]
        return min(candidates) if candidates else None
