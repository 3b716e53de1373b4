"""Enrolling a device and keeping its device token fresh.

* :func:`enroll`: ``POST /v1/federations/{fed}/enroll`` with an enrollment token (``pfe1...``, issued by an
  admin: limited uses, expiry) -> the device's :class:`~clients.credentials.Credential` (signing key +
  device token). The caller stores it (mode 0600); the enrollment token is not needed again.
* :func:`refresh_token`: ``POST /v1/federations/{fed}/clients/{cid}/token`` with ``X-PFI-Proof`` (an HMAC
  of ``pfi-token:{fed}:{cid}:{unix}`` under the signing key) -> a new device token.
* :class:`DeviceIdentity`: a credential on disk plus the HTTP client; :meth:`DeviceIdentity.token`
  refreshes the token ``token_refresh_before_s`` before it expires and saves the new one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from clients.credentials import Credential, credential_path, load_credential, save_credential
from clients.http_errors import error_text
from clients.settings import EdgeSettings
from schemas.errors import ConfigError, PFIError

log = logging.getLogger("pfi.edge.enrollment")

PROOF_HEADER = "X-PFI-Proof"


class EnrollmentError(PFIError):
    """The service refused (or could not be reached for) an enrollment or a token refresh."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def make_proof(key: bytes, federation: str, client_id: str, unix: int | None = None) -> str:
    """The ``X-PFI-Proof`` header: ``<unix>.<hex HMAC-SHA256(key, "pfi-token:{fed}:{cid}:{unix}")>``."""
    unix = int(time.time()) if unix is None else unix
    message = f"pfi-token:{federation}:{client_id}:{unix}".encode()
    return f"{unix}.{hmac.new(key, message, hashlib.sha256).hexdigest()}"


async def _post(client: httpx.AsyncClient, url: str, what: str, **kw: Any) -> dict[str, Any]:
    try:
        response = await client.post(url, **kw)
    except httpx.HTTPError as err:
        raise EnrollmentError(f"{what}: {type(err).__name__}: {err}") from None
    if response.status_code >= 400:
        raise EnrollmentError(
            f"{what}: HTTP {response.status_code} {error_text(response)}", response.status_code
        )
    try:
        body = response.json()
    except ValueError:
        raise EnrollmentError(f"{what}: the answer is not JSON") from None
    if not isinstance(body, dict):
        raise EnrollmentError(f"{what}: the answer is not a JSON object")
    return body


async def enroll(
    client: httpx.AsyncClient,
    base_url: str,
    federation: str,
    enrollment_token: str,
    client_id: str | None = None,
) -> Credential:
    """Redeem an enrollment token for this device's credential (not stored: see :func:`save_credential`)."""
    body = await _post(
        client,
        f"{base_url.rstrip('/')}/v1/federations/{federation}/enroll",
        f"enrolling in {federation!r}",
        json={"client_id": client_id} if client_id else {},
        headers={"Authorization": f"Bearer {enrollment_token.strip()}"},
    )
    try:
        credential = Credential(
            federation=str(body["federation"]),
            client_id=str(body["client_id"]),
            signing_key=bytes.fromhex(str(body["signing_key"])),
            token=str(body["token"]),
            expires_at=float(body["expires_at"]),
        )
    except (KeyError, ValueError, TypeError, ConfigError) as err:
        raise EnrollmentError(f"enrolling in {federation!r}: unexpected answer ({err})") from None
    if credential.federation != federation or (client_id and credential.client_id != client_id):
        raise EnrollmentError("enrolling: the service answered for another federation or client")
    return credential


async def refresh_token(
    client: httpx.AsyncClient, base_url: str, credential: Credential, *, unix: int | None = None
) -> Credential:
    """A new device token, proving possession of the signing key (a proof is good once: the service
    refuses a replayed ``unix``)."""
    fed, cid = credential.federation, credential.client_id
    body = await _post(
        client,
        f"{base_url.rstrip('/')}/v1/federations/{fed}/clients/{cid}/token",
        f"refreshing the device token of {cid!r}",
        headers={PROOF_HEADER: make_proof(credential.signing_key, fed, cid, unix)},
    )
    try:
        return credential.with_token(str(body["token"]), float(body["expires_at"]))
    except (KeyError, ValueError, TypeError) as err:
        raise EnrollmentError(f"refreshing the device token: unexpected answer ({err})") from None


