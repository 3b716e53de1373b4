"""Bearer tokens: a user, a device or an admin of ONE federation, bound to a server secret.

Format: ``pfi2.<payload>.<signature>``, both parts unpadded base64url. ``payload`` is canonical JSON
``{"sub": id, "rol": "user"|"device"|"admin", "fed": name, "iat": unix, "exp": unix, "jti": hex}``;
``signature`` is HMAC-SHA256 over ``pfi2.<payload>`` with the server secret. Every token is limited to
its ``fed`` (admin tokens too). A user token acts only as its own ``sub``; a device token's ``sub`` is
its client id (it is the user of its own personal adapter, and publishes updates as that client); an
admin token may act on any user of its federation and use the admin routes. Lifetimes: 1 h by default
(15 min for admin tokens), at most 7 days.

Revocation: a token's ``jti`` in ``pfi:tokens:revoked`` (zset jti -> exp), or, for a device token, its
client revoked after the token was issued (``pfi:tokens:revoked-clients``). :class:`RevocationCache`
holds both in memory, refreshed by a background task whenever ``pfi:tokens:epoch`` moves (polled every
0.5 s); :meth:`Authenticator.authenticate` checks signature, expiry and revocation with no I/O.
Every failure is an :class:`Unauthorized` naming the reason.

The secret comes from ``PFI_SERVE_TOKEN_SECRET``. Without it (development) a random secret is
generated once into ``<PFI_HOME>/serve/token-secret`` (mode 0600) with a warning, so ``pfi serve`` and
``pfi token issue`` on the same machine agree.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from redis.asyncio import Redis

from schemas.errors import ConfigError
from schemas.events import NAME_PATTERN
from services.personalization.errors import Forbidden, Unauthorized
from services.settings import PFISettings, ServeSettings
from services.store import keys as rk

log = logging.getLogger("pfi.serve.auth")

Role = Literal["user", "device", "admin"]
ROLES: tuple[Role, ...] = ("user", "device", "admin")
PREFIX = "pfi2"
USER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
FEDERATION_PATTERN = re.compile(NAME_PATTERN)
JTI_PATTERN = re.compile(r"^[0-9a-f]{16,64}$")
MAX_TOKEN_CHARS = 2048
DEFAULT_TTL_S = 3600
ADMIN_TTL_S = 15 * 60
MAX_TTL_S = 7 * 24 * 3600
LEEWAY_S = 5
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def default_ttl(role: Role) -> int:
    return ADMIN_TTL_S if role == "admin" else DEFAULT_TTL_S


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    user: str
    role: Role
    federation: str
    expires_at: int
    issued_at: int = 0
    jti: str = ""

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def device(self) -> bool:
        return self.role == "device"

    def require_admin(self) -> None:
        if not self.admin:
            raise Forbidden("this route needs an admin token")

    def require_federation(self, fed: str) -> None:
        if self.federation != fed:
            raise Forbidden(f"the token is limited to federation {self.federation!r}")

    def require_user(self, fed: str, user: str) -> None:
        """May this principal read, use, overwrite or delete ``user``'s adapter in ``fed``?"""
        self.require_federation(fed)
        if self.admin:
            return
        if user != self.user:
            raise Forbidden("a token may only act on its own user's adapter")

    def require_device(self, fed: str, client_id: str | None = None) -> None:
        """A device token of ``fed`` (and, when given, of ``client_id``)."""
        self.require_federation(fed)
        if not self.device:
            raise Forbidden("this route needs a device token")
        if client_id is not None and client_id != self.user:
            raise Forbidden("a device token may only act as its own client")


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: int
    principal: Principal


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def valid_user_id(user: str) -> bool:
    return bool(USER_PATTERN.fullmatch(user))


def _malformed(what: str = "malformed token payload") -> Unauthorized:
    return Unauthorized(what, code="token_malformed")


