"""Updates larger than one Kafka message: split a frame into chunk frames, reassemble them.

A producer calls :func:`split_frame` on the framed ``AdapterUpdate`` and sends every returned
message with the same key (the federation), so all chunks land on one partition, in order. The
aggregator feeds decoded ``AdapterUpdateChunk`` events to a :class:`Reassembler`, which returns the
original frame bytes once the last chunk is in and both the size and the SHA-256 of the whole
agree with the chunk headers.

Reassembly state is bounded: uploads are keyed by ``(federation, client_id, update_id)``; an
upload older than ``ttl_s`` (counted from its first chunk, so a trickle cannot keep it alive) is
dropped by :meth:`Reassembler.expire`; when a new chunk would push the buffered bytes over
``max_total_bytes`` the oldest other uploads are evicted (:meth:`Reassembler.drain_evicted`). Both
come back as :class:`ExpiredUpload` records for the caller to dead-letter with CHUNK_EXPIRED.

Positions: ``add(chunk, position)`` remembers the smallest position (e.g. ``(partition, offset)``)
seen for each upload, opaque to this module; :meth:`Reassembler.oldest_pending_position` tells the
consumer the lowest position still in flight so that it never commits past an incomplete upload.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from schemas.errors import ChunkError, ConfigError, PayloadTooLargeError, RejectReason
from schemas.events import AdapterUpdateChunk, make_envelope
from schemas.frame import encode_frame


class _Comparable(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


P = TypeVar("P", bound=_Comparable)
UploadKey = tuple[str, str, str]


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


@dataclass(frozen=True)
class ExpiredUpload(Generic[P]):
    """An incomplete upload that was dropped (TTL) or evicted (memory bound)."""

    federation: str
    client_id: str
    update_id: str
    received: int  # chunks received
    count: int  # chunks expected
    received_bytes: int
    total_size: int
    started_at: float  # clock() at its first chunk
    first_position: P | None
    evicted: bool
    reason: RejectReason = RejectReason.CHUNK_EXPIRED


@dataclass
class _Upload(Generic[P]):
    count: int
    total_size: int
    total_sha256: str
    started_at: float
    first_position: P | None = None
    parts: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0


class Reassembler(Generic[P]):
    """Collects chunks per ``(federation, client_id, update_id)``; bounded in bytes and time.

    Not thread-safe: use it from one task/thread (the consumer loop).
    """

    def __init__(
        self,
        max_total_bytes: int,
        ttl_s: float,
        max_update_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_update_bytes < 1 or ttl_s <= 0:
            raise ConfigError("max_update_bytes and ttl_s must be positive")
        if max_total_bytes < max_update_bytes:
            raise ConfigError(
                f"max_total_bytes ({max_total_bytes}) must be >= max_update_bytes ({max_update_bytes}) "
                "or a single upload could never complete"
            )
        self.max_total_bytes = max_total_bytes
        self.ttl_s = ttl_s
        self.max_update_bytes = max_update_bytes
        self._clock = clock
        self._uploads: dict[UploadKey, _Upload[P]] = {}  # insertion order == age order
        self._evicted: list[ExpiredUpload[P]] = []
        self._pending_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Payload bytes buffered for incomplete uploads."""
        return self._pending_bytes

    @property
    def pending_uploads(self) -> int:
        return len(self._uploads)

    def add(self, chunk: AdapterUpdateChunk, position: P | None = None) -> bytes | None:
        """Place one chunk; return the whole frame when this completes its upload, else ``None``.

        Raises :class:`ChunkError` (CHUNK_CORRUPT, CHUNK_DUPLICATE) or
        :class:`PayloadTooLargeError` (OVERSIZED). A rejected chunk leaves the state unchanged,
        except when the completed whole fails its checks: then the upload is dropped.
        """
        if not isinstance(chunk, AdapterUpdateChunk):
            raise ChunkError(f"not a chunk: {type(chunk).__name__}", reason=RejectReason.MALFORMED)
        key = (chunk.federation, chunk.client_id, chunk.update_id)
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
            if (upload.count, upload.total_size, upload.total_sha256) != (
                chunk.count,
                chunk.total_size,
                chunk.total_sha256,
            ):
                raise ChunkError(
                    f"chunk {chunk.index}: count/total_size/total_sha256 differ from earlier chunks"
                )
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
        elif len(chunk.payload) > chunk.total_size:
            raise ChunkError(f"chunk {chunk.index} is larger than total_size {chunk.total_size}")
        self._make_room(len(chunk.payload), keep=key)
        if upload is None:
            upload = _Upload(chunk.count, chunk.total_size, chunk.total_sha256, self._clock())
            self._uploads[key] = upload
        if position is not None and (upload.first_position is None or position < upload.first_position):
            upload.first_position = position
        upload.parts[chunk.index] = chunk.payload
        upload.received_bytes += len(chunk.payload)
        self._pending_bytes += len(chunk.payload)
        if len(upload.parts) < upload.count:
            return None
        return self._complete(key, upload)

    def _complete(self, key: UploadKey, upload: _Upload[P]) -> bytes:
        del self._uploads[key]
        self._pending_bytes -= upload.received_bytes
        if upload.received_bytes != upload.total_size:
            raise ChunkError(
                f"update {key[2]}: chunks hold {upload.received_bytes} bytes, expected {upload.total_size}"
            )
        whole = b"".join(upload.parts[i] for i in range(upload.count))
        if hashlib.sha256(whole).hexdigest() != upload.total_sha256:
            raise ChunkError(f"update {key[2]}: reassembled bytes do not match total_sha256")
        return whole

    def _make_room(self, incoming: int, *, keep: UploadKey) -> None:
        for key in list(self._uploads):
            if self._pending_bytes + incoming <= self.max_total_bytes:
                return
            if key != keep:
                self._evicted.append(self._drop(key, evicted=True))

    def _drop(self, key: UploadKey, *, evicted: bool) -> ExpiredUpload[P]:
        upload = self._uploads.pop(key)
        self._pending_bytes -= upload.received_bytes
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
            evicted=evicted,
        )

    def expire(self, now: float | None = None) -> list[ExpiredUpload[P]]:
        """Drop and return the uploads whose first chunk arrived more than ``ttl_s`` ago."""
        now = self._clock() if now is None else now
        stale = [k for k, u in self._uploads.items() if now - u.started_at > self.ttl_s]
        return [self._drop(k, evicted=False) for k in stale]

    def drain_evicted(self) -> list[ExpiredUpload[P]]:
        """Uploads evicted by the memory bound since the last call."""
        out, self._evicted = self._evicted, []
        return out

    def drop(self, where: Callable[[P | None], bool] | None = None) -> list[ExpiredUpload[P]]:
        """Forget uploads (all, or those whose first position satisfies ``where``), e.g. on revocation."""
        keys = [k for k, u in self._uploads.items() if where is None or where(u.first_position)]
        return [self._drop(k, evicted=False) for k in keys]

    def first_position_of(self, federation: str, client_id: str, update_id: str) -> P | None:
        """First position of an incomplete upload (None when none is pending, or it had no position).

        Ask before the ``add`` that completes it: a completed upload is forgotten."""
        upload = self._uploads.get((federation, client_id, update_id))
        return None if upload is None else upload.first_position

    def pending_positions(self) -> list[P]:
        """First positions of the incomplete uploads (those added with a position)."""
        return [u.first_position for u in self._uploads.values() if u.first_position is not None]

    def oldest_pending_position(self, where: Callable[[P], bool] | None = None) -> P | None:
        """Smallest first position still in flight (optionally among those matching ``where``)."""
        candidates = [p for p in self.pending_positions() if where is None or where(p)]
        return min(candidates) if candidates else None
