"""schemas.frame: round trips of every event type and every malformed frame."""

from __future__ import annotations

import contextlib
import json
import struct
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import sha256_hex
from schemas.errors import (
    ChunkError,
    CodecError,
    PayloadTooLargeError,
    RejectedInput,
    RejectReason,
    SchemaError,
    UnknownEventTypeError,
)
from schemas.events import (
    AdapterUpdate,
    AdapterUpdateChunk,
    Envelope,
    FederationSpec,
    GlobalVersionPublished,
    TensorEncoding,
    UpdateRejected,
    canonical_json,
    make_envelope,
)
from schemas.frame import MAGIC, decode_frame, encode_frame, split_raw

MIB = 1024 * 1024
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FINGERPRINT = FederationSpec(name="fed", base_model="tiny").fingerprint()


def update(payload: bytes = b"\x00tensor bytes\xff" * 10, **changes: Any) -> Envelope[AdapterUpdate]:
    fields: dict[str, Any] = {
        "federation": "fed",
        "client_id": "client-1",
        "update_id": "u-1",
        "base_version": 3,
        "num_samples": 17,
        "spec_fingerprint": FINGERPRINT,
        "encoding": TensorEncoding(),
        "payload_sha256": sha256_hex(payload),
        "payload": payload,
    }
    fields.update(changes)
    return make_envelope(AdapterUpdate(**fields), source="client/client-1", subject="u-1")


def decode(data: bytes, **kwargs: Any) -> Envelope[Any]:
    return decode_frame(data, max_frame_bytes=kwargs.pop("max_frame_bytes", 4 * MIB), **kwargs)


def reframe(header: Any, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else canonical_json(header)
    return MAGIC + struct.pack(">I", len(raw)) + raw + payload


def parts(frame: bytes) -> tuple[dict[str, Any], bytes]:
    return split_raw(frame, max_frame_bytes=4 * MIB, max_header_bytes=MIB)


# ------------------------------------------------------------------------------------------ round trips


def other_events() -> list[Envelope[Any]]:
    now = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    chunk_payload = b"slice"
    return [
        make_envelope(
            AdapterUpdateChunk(
                federation="fed",
                client_id="c",
                update_id="u",
                index=1,
                count=3,
                total_size=100,
                total_sha256="a" * 64,
                chunk_sha256=sha256_hex(chunk_payload),
                payload=chunk_payload,
            ),
            source="client/c",
        ),
        make_envelope(
            GlobalVersionPublished(
                federation="fed",
                version=4,
                parent=3,
                digest="b" * 64,
                num_updates=8,
                size_bytes=1234,
                created_at=now,
            ),
            source="aggregator/0",
        ),
        make_envelope(
            UpdateRejected(reason=RejectReason.TOO_STALE, detail="τ=20 > 16", client_id="c", rejected_at=now),
            source="aggregator/0",
        ),
    ]


@pytest.mark.parametrize("envelope", [update(), update(payload=b""), *other_events()])
def test_round_trip(envelope: Envelope[Any]) -> None:
    frame = encode_frame(envelope)
    assert frame.startswith(MAGIC)
    assert decode(frame) == envelope


def test_layout() -> None:
    envelope = update(payload=b"RAW")
    frame = encode_frame(envelope)
    header, payload = parts(frame)
    assert payload == b"RAW"
    assert "payload" not in header["data"]
    (length,) = struct.unpack(">I", frame[4:8])
    assert frame[8 : 8 + length] == canonical_json(header)  # canonical header JSON
    assert header["type"] == "ai.pfi.adapter-update.v1"
    payload_less = other_events()[1]
    assert parts(encode_frame(payload_less))[1] == b""


def test_expected_type() -> None:
    frame = encode_frame(update())
    assert isinstance(decode(frame, expected=AdapterUpdate).data, AdapterUpdate)
    with pytest.raises(UnknownEventTypeError):
        decode(frame, expected=AdapterUpdateChunk)


# ------------------------------------------------------------------------------------------ malformed


@pytest.mark.parametrize("size", range(8))
def test_short_frames(size: int) -> None:
    with pytest.raises(CodecError) as info:
        decode(encode_frame(update())[:size])
    assert info.value.reason is RejectReason.MALFORMED


def test_bad_magic() -> None:
    frame = encode_frame(update())
    for bad in (b"PFI\x02" + frame[4:], b"XFI\x01" + frame[4:], b"\x00" * 16):
        with pytest.raises(CodecError, match="magic"):
            decode(bad)


def test_header_length_past_end() -> None:
    frame = encode_frame(update())
    header_len = struct.unpack(">I", frame[4:8])[0]
    with pytest.raises(CodecError, match="past the end"):
        decode(frame[:8] + frame[8 : 8 + header_len - 1])
    with pytest.raises(CodecError, match="past the end"):
        decode(MAGIC + struct.pack(">I", 1000) + b"{}")


@pytest.mark.parametrize(
    "raw_header",
    [b"not json", b"\xff\xfe{}", b'{"a":1', b"[1,2]", b"42", b'"str"', b"null", b"[" * 5000 + b"]" * 5000],
)
def test_header_not_a_json_object(raw_header: bytes) -> None:
    with pytest.raises(CodecError) as info:
        decode(reframe(raw_header))
    assert info.value.reason is RejectReason.MALFORMED


def test_duplicate_header_keys() -> None:
    header = canonical_json(parts(encode_frame(update()))[0])
    doubled = header[:-1] + b',"id":"other"}'
    with pytest.raises(CodecError, match="duplicate key"):
        decode(reframe(doubled, b""))


def test_unknown_type_and_version() -> None:
    header, payload = parts(encode_frame(update()))
    for event_type in ("ai.pfi.adapter-update.v2", "ai.pfi.nope.v1", "com.other.v1"):
        with pytest.raises(UnknownEventTypeError) as info:
            decode(reframe({**header, "type": event_type}, payload))
        assert info.value.reason is RejectReason.UNKNOWN_EVENT_TYPE
    with pytest.raises(UnknownEventTypeError):
        decode(reframe({**header, "specversion": "0.3"}, payload))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda h: h["data"].update(bogus=1), "data.bogus"),
        (lambda h: h.update(bogus=1), "bogus"),
        (lambda h: h["data"].pop("num_samples"), "data.num_samples"),
        (lambda h: h["data"].update(base_version=-1), "data.base_version"),
        (lambda h: h["data"].update(payload_sha256="xyz"), "data.payload_sha256"),
        (lambda h: h.pop("id"), "id"),
        (lambda h: h["data"].update(payload="aGVsbG8="), "data.payload"),
    ],
)
def test_schema_errors_name_the_field(mutate: Any, field: str) -> None:
    header, payload = parts(encode_frame(update()))
    mutate(header)
    with pytest.raises(SchemaError) as info:
        decode(reframe(header, payload))
    assert info.value.field == field
    assert info.value.reason is RejectReason.SCHEMA_INVALID


