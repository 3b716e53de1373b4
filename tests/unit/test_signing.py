"""schemas.signing: sign/verify, tampering, the in-memory key store."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from schemas.codec import sha256_hex
from schemas.errors import RejectReason, SignatureError
from schemas.events import AdapterUpdate, Envelope, FederationSpec, TensorEncoding, make_envelope
from schemas.frame import decode_frame, encode_frame
from schemas.signing import (
    StaticKeyStore,
    canonical_signing_bytes,
    derive_client_key,
    generate_key,
    sign_update,
    verify_update,
)

KEY = bytes(range(32))
PAYLOAD = b"\x01\x02safetensors-ish payload" * 8


def unsigned(payload: bytes = PAYLOAD) -> Envelope[AdapterUpdate]:
    data = AdapterUpdate(
        federation="fed",
        client_id="c1",
        update_id="u1",
        base_version=2,
        num_samples=10,
        spec_fingerprint=FederationSpec(name="fed", base_model="tiny").fingerprint(),
        encoding=TensorEncoding(),
        payload_sha256=sha256_hex(payload),
        payload=payload,
    )
    return make_envelope(data, source="client/c1")


def signed() -> Envelope[AdapterUpdate]:
    return sign_update(unsigned(), KEY)


def tamper(envelope: Envelope[AdapterUpdate], **data_changes: Any) -> Envelope[AdapterUpdate]:
    return envelope.model_copy(update={"data": envelope.data.model_copy(update=data_changes)})


STORE = StaticKeyStore({"c1": KEY, "c2": KEY})  # c2 shares c1's key: only the signed bytes protect client_id


def test_sign_and_verify() -> None:
    envelope = signed()
    assert envelope.data.signature is not None
    assert len(envelope.data.signature) == 64
    assert unsigned().data.signature is None
    verify_update(envelope, STORE)


def test_verify_after_a_frame_round_trip() -> None:
    envelope = signed()
    decoded = decode_frame(encode_frame(envelope), max_frame_bytes=1 << 20)
    verify_update(decoded, STORE)


def test_signing_bytes_cover_the_right_fields() -> None:
    envelope = signed()
    covered = json.loads(canonical_signing_bytes(envelope))
    assert "signature" not in covered["data"]
    assert "payload" not in covered["data"]
    assert covered["data"]["payload_sha256"] == sha256_hex(PAYLOAD)
    for attribute in ("id", "source", "type", "specversion", "time", "subject"):
        assert attribute in covered
    assert canonical_signing_bytes(envelope) == canonical_signing_bytes(
        unsigned().model_copy(update={"id": envelope.id, "time": envelope.time})
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"base_version": 3},
        {"num_samples": 11},
        {"federation": "other"},
        {"client_id": "c2"},
        {"update_id": "u2"},
        {"spec_fingerprint": "0" * 64},
        {"encoding": TensorEncoding(quantization="int8")},
        {"payload_sha256": sha256_hex(b"other"), "payload": b"other"},
    ],
)
def test_tampered_data_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(SignatureError) as info:
        verify_update(tamper(signed(), **changes), STORE)
    assert info.value.reason is RejectReason.SIGNATURE_INVALID


def test_tampered_payload_byte() -> None:
    envelope = signed()
    flipped = bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:]
    with pytest.raises(SignatureError, match="payload_sha256"):
        verify_update(tamper(envelope, payload=flipped), STORE)


@pytest.mark.parametrize("attribute", ["id", "source", "time", "subject"])
def test_tampered_attributes(attribute: str) -> None:
    envelope = signed()
    value: Any = envelope.time + timedelta(seconds=1) if attribute == "time" else "changed"
    with pytest.raises(SignatureError):
        verify_update(envelope.model_copy(update={attribute: value}), STORE)


def test_wrong_key() -> None:
    with pytest.raises(SignatureError, match="bad signature"):
        verify_update(signed(), StaticKeyStore({"c1": generate_key()}))


def test_unknown_client() -> None:
    with pytest.raises(SignatureError, match="no key"):
        verify_update(signed(), StaticKeyStore({}))


def test_missing_signature() -> None:
    with pytest.raises(SignatureError, match="no signature"):
        verify_update(unsigned(), STORE)


def test_sign_refuses_an_inconsistent_payload() -> None:
    with pytest.raises(SignatureError):
        sign_update(tamper(unsigned(), payload=b"not the digested bytes"), KEY)


def test_keys() -> None:
    key = generate_key()
    assert len(key) == 32
    assert key != generate_key()
    master = b"m" * 32
    assert derive_client_key(master, "a") == derive_client_key(master, "a")
    assert derive_client_key(master, "a") != derive_client_key(master, "b")
    assert derive_client_key(master, "a") != derive_client_key(b"n" * 32, "a")
    assert len(derive_client_key(master, "a")) == 32


# ------------------------------------------------------------------------------------------ key stores


def test_static_key_store() -> None:
    store = StaticKeyStore({"c1": KEY})
    assert store.get("c1") == KEY
    assert store.get("c2") is None
    verify_update(signed(), store)
