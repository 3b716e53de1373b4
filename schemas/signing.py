"""HMAC-SHA256 signatures of adapter updates, and where the per-client keys come from.

What is signed (:func:`canonical_signing_bytes`): the canonical JSON of the whole envelope as
``model_dump(mode="json")`` gives it — every CloudEvents attribute (``specversion``, ``id``,
``source``, ``type``, ``time``, ``subject``, ``datacontenttype``) and every data field — except
``data.signature`` (it is the output) and ``data.payload`` (covered through ``payload_sha256``,
which :func:`verify_update` recomputes). Signing ``time`` and ``id`` binds the signature to one
event; a replay of the very same event is caught by the aggregator's duplicate check.

The key is chosen by the *claimed* ``client_id``, so changing the client id breaks the signature.
Keys are raw bytes (at least 16); files and Redis hold them as hex.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from schemas.errors import ConfigError, SignatureError
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope, canonical_json

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
REDIS_KEYS_HASH = "pfi:clients:keys"
_DERIVE_LABEL = b"pfi-client-key:"


class KeyStore(Protocol):
    """Where verifiers find a client's HMAC key. ``get`` must be cheap and thread-safe."""

    def get(self, client_id: str) -> bytes | None: ...


def generate_key() -> bytes:
    """32 random bytes."""
    return secrets.token_bytes(32)


def derive_client_key(master: bytes, client_id: str) -> bytes:
    """Deterministic per-client key: HMAC-SHA256(master, label || client_id). For simulations."""
    return hmac.new(master, _DERIVE_LABEL + client_id.encode(), hashlib.sha256).digest()


def _parse_key(client_id: str, value: object) -> bytes:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise ValueError(f"key of {client_id!r} is not a hex string")
    key = bytes.fromhex(value)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key of {client_id!r} has {len(key)} bytes, at least {MIN_KEY_BYTES} required")
    return key


class StaticKeyStore:
    """Keys held in memory."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = dict(keys)

    def get(self, client_id: str) -> bytes | None:
        return self._keys.get(client_id)


class FileKeyStore:
    """Keys from a JSON file ``{client_id: hex_key}``; read on construction and on :meth:`reload`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._keys: dict[str, bytes] = {}
        self.reload()

    def reload(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"cannot read the keys file {self.path}: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"keys file {self.path}: expected a JSON object {{client_id: hex_key}}")
        keys: dict[str, bytes] = {}
        for client_id, value in raw.items():
            try:
                keys[client_id] = _parse_key(client_id, value)
            except ValueError as err:
                raise ConfigError(f"keys file {self.path}: {err}") from None
        self._keys = keys

    def get(self, client_id: str) -> bytes | None:
        return self._keys.get(client_id)

    @staticmethod
    def write(path: Path | str, keys: Mapping[str, bytes]) -> None:
        """Write ``keys`` as a keys file (mode 0600)."""
        target = Path(path)
        target.write_text(
            json.dumps({c: k.hex() for c, k in sorted(keys.items())}, indent=2), encoding="utf-8"
        )
        target.chmod(0o600)


class RedisKeyStore:
    """An in-memory cache of the Redis hash ``pfi:clients:keys`` (field: client id, value: hex key).

    Verification runs in worker threads, so :meth:`get` never touches Redis: the event loop calls
    :meth:`refresh` (at start and periodically) and readers see the last loaded snapshot.
    """

    def __init__(self, hash_key: str = REDIS_KEYS_HASH) -> None:
        self.hash_key = hash_key
        self._keys: dict[str, bytes] = {}

    async def refresh(self, redis_client: Any) -> int:
        """Reload every key from Redis (``redis.asyncio.Redis``); skips bad entries. Returns the count."""
        result = redis_client.hgetall(self.hash_key)
        raw = await result if inspect.isawaitable(result) else result
        keys: dict[str, bytes] = {}
        for field, value in dict(raw).items():
            client_id = field.decode() if isinstance(field, bytes) else str(field)
            try:
                keys[client_id] = _parse_key(client_id, value)
            except ValueError as err:
                log.warning("ignoring a bad key in %s: %s", self.hash_key, err)
        self._keys = keys  # one reference swap: readers see the old or the new snapshot
        return len(keys)

    async def put(self, redis_client: Any, client_id: str, key: bytes) -> None:
        """Register ``key`` for ``client_id`` in Redis and in the cache."""
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"keys need at least {MIN_KEY_BYTES} bytes")
        result = redis_client.hset(self.hash_key, client_id, key.hex())
        if inspect.isawaitable(result):
            await result
        self._keys = {**self._keys, client_id: key}

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