class DeviceIdentity:
    """A device's credential (file + memory) and a fresh device token on demand."""

    def __init__(
        self,
        credential: Credential,
        base_url: str,
        *,
        path: Path | None = None,
        client: httpx.AsyncClient | None = None,
        refresh_before_s: float = 300.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.credential = credential
        self.base_url = base_url.rstrip("/")
        self.path = path
        self._own = client is None
        self.client = client if client is not None else httpx.AsyncClient(timeout=timeout_s)
        self.refresh_before_s = refresh_before_s
        self._lock = asyncio.Lock()
        self._last_proof = 0
        self.refreshes = 0

    @property
    def federation(self) -> str:
        return self.credential.federation

    @property
    def client_id(self) -> str:
        return self.credential.client_id

    @property
    def key(self) -> bytes:
        return self.credential.signing_key

    @classmethod
    async def obtain(
        cls,
        settings: EdgeSettings,
        federation: str,
        client_id: str,
        *,
        state_dir: Path | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> DeviceIdentity:
        """The stored credential of ``client_id`` in ``federation``; without one, enroll with
        ``PFI_EDGE_ENROLLMENT_TOKEN`` and store the new credential (mode 0600)."""
        if not settings.service_url:
            raise ConfigError("PFI_EDGE_SERVICE_URL is not set: the device needs the personalization service")
        root = state_dir if state_dir is not None else settings.resolved_state_dir()
        path = settings.credential or credential_path(root, federation, client_id)
        kw: dict[str, Any] = {
            "path": path,
            "client": client,
            "refresh_before_s": settings.token_refresh_before_s,
            "timeout_s": settings.http_timeout_s,
        }
        if path.exists():
            credential = await asyncio.to_thread(load_credential, path)
            if (credential.federation, credential.client_id) != (federation, client_id):
                raise ConfigError(
                    f"the credential {path} is for {credential.client_id!r} in {credential.federation!r}, "
                    f"not {client_id!r} in {federation!r}"
                )
            return cls(credential, settings.service_url, **kw)
        if not settings.enrollment_token:
            raise ConfigError(
                f"no credential at {path} and no PFI_EDGE_ENROLLMENT_TOKEN to enroll with (ask an admin: "
                f"pfi clients enroll-token {federation})"
            )
        http = client if client is not None else httpx.AsyncClient(timeout=settings.http_timeout_s)
        try:
            credential = await enroll(
                http, settings.service_url, federation, settings.enrollment_token, client_id
            )
        except BaseException:
            if client is None:
                await http.aclose()
            raise
        identity = cls(credential, settings.service_url, **{**kw, "client": http})
        identity._own = client is None
        await asyncio.to_thread(save_credential, path, credential)
        log.info("enrolled %s in %s; credential stored in %s", client_id, federation, path)
        return identity

    async def token(self) -> str:
        """The device token, refreshed first when it expires within ``refresh_before_s``."""
        if self.credential.expires_in() > self.refresh_before_s:
            return self.credential.token
        async with self._lock:
            if self.credential.expires_in() > self.refresh_before_s:
                return self.credential.token
            await self._refresh()
            return self.credential.token

    async def refresh(self) -> str:
        """A new token now (after a 401: the old one was revoked or the clock moved)."""
        async with self._lock:
            await self._refresh()
            return self.credential.token

    async def _refresh(self) -> None:
        unix = max(int(time.time()), self._last_proof + 1)  # each proof once: never two in one second
        if unix > time.time():
            await asyncio.sleep(unix - time.time())
        self._last_proof = unix
        self.credential = await refresh_token(self.client, self.base_url, self.credential, unix=unix)
        self.refreshes += 1
        if self.path is not None:
            await asyncio.to_thread(save_credential, self.path, self.credential)

    async def aclose(self) -> None:
        if self._own:
            await self.client.aclose()