def _principal_of(payload: object) -> Principal:
    if not isinstance(payload, dict):
        raise _malformed()
    user, role, fed = payload.get("sub"), payload.get("rol"), payload.get("fed")
    issued, expires, jti = payload.get("iat"), payload.get("exp"), payload.get("jti")
    if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
        raise _malformed()
    if role not in ROLES:
        raise _malformed()
    if not isinstance(fed, str) or not FEDERATION_PATTERN.fullmatch(fed):
        raise _malformed("the token names no federation")
    if type(issued) is not int or type(expires) is not int or expires <= issued:
        raise _malformed()
    if expires - issued > MAX_TTL_S:
        raise _malformed("the token's lifetime exceeds the maximum")
    if not isinstance(jti, str) or not JTI_PATTERN.fullmatch(jti):
        raise _malformed()
    return Principal(
        user=user, role=cast(Role, role), federation=fed, expires_at=expires, issued_at=issued, jti=jti
    )


class TokenSigner:
    """Issues and verifies (signature, claims, expiry; not revocation) tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("the token secret must be at least 16 bytes")
        self._secret = secret

    def _sign(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def mint(
        self,
        user: str,
        *,
        federation: str,
        role: Role = "user",
        ttl_s: float | None = None,
        now: float | None = None,
    ) -> IssuedToken:
        if not valid_user_id(user):
            raise ConfigError(f"invalid user id {user!r} (letters, digits and ._:@-, at most 128)")
        if not isinstance(federation, str) or not FEDERATION_PATTERN.fullmatch(federation):
            raise ConfigError(f"a token needs a valid federation name, not {federation!r}")
        if role not in ROLES:
            raise ConfigError(f"unknown token role {role!r}")
        ttl = default_ttl(role) if ttl_s is None else int(ttl_s)
        if ttl <= 0:
            raise ConfigError("the token ttl must be positive")
        if ttl > MAX_TTL_S:
            raise ConfigError(f"the token ttl may be at most {MAX_TTL_S // 86400} days")
        issued = int(now if now is not None else time.time())
        jti = secrets.token_hex(16)
        payload: dict[str, Any] = {
            "sub": user,
            "rol": role,
            "fed": federation,
            "iat": issued,
            "exp": issued + ttl,
            "jti": jti,
        }
        body = _b64(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
        message = f"{PREFIX}.{body}"
        token = f"{message}.{_b64(self._sign(message.encode()))}"
        return IssuedToken(token, jti, issued + ttl, _principal_of(payload))

    def issue(
        self,
        user: str,
        *,
        federation: str,
        role: Role = "user",
        ttl_s: float | None = None,
        now: float | None = None,
    ) -> str:
        return self.mint(user, federation=federation, role=role, ttl_s=ttl_s, now=now).token

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("missing or oversized bearer token", code="token_malformed")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise Unauthorized("malformed bearer token", code="token_malformed")
        try:
            signature = _unb64(parts[2])
        except ValueError:
            raise Unauthorized("malformed bearer token signature", code="token_malformed") from None
        try:
            message = f"{parts[0]}.{parts[1]}".encode("ascii")
        except UnicodeEncodeError:
            raise Unauthorized("malformed bearer token", code="token_malformed") from None
        if not hmac.compare_digest(signature, self._sign(message)):
            raise Unauthorized("bad token signature", code="token_signature")
        try:
            payload = json.loads(_unb64(parts[1]))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _malformed() from None
        who = _principal_of(payload)
        if (now if now is not None else time.time()) > who.expires_at + LEEWAY_S:
            raise Unauthorized("the token has expired", code="token_expired")
        return who


@dataclass
class _Revoked:
    jtis: frozenset[str] = frozenset()
    clients: dict[str, float] = field(default_factory=dict)  # "<fed>/<client_id>" -> revoked_at


class RevocationCache:
    """Revoked token ids and revoked clients, in memory. :meth:`is_revoked` does no I/O; :meth:`run`
    (a background task of the service) reloads when ``pfi:tokens:epoch`` moves."""

    def __init__(self, *, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._state = _Revoked()
        self._epoch: int | None = None
        self.loaded_at: float | None = None  # monotonic time of the last successful check

    @property
    def loaded(self) -> bool:
        return self._epoch is not None

    def is_revoked(self, who: Principal) -> bool:
        state = self._state
        if who.jti in state.jtis:
            return True
        if who.device:
            revoked_at = state.clients.get(rk.revoked_client_member(who.federation, who.user))
            if revoked_at is not None and who.issued_at <= revoked_at:
                return True
        return False

    async def refresh(self, redis: Redis, *, force: bool = False) -> None:
        raw = await redis.get(rk.TOKENS_EPOCH)
        epoch = int(raw) if raw is not None else 0
        if force or epoch != self._epoch:
            now = time.time()
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(rk.TOKENS_EPOCH)
                pipe.zrangebyscore(rk.TOKENS_REVOKED, now - LEEWAY_S, "+inf")
                pipe.zrangebyscore(
                    rk.TOKENS_REVOKED_CLIENTS, now - MAX_TTL_S - LEEWAY_S, "+inf", withscores=True
                )
                raw_epoch, jtis, clients = await pipe.execute()
            parsed = {(n.decode() if isinstance(n, bytes) else str(n)): float(score) for n, score in clients}
            self._state = _Revoked(
                frozenset(j.decode() if isinstance(j, bytes) else str(j) for j in jtis), parsed
            )
            self._epoch = int(raw_epoch) if raw_epoch is not None else 0
        self.loaded_at = time.monotonic()

    async def run(self, redis: Redis) -> None:
        """Poll forever (cancel to stop); Redis errors are logged and retried."""
        failing = False
        while True:
            try:
                await self.refresh(redis)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not failing:
                    log.warning("cannot refresh token revocations: %s", err)
                failing = True
            await asyncio.sleep(self.interval_s)


async def revoke_token(redis: Redis, jti: str, expires_at: float | None = None) -> None:
    """Revoke one token by its ``jti`` (until ``expires_at``; unknown: the longest lifetime)."""
    if not JTI_PATTERN.fullmatch(jti):
        raise ConfigError(f"not a token id: {jti!r}")
    now = time.time()
    until = expires_at if expires_at is not None else now + MAX_TTL_S
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zadd(rk.TOKENS_REVOKED, {jti: until})
        pipe.zremrangebyscore(rk.TOKENS_REVOKED, "-inf", now - 2 * LEEWAY_S)
        pipe.incr(rk.TOKENS_EPOCH)
        await pipe.execute()


class Authenticator:
    """Signature + expiry + revocation of an ``Authorization`` header, in memory (no I/O)."""

    def __init__(self, signer: TokenSigner, revocations: RevocationCache | None = None) -> None:
        self.signer = signer
        self.revocations = revocations if revocations is not None else RevocationCache()

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        who = self.signer.verify(token, now=now)
        if self.revocations.is_revoked(who):
            raise Unauthorized("the token has been revoked", code="token_revoked")
        return who

    def authenticate(self, authorization: str | None) -> Principal:
        """Verify an ``Authorization`` header value (``Bearer <token>``)."""
        if not authorization:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)", code="token_missing")
        if len(authorization) > MAX_TOKEN_CHARS + 16:
            raise Unauthorized("oversized bearer token", code="token_malformed")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("expected 'Authorization: Bearer <token>'", code="token_malformed")
        return self.verify(token.strip())


def secret_path(settings: PFISettings) -> Path:
    return settings.home / "serve" / "token-secret"


def load_secret(serve: ServeSettings, settings: PFISettings) -> bytes:
    """The configured secret, or the development secret under ``PFI_HOME`` (generated once, warned)."""
    if serve.token_secret:
        return serve.token_secret.encode()
    path = secret_path(settings)
    if path.exists():
        text = path.read_text().strip()
        if text:
            log.warning("PFI_SERVE_TOKEN_SECRET is unset: using the development secret in %s", path)
            return text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and never replaces a secret another process wrote first
    except FileExistsError:
        text = path.read_text().strip()
    finally:
        tmp.unlink()
    log.warning(
        "PFI_SERVE_TOKEN_SECRET is unset: generated a development secret in %s (set it in production)",
        path,
    )
    return text.encode()
