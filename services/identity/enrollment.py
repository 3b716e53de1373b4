"""Enrollment tokens: an admin issues one (limited uses, expiry); a device redeems it once to register.

Token text ``pfe1.<fed>.<id>.<secret>`` (``id``: 16 hex, ``secret``: 43 base64url chars). Redis keeps
only the secret's SHA-256 in ``pfi:{fed}:enroll:<id>`` (hash ``{sha256, uses, expires_at}``, PEXPIRE at
the expiry). Redemption is one Lua script that checks expiry, digest and uses, refuses a client id
that is already registered without consuming a use, and registers the client, in one atomic step.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from schemas.errors import ConfigError, PFIError
from schemas.signing import generate_key
from services.identity.registry import ClientRegistry, check_client_id, check_federation
from services.store import keys as rk
from services.store.scripts import lua

PREFIX = "pfe1"
MAX_USES = 100_000
MAX_TTL_S = 30 * 24 * 3600
MAX_TOKEN_CHARS = 256
_ID = re.compile(r"^[0-9a-f]{16}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")


class EnrollmentError(PFIError):
    """An enrollment token that cannot be redeemed. ``reason``: malformed, wrong_federation, unknown
    (or expired), bad_secret, used_up, client_exists."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EnrollmentToken:
    federation: str
    token_id: str
    token: str
    uses: int
    expires_at: float


@dataclass(frozen=True)
class Enrolled:
    federation: str
    client_id: str
    key: bytes
    via: str
    uses_left: int


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_token(token: str) -> tuple[str, str, str]:
    """``(federation, id, secret)`` of an enrollment token's text; :class:`EnrollmentError` otherwise."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.startswith(PREFIX + "."):
        raise EnrollmentError("malformed enrollment token", "malformed")
    parts = token[len(PREFIX) + 1 :].rsplit(".", 2)
    if len(parts) != 3:
        raise EnrollmentError("malformed enrollment token", "malformed")
    fed, token_id, secret = parts
    try:
        check_federation(fed)
    except ConfigError:
        raise EnrollmentError("malformed enrollment token", "malformed") from None
    if not _ID.fullmatch(token_id) or not _SECRET.fullmatch(secret):
        raise EnrollmentError("malformed enrollment token", "malformed")
    return fed, token_id, secret


class Enrollment:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._redeem = redis.register_script(lua("redeem_enrollment.lua"))

    async def issue(self, fed: str, *, uses: int, ttl_s: float) -> EnrollmentToken:
        check_federation(fed)
        if not isinstance(uses, int) or not 1 <= uses <= MAX_USES:
            raise ConfigError(f"enrollment token uses must be 1..{MAX_USES}")
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise ConfigError(f"enrollment token ttl must be 1 s .. {MAX_TTL_S // 86400} days")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires_at = time.time() + ttl_s
        key = rk.enrollment(fed, token_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"sha256": _digest(secret), "uses": uses, "expires_at": repr(expires_at)})
            pipe.pexpire(key, int(ttl_s * 1000) + 1)
            await pipe.execute()
        return EnrollmentToken(fed, token_id, f"{PREFIX}.{fed}.{token_id}.{secret}", uses, expires_at)

    async def redeem(self, token: str, fed: str, client_id: str | None = None) -> Enrolled:
        """Register a new client of ``fed`` (``client_id`` or a generated one) with a fresh key."""
        token_fed, token_id, secret = parse_token(token)
        if token_fed != fed:
            raise EnrollmentError("the enrollment token is for another federation", "wrong_federation")
        if client_id is None:
            client_id = f"dev-{secrets.token_hex(8)}"
        try:
            check_client_id(client_id)
        except ConfigError as err:
            raise EnrollmentError(err.message, "bad_client_id") from None
        key = generate_key()
        via = f"enroll:{token_id}"
        record = ClientRegistry.new_record(fed, client_id, key, via=via)
        code, left = await self._redeem(
            keys=[rk.enrollment(fed, token_id), rk.clients(fed), rk.clients_epoch(fed)],
            args=[_digest(secret), repr(time.time()), client_id, record.to_json()],
        )
        code = int(code)
        if code == 1:
            return Enrolled(fed, client_id, key, via, int(left))
        reason, message = {
            -1: ("unknown", "the enrollment token is unknown or expired"),
            -2: ("bad_secret", "the enrollment token is not valid"),
            -3: ("used_up", "the enrollment token has no uses left"),
            -4: ("client_exists", f"client {client_id!r} is already registered"),
        }.get(code, ("unknown", "the enrollment token is not valid"))
        raise EnrollmentError(message, reason)

    async def revoke(self, fed: str, token_id: str) -> bool:
        return bool(await self.redis.delete(rk.enrollment(check_federation(fed), token_id)))