def test_data_not_an_object() -> None:
    header, payload = parts(encode_frame(update()))
    with pytest.raises(SchemaError) as info:
        decode(reframe({**header, "data": [1]}, payload))
    assert info.value.field is not None
    assert info.value.field.startswith("data")


def test_payload_digest_mismatch() -> None:
    frame = encode_frame(update())
    tampered = frame[:-1] + bytes([frame[-1] ^ 1])
    with pytest.raises(CodecError, match="payload_sha256") as info:
        decode(tampered)
    assert info.value.reason is RejectReason.MALFORMED
    assert decode(tampered, verify_digest=False).data.payload == tampered[-len(update().data.payload) :]


def test_chunk_digest_mismatch() -> None:
    frame = encode_frame(other_events()[0])
    with pytest.raises(ChunkError) as info:
        decode(frame[:-1] + b"X")
    assert info.value.reason is RejectReason.CHUNK_CORRUPT


def test_trailing_bytes_on_payload_less_event() -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode(encode_frame(other_events()[1]) + b"extra")


def test_oversized() -> None:
    frame = encode_frame(update(payload=b"x" * 4096))
    with pytest.raises(PayloadTooLargeError) as info:
        decode(frame, max_frame_bytes=len(frame) - 1)
    assert info.value.reason is RejectReason.OVERSIZED
    assert decode(frame, max_frame_bytes=len(frame)).data.payload == b"x" * 4096
    with pytest.raises(PayloadTooLargeError, match="header"):
        decode(frame, max_header_bytes=64)
    with pytest.raises(PayloadTooLargeError, match="header"):
        decode(MAGIC + b"\xff\xff\xff\xff")


@FAST
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_rejections(data: bytes) -> None:
    for candidate in (data, MAGIC + data):
        with contextlib.suppress(RejectedInput):
            decode(candidate)


@FAST
@given(data=st.data())
def test_mutated_frames_only_raise_rejections(data: st.DataObject) -> None:
    frame = bytearray(encode_frame(update()))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RejectedInput):
        decode(bytes(frame))


def test_header_is_plain_json() -> None:
    header, _ = parts(encode_frame(update()))
    assert json.loads(canonical_json(header)) == header
