"""The Kafka message value format of every PFI topic: a *frame*.

::

    MAGIC (4 bytes, b"PFI\\x01") | header length (u32, big endian) | header | payload

``header`` is the canonical JSON (:func:`schemas.events.canonical_json`) of the CloudEvents envelope
(``Envelope.model_dump(mode="json")``) *without* the data's ``payload`` field; ``payload`` is the
raw bytes of that field (tensors travel raw, never base64). Events without a ``payload`` field
(``GlobalVersionPublished``, ``UpdateRejected``) have an empty payload.

Frames are used on **all** topics (updates, DLQ, versions): one decoder, one magic check, one set
of size limits, no second JSON format to keep in sync.

Decoding never trusts the bytes: every failure is a typed :mod:`schemas.errors` error.

* bad magic, truncated frame, header length past the end, header not UTF-8 JSON object, duplicate
  JSON keys, payload bytes on a payload-less event type → :class:`CodecError` (MALFORMED);
* frame over ``max_frame_bytes`` or header over ``max_header_bytes`` →
  :class:`PayloadTooLargeError` (OVERSIZED);
* unknown ``type``/version → :class:`UnknownEventTypeError`; missing, extra or invalid field
  (including a ``payload`` inside the header) → :class:`SchemaError` naming the field;
* ``AdapterUpdate`` whose ``payload_sha256`` differs from the payload → :class:`CodecError` with
  reason MALFORMED (the frame contradicts itself: corrupt bytes, not a chunking problem and not a
  signature question — the signature covers ``payload_sha256``, so a consistent forgery is the
  signature check's business);
* ``AdapterUpdateChunk`` whose ``chunk_sha256`` differs from the payload → :class:`ChunkError`
  (CHUNK_CORRUPT).

Digest checks can be skipped with ``verify_digest=False`` when the caller re-checks them anyway
(the :class:`~schemas.chunking.Reassembler` and :func:`~schemas.signing.verify_update` do).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from schemas.errors import ChunkError, CodecError, PayloadTooLargeError, RejectReason, SchemaError
from schemas.events import (
    EVENT_TYPES,
    AdapterUpdate,
    AdapterUpdateChunk,
    Envelope,
    Event,
    canonical_json,
    parse_envelope,
)

MAGIC = b"PFI\x01"
PREFIX_BYTES = len(MAGIC) + 4
DEFAULT_MAX_HEADER_BYTES = 1024 * 1024
_U32 = struct.Struct(">I")


def carries_payload(model: type[Event]) -> bool:
    """True for event models whose ``payload`` field travels as the frame's raw payload."""
    return "payload" in model.model_fields


def encode_frame(envelope: Envelope[Any]) -> bytes:
    """Frame ``envelope``: header JSON without ``data.payload``, then the payload bytes."""
    data = envelope.data
    payload: bytes = data.payload if carries_payload(type(data)) else b""
    header = canonical_json(envelope.model_dump(mode="json", exclude={"data": {"payload"}}))
    return b"".join((MAGIC, _U32.pack(len(header)), header, payload))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CodecError(f"duplicate key {key!r} in the frame header")
        out[key] = value
    return out


def split_raw(data: bytes, *, max_frame_bytes: int, max_header_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Check magic and lengths; return (decoded header object, payload bytes)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"a frame must be bytes, got {type(data).__name__}")
    if len(data) > max_frame_bytes:
        raise PayloadTooLargeError(f"frame of {len(data)} bytes exceeds the cap of {max_frame_bytes}")
    if len(data) < PREFIX_BYTES:
        raise CodecError(f"frame of {len(data)} bytes is shorter than its {PREFIX_BYTES}-byte prefix")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise CodecError("not a PFI frame (bad magic)")
    (header_len,) = _U32.unpack_from(data, len(MAGIC))
    if header_len > max_header_bytes:
        raise PayloadTooLargeError(
            f"frame header of {header_len} bytes exceeds the cap of {max_header_bytes}"
        )
    end = PREFIX_BYTES + header_len
    if end > len(data):
        raise CodecError(f"header length {header_len} runs past the end of a {len(data)}-byte frame")
    try:
        header = json.loads(
            bytes(data[PREFIX_BYTES:end]).decode("utf-8"), object_pairs_hook=_no_duplicate_keys
        )
    except CodecError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CodecError(f"frame header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise CodecError("frame header is not a JSON object")
    return header, bytes(data[end:])


def decode_frame(
    data: bytes,
    *,
    max_frame_bytes: int,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    expected: type[Event] | None = None,
    verify_digest: bool = True,
) -> Envelope[Any]:
    """Parse and validate a frame (see the module docstring for every error)."""
    header, payload = split_raw(data, max_frame_bytes=max_frame_bytes, max_header_bytes=max_header_bytes)
    event_type = header.get("type")
    model = EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
    body = header.get("data")
    if model is not None and carries_payload(model):
        if isinstance(body, dict):
            if "payload" in body:
                raise SchemaError("the payload travels after the header, not inside it", field="data.payload")
            header["data"] = {**body, "payload": payload}
    elif payload and model is not None:
        raise CodecError(f"{len(payload)} trailing bytes after the header of a payload-less event")
    envelope = parse_envelope(header, expected)
    if verify_digest:
        verify_payload_digest(envelope)
    return envelope


def verify_payload_digest(envelope: Envelope[Any]) -> None:
    """Check ``payload_sha256`` (updates) or ``chunk_sha256`` (chunks) against the payload."""
    data = envelope.data
    if isinstance(data, AdapterUpdate):
        if hashlib.sha256(data.payload).hexdigest() != data.payload_sha256:
            raise CodecError("payload_sha256 does not match the payload", reason=RejectReason.MALFORMED)
    elif (
        isinstance(data, AdapterUpdateChunk) and hashlib.sha256(data.payload).hexdigest() != data.chunk_sha256
    ):
        raise ChunkError(f"chunk {data.index}: chunk_sha256 does not match the payload")
