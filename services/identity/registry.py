"""The per-federation client registry in Redis.

``pfi:{fed}:clients`` is a hash ``client_id -> JSON {"key": hex, "status": "active"|"revoked",
"enrolled_at": unix, "revoked_at": unix|null, "via": "<enrollment id>"|"admin"}``; every change INCRs
``pfi:{fed}:clients:epoch`` in the same transaction (verifiers poll the epoch and reload on change).
A client is accepted by a verifier only while it is ``active`` in its federation's registry.

Revoking a client also records it in the zset ``pfi:tokens:revoked-clients`` (``"<fed>/<client_id>"``,
score revoked_at; entries older than any token's lifetime are pruned) and bumps ``pfi:tokens:epoch``,
so the API's ``RevocationCache`` refuses the client's device tokens issued before the revocation
within a second.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from schemas.errors import ConfigError
from schemas.events import ID_PATTERN, NAME_PATTERN
from schemas.signing import MIN_KEY_BYTES, generate_key
from services.store import keys as rk
from services.store.scripts import lua

#: How long a client revocation is kept for the token check: longer than any bearer token lives (7 days).
REVOCATION_HORIZON_S = 8 * 24 * 3600
ACTIVE = "active"
REVOKED = "revoked"
_FED = re.compile(NAME_PATTERN)
_CLIENT = re.compile(ID_PATTERN)


def check_federation(fed: str) -> str:
    if not isinstance(fed, str) or not _FED.fullmatch(fed):
        raise ConfigError(f"invalid federation name {fed!r}")
    return fed


def check_client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not _CLIENT.fullmatch(client_id):
        raise ConfigError(f"invalid client id {client_id!r} (letters, digits and ._:@-, at most 128)")
    return client_id


@dataclass(frozen=True)
class ClientRecord:
    federation: str
    client_id: str
    key: bytes
    status: str
    enrolled_at: float
    revoked_at: float | None
    via: str

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    def to_json(self) -> str:
        return json.dumps(
            {
                "key": self.key.hex(),
                "status": self.status,
                "enrolled_at": self.enrolled_at,
                "revoked_at": self.revoked_at,
                "via": self.via,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def public(self) -> dict[str, Any]:
        """Everything but the key (what list routes and ``pfi clients list`` show)."""
        return {
            "client_id": self.client_id,
            "status": self.status,
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
            "via": self.via,
        }


def parse_record(fed: str, client_id: str, raw: bytes | str) -> ClientRecord:
    """A record from its stored JSON; ``ValueError`` when it is not one."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    key = bytes.fromhex(str(data["key"]))
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key has {len(key)} bytes, at least {MIN_KEY_BYTES} required")
    status = data["status"]
    if status not in (ACTIVE, REVOKED):
        raise ValueError(f"unknown status {status!r}")
    revoked_at = data.get("revoked_at")
    return ClientRecord(
        federation=fed,
        client_id=client_id,
        key=key,
        status=status,
        enrolled_at=float(data.get("enrolled_at") or 0.0),
        revoked_at=None if revoked_at is None else float(revoked_at),
        via=str(data.get("via") or "admin"),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClientRegistry:
    """Register, look up, list and revoke a federation's clients (operators, the enrollment route)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._revoke = redis.register_script(lua("revoke_client.lua"))

    @staticmethod
    def new_record(
        fed: str, client_id: str, key: bytes, *, via: str = "admin", now: float | None = None
    ) -> ClientRecord:
        check_federation(fed)
        check_client_id(client_id)
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"client keys need at least {MIN_KEY_BYTES} bytes")
        return ClientRecord(
            federation=fed,
            client_id=client_id,
            key=bytes(key),
            status=ACTIVE,
            enrolled_at=time.time() if now is None else now,
            revoked_at=None,
            via=via,
        )

    async def register(
        self, fed: str, client_id: str, key: bytes | None = None, *, via: str = "admin"
    ) -> bytes:
        """Create (or replace, re-activating a revoked one) a client with ``key`` (random when None);
        returns the key. Device tokens issued before an earlier revocation stay dead."""
        key = key if key is not None else generate_key()
        await self.register_many(fed, {client_id: key}, via=via)
        return key

    async def register_many(self, fed: str, keys: Mapping[str, bytes], *, via: str = "admin") -> None:
        """Register many clients in one transaction (fleets, simulations, benchmarks)."""
        if not keys:
            return
        now = time.time()
        records = {c: self.new_record(fed, c, k, via=via, now=now).to_json() for c, k in keys.items()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(rk.clients(fed), mapping=records)  # type: ignore[arg-type]
            pipe.incr(rk.clients_epoch(fed))
            await pipe.execute()

    async def get(self, fed: str, client_id: str) -> ClientRecord | None:
        raw = await self.redis.hget(rk.clients(check_federation(fed)), client_id)
        if raw is None:
            return None
        try:
            return parse_record(fed, client_id, raw)
        except (ValueError, KeyError, TypeError):
            return None

    async def list(self, fed: str) -> list[ClientRecord]:
        raw = await self.redis.hgetall(rk.clients(check_federation(fed)))
        out: list[ClientRecord] = []
        for field, value in raw.items():
            try:
                out.append(parse_record(fed, _text(field), value))
            except (ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda r: r.client_id)

    async def revoke(self, fed: str, client_id: str) -> bool:
        """Mark the client revoked (its key is refused by verifiers, its device tokens by the API).
        False when it is unknown or already revoked."""
        check_federation(fed)
        now = time.time()
        result = await self._revoke(keys=[rk.clients(fed), rk.clients_epoch(fed)], args=[client_id, now])
        if not result:
            return False
        # Another slot (global): a second step. Verifiers refuse the key from the registry already.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(rk.TOKENS_REVOKED_CLIENTS, {rk.revoked_client_member(fed, client_id): now})
            pipe.zremrangebyscore(rk.TOKENS_REVOKED_CLIENTS, "-inf", now - REVOCATION_HORIZON_S)
            pipe.incr(rk.TOKENS_EPOCH)
            await pipe.execute()
        return True

    async def epoch(self, fed: str) -> int:
        raw = await self.redis.get(rk.clients_epoch(check_federation(fed)))
        return int(raw) if raw is not None else 0
