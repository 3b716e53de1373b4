"""HMAC-SHA256 signatures of adapter updates and chunks under per-client keys.

What is signed (:func:`canonical_signing_bytes`): the canonical JSON of the whole envelope as
``model_dump(mode="json")`` gives it — every CloudEvents attribute (``specversion``, ``id``,
``source``, ``type``, ``time``, ``subject``, ``datacontenttype``) and every data field — except
``data.signature`` (it is the output) and ``data.payload`` (covered through ``payload_sha256``,
which :func:`verify_update` recomputes). Signing ``time`` and ``id`` binds the signature to one
event; a replay of the very same event is caught by the aggregator's duplicate check.

The key is chosen by the *claimed* ``client_id``, so changing the client id breaks the signature.
Keys are raw bytes (at least 16). Verifiers get them from their federation's client registry
(``services.identity``: active clients only); :class:`StaticKeyStore` holds keys in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from typing import Protocol

from schemas.errors import SignatureError
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope, canonical_json

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
_DERIVE_LABEL = b"pfi-client-key:"


class KeyStore(Protocol):
    """Where verifiers find a client's HMAC key. ``get`` must be cheap and thread-safe."""

    def get(self, client_id: str) -> bytes | None: ...


def generate_key() -> bytes:
    """32 random bytes."""
    return secrets.token_bytes(32)


def derive_client_key(master: bytes, client_id: str) -> bytes:
    """Deterministic per-client key: HMAC-SHA256(master, label || client_id). A harness convenience
    (simulations, benchmarks) to compute keys that are then registered like any other; verifiers never
    derive keys."""
    return hmac.new(master, _DERIVE_LABEL + client_id.encode(), hashlib.sha256).digest()


class StaticKeyStore:
    """Keys held in memory."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = dict(keys)

    def get(self, client_id: str) -> bytes | None:
        return self._keys.get(client_id)


def canonical_signing_bytes(envelope: Envelope[AdapterUpdate] | Envelope[AdapterUpdateChunk]) -> bytes:
    """The bytes an update's (or a chunk's) HMAC covers (see the module docstring)."""
    return canonical_json(envelope.model_dump(mode="json", exclude={"data": {"signature", "payload"}}))


def _mac(envelope: Envelope[AdapterUpdate] | Envelope[AdapterUpdateChunk], key: bytes) -> str:
    return hmac.new(key, canonical_signing_bytes(envelope), hashlib.sha256).hexdigest()


def _check_payload(envelope: Envelope[AdapterUpdate]) -> None:
    if hashlib.sha256(envelope.data.payload).hexdigest() != envelope.data.payload_sha256:
        raise SignatureError("payload_sha256 does not match the payload")


def sign_update(envelope: Envelope[AdapterUpdate], key: bytes) -> Envelope[AdapterUpdate]:
    """A copy of ``envelope`` whose ``data.signature`` is the hex HMAC-SHA256 under ``key``."""
    if not isinstance(envelope.data, AdapterUpdate):
        raise SignatureError(f"only adapter updates are signed, not {type(envelope.data).__name__}")
    _check_payload(envelope)
    data = envelope.data.model_copy(update={"signature": _mac(envelope, key)})
    return envelope.model_copy(update={"data": data})


def verify_update(
    envelope: Envelope[AdapterUpdate], keys: KeyStore, *, payload_verified: bool = False
) -> None:
    """Raise :class:`SignatureError` unless the update is signed by its client's key and intact.

    ``payload_verified``: the caller has just checked ``payload_sha256`` against the payload (e.g.
    :func:`schemas.frame.verify_payload_digest`), so it is not hashed a second time."""
    data = envelope.data
    if not isinstance(data, AdapterUpdate):
        raise SignatureError(f"only adapter updates are signed, not {type(data).__name__}")
    if not data.signature:
        raise SignatureError(f"update {data.update_id} carries no signature")
    key = keys.get(data.client_id)
    if key is None:
        raise SignatureError(f"no key for client {data.client_id!r}")
    if not payload_verified:
        _check_payload(envelope)
    if not hmac.compare_digest(_mac(envelope, key).encode(), data.signature.encode()):
        raise SignatureError(f"bad signature on update {data.update_id}")


def sign_chunk(envelope: Envelope[AdapterUpdateChunk], key: bytes) -> Envelope[AdapterUpdateChunk]:
    """A copy of a chunk envelope signed with the client's key: HMAC-SHA256 over the canonical envelope
    without ``payload`` and ``signature``; the payload is covered by ``chunk_sha256``."""
    data = envelope.data
    if not isinstance(data, AdapterUpdateChunk):
        raise SignatureError(f"sign_chunk signs chunks, not {type(data).__name__}")
    if hashlib.sha256(data.payload).hexdigest() != data.chunk_sha256:
        raise SignatureError("chunk_sha256 does not match the chunk payload")
    signed = data.model_copy(update={"signature": _mac(envelope, key)})
    return envelope.model_copy(update={"data": signed})


def verify_chunk(
    envelope: Envelope[AdapterUpdateChunk], keys: KeyStore, *, payload_verified: bool = False
) -> None:
    """Raise :class:`SignatureError` unless the chunk is signed by its claimed client's key (and, unless
    ``payload_verified``, its payload matches ``chunk_sha256``). Cheap: the HMAC covers a small header."""
    data = envelope.data
    if not isinstance(data, AdapterUpdateChunk):
        raise SignatureError(f"verify_chunk verifies chunks, not {type(data).__name__}")
    if not data.signature:
        raise SignatureError(f"chunk {data.index} of update {data.update_id} carries no signature")
    key = keys.get(data.client_id)
    if key is None:
        raise SignatureError(f"no key for client {data.client_id!r}")
    if not payload_verified and hashlib.sha256(data.payload).hexdigest() != data.chunk_sha256:
        raise SignatureError("chunk_sha256 does not match the chunk payload")
    if not hmac.compare_digest(_mac(envelope, key).encode(), data.signature.encode()):
        raise SignatureError(f"bad signature on chunk {data.index} of update {data.update_id}")
