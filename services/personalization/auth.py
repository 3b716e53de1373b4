"""Bearer tokens: a user (or an admin) bound to a server secret.

Format: ``pfi1.<payload>.<signature>``, both parts unpadded base64url. ``payload`` is canonical JSON
``{"sub": user, "adm": bool, "iat": unix, "exp": unix, "fed": name | null}``; ``signature`` is
HMAC-SHA256 over ``pfi1.<payload>`` with the server secret. A user token may act only as its own
``sub`` (and, when ``fed`` is set, only in that federation); an admin token may act as anyone and use
the admin routes. Verification is constant-time and checks expiry; every failure is an
:class:`Unauthorized` naming the reason.

The secret comes from ``PFI_SERVE_TOKEN_SECRET``. Without it (development) a random secret is
generated once into ``<PFI_HOME>/serve/token-secret`` (mode 0600) with a warning, so ``pfi serve`` and
``pfi token issue`` on the same machine agree.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError
from services.personalization.errors import Forbidden, Unauthorized
from services.settings import PFISettings, ServeSettings

log = logging.getLogger("pfi.serve.auth")

PREFIX = "pfi1"
USER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
MAX_TOKEN_CHARS = 4096
DEFAULT_TTL_S = 30 * 24 * 3600
LEEWAY_S = 5


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    user: str
    admin: bool
    expires_at: int
    federation: str | None = None

    def require_admin(self) -> None:
        if not self.admin:
            raise Forbidden("this route needs an admin token")

    def require_user(self, fed: str, user: str) -> None:
        """May this principal read, use, overwrite or delete ``user``'s adapter in ``fed``?"""
        if self.admin:
            return
        if self.federation is not None and self.federation != fed:
            raise Forbidden(f"the token is limited to federation {self.federation!r}")
        if user != self.user:
            raise Forbidden("a token may only act on its own user's adapter")

    def require_federation(self, fed: str) -> None:
        if not self.admin and self.federation is not None and self.federation != fed:
            raise Forbidden(f"the token is limited to federation {self.federation!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def valid_user_id(user: str) -> bool:
    return bool(USER_PATTERN.fullmatch(user))


class TokenSigner:
    """Issues and verifies tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("the token secret must be at least 16 bytes")
        self._secret = secret

    def _sign(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def issue(
        self,
        user: str,
        *,
        admin: bool = False,
        ttl_s: float = DEFAULT_TTL_S,
        federation: str | None = None,
        now: float | None = None,
    ) -> str:
        if not valid_user_id(user):
            raise ConfigError(f"invalid user id {user!r} (letters, digits and ._:@-, at most 128)")
        if ttl_s <= 0:
            raise ConfigError("the token ttl must be positive")
        issued = int(now if now is not None else time.time())
        payload: dict[str, Any] = {
            "sub": user,
            "adm": bool(admin),
            "iat": issued,
            "exp": issued + int(ttl_s),
            "fed": federation,
        }
        body = _b64(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
        message = f"{PREFIX}.{body}"
        return f"{message}.{_b64(self._sign(message.encode()))}"

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
        expected = self._sign(f"{parts[0]}.{parts[1]}".encode())
        if not hmac.compare_digest(signature, expected):
            raise Unauthorized("bad token signature", code="token_signature")
        try:
            payload = json.loads(_unb64(parts[1]))
            user, admin, expires = payload["sub"], payload["adm"], payload["exp"]
            federation = payload.get("fed")
        except (ValueError, KeyError, TypeError):
            raise Unauthorized("malformed token payload", code="token_malformed") from None
        if (
            not isinstance(user, str)
            or not isinstance(admin, bool)
            or not isinstance(expires, int)
            or not (federation is None or isinstance(federation, str))
        ):
            raise Unauthorized("malformed token payload", code="token_malformed")
        if (now if now is not None else time.time()) > expires + LEEWAY_S:
            raise Unauthorized("the token has expired", code="token_expired")
        return Principal(user=user, admin=admin, expires_at=expires, federation=federation)

    def authenticate(self, authorization: str | None) -> Principal:
        """Verify an ``Authorization`` header value (``Bearer <token>``)."""
        if not authorization:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)", code="token_missing")
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
