"""Device identity over HTTP: enrollment, device-token refresh, and the admin routes over clients.

* ``POST /v1/federations/{fed}/enroll`` — ``Authorization: Bearer pfe1...`` (an enrollment token, not a
  bearer token); body ``{"client_id"?: str}`` (at most 1 KiB; empty: a generated id) -> 201
  ``{"federation", "client_id", "signing_key" (hex), "token", "expires_at"}``.
* ``POST /v1/federations/{fed}/clients/{cid}/token`` — ``X-PFI-Proof: <unix>.<hex HMAC-SHA256(key,
  "pfi-token:{fed}:{cid}:{unix}")>`` (``|now - unix| <= 300`` s, each proof good once) -> 200 with a new
  device token ``{"federation", "client_id", "token", "expires_at"}``.
* admin (an admin token of ``fed``): ``GET /v1/federations/{fed}/clients``,
  ``DELETE /v1/federations/{fed}/clients/{cid}`` (revoke), ``POST /v1/federations/{fed}/enrollment-tokens``
  ``{"uses", "ttl_s"}`` -> 201 ``{"federation", "id", "token", "uses", "expires_at"}``.

Bodies are read (bounded) only after the credential's form has been checked, and parsed by hand: no
422 before authentication. Every failure is a JSON error in the API's shape; never a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header, Path, Request

from schemas.errors import ConfigError
from services.identity.enrollment import MAX_TTL_S as ENROLL_MAX_TTL_S
from services.identity.enrollment import MAX_USES, EnrollmentError, parse_token
from services.personalization.api import USER_ID
from services.personalization.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServeError,
    Unauthorized,
)
from services.store import keys as rk

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

FED = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="federation name")]
CLIENT = Annotated[str, Path(pattern=USER_ID, description="client id")]
MAX_BODY_BYTES = 1024
PROOF_WINDOW_S = 300
PROOF_HEADER = "X-PFI-Proof"
_PROOF = re.compile(r"^(\d{1,12})\.([0-9a-f]{64})$")

#: Routes that authenticate with something other than a bearer token (an auth-before-parse middleware
#: must let them through to their own checks): (method, path template).
SELF_AUTHENTICATED_ROUTES = (
    ("POST", "/v1/federations/{fed}/enroll"),
    ("POST", "/v1/federations/{fed}/clients/{cid}/token"),
)


def proof_message(fed: str, client_id: str, unix: int) -> bytes:
    return f"pfi-token:{fed}:{client_id}:{unix}".encode()


def make_proof(key: bytes, fed: str, client_id: str, unix: int | None = None) -> str:
    """The ``X-PFI-Proof`` header value (what a device sends; here for tests and harnesses)."""
    unix = int(time.time()) if unix is None else unix
    return f"{unix}.{hmac.new(key, proof_message(fed, client_id, unix), hashlib.sha256).hexdigest()}"


async def _small_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object (empty body: ``{}``), at most :data:`MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise PayloadTooLarge(f"the body may have at most {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"the body may have at most {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON", code="invalid_request") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_request")
    return data


def _int_field(data: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = data.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in {low}..{high}", code="invalid_request")
    return value


def _enrollment_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing enrollment token (Authorization: Bearer pfe1...)", code="token_missing")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith("pfe1."):
        raise Unauthorized("expected 'Authorization: Bearer pfe1...'", code="token_malformed")
    return token


_ENROLL_REFUSALS: dict[str, tuple[type[ServeError], str]] = {
    "malformed": (Unauthorized, "token_malformed"),
    "unknown": (Unauthorized, "enrollment_invalid"),
    "bad_secret": (Unauthorized, "enrollment_invalid"),
    "used_up": (Unauthorized, "enrollment_used_up"),
    "wrong_federation": (Forbidden, "forbidden"),
    "client_exists": (ServeError, "client_exists"),
    "bad_client_id": (BadRequest, "invalid_request"),
}


def identity_router(service: PersonalizationService, router: APIRouter | None = None) -> APIRouter:
    """The routes, on ``router`` (the app's own router: ``identity_router(service, app.router)``, so that
    a middleware resolving route templates from ``app.router.routes`` sees them) or on a new one."""
    router = router if router is not None else APIRouter()

    def device_token(fed: str, client_id: str) -> dict[str, Any]:
        issued = service.signer.mint(client_id, federation=fed, role="device")
        return {
            "federation": fed,
            "client_id": client_id,
            "token": issued.token,
            "expires_at": issued.expires_at,
        }

    @router.post("/v1/federations/{fed}/enroll", status_code=201, tags=["identity"])
    async def enroll(
        fed: FED, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        """Register this device with an enrollment token; returns its signing key and a device token."""
        token = _enrollment_token(authorization)
        try:
            token_fed = parse_token(token)[0]
        except EnrollmentError as err:
            raise Unauthorized(err.message, code="token_malformed") from None
        if token_fed != fed:
            raise Forbidden("the enrollment token is for another federation")
        body = await _small_json(request)
        client_id = body.get("client_id")
        if client_id is not None and (not isinstance(client_id, str) or not re.fullmatch(USER_ID, client_id)):
            raise BadRequest("client_id: letters, digits and ._:@-, at most 128", code="invalid_request")
        if set(body) - {"client_id"}:
            raise BadRequest("unknown fields in the body", code="invalid_request")
        try:
            enrolled = await service.enrollment.redeem(token, fed, client_id)
        except EnrollmentError as err:
            kind, code = _ENROLL_REFUSALS.get(err.reason, (Unauthorized, "enrollment_invalid"))
            raise kind(
                err.message, status=409 if err.reason == "client_exists" else None, code=code
            ) from None
        out = device_token(fed, enrolled.client_id)
        return {**out, "signing_key": enrolled.key.hex()}

    @router.post("/v1/federations/{fed}/clients/{cid}/token", tags=["identity"])
    async def refresh_token(
        fed: FED,
        cid: CLIENT,
        x_pfi_proof: Annotated[str | None, Header(alias=PROOF_HEADER)] = None,
    ) -> dict[str, Any]:
        """A new device token for a client that proves it holds its signing key."""
        if not x_pfi_proof:
            raise Unauthorized(f"missing {PROOF_HEADER} header", code="proof_missing")
        match = _PROOF.fullmatch(x_pfi_proof.strip())
        if match is None:
            raise Unauthorized(f"malformed {PROOF_HEADER} header", code="proof_malformed")
        unix, mac = int(match.group(1)), match.group(2)
        if abs(time.time() - unix) > PROOF_WINDOW_S:
            raise Unauthorized("the key proof is stale (check the device clock)", code="proof_stale")
        record = await service.clients.get(fed, cid)
        key = record.key if record is not None and record.active else b"\0" * 32
        good = hmac.compare_digest(
            mac, hmac.new(key, proof_message(fed, cid, unix), hashlib.sha256).hexdigest()
        )
        if record is None or not record.active or not good:
            raise Unauthorized("bad key proof, or the client is unknown or revoked", code="proof_invalid")
        # each proof is good once (a captured header cannot mint more tokens)
        digest = hashlib.sha256(x_pfi_proof.strip().encode()).hexdigest()
        if not await service.redis.set(
            rk.token_proof(fed, digest), b"1", nx=True, ex=2 * PROOF_WINDOW_S + 10
        ):
            raise Unauthorized("this key proof was used already", code="proof_replayed")
        return device_token(fed, cid)

    @router.get("/v1/federations/{fed}/clients", tags=["identity"])
    async def list_clients(fed: FED, request: Request) -> dict[str, Any]:
        who = service.authenticator.authenticate(request.headers.get("authorization"))
        who.require_admin()
        who.require_federation(fed)
        records = await service.clients.list(fed)
        return {"federation": fed, "clients": [r.public() for r in records]}

    @router.delete("/v1/federations/{fed}/clients/{cid}", tags=["identity"])
    async def revoke_client(fed: FED, cid: CLIENT, request: Request) -> dict[str, Any]:
        who = service.authenticator.authenticate(request.headers.get("authorization"))
        who.require_admin()
        who.require_federation(fed)
        if await service.clients.revoke(fed, cid):
            return {"federation": fed, "client_id": cid, "status": "revoked"}
        record = await service.clients.get(fed, cid)
        if record is None:
            raise NotFound(f"no client {cid!r} in federation {fed!r}")
        return {"federation": fed, "client_id": cid, "status": record.status}

    @router.post("/v1/federations/{fed}/enrollment-tokens", status_code=201, tags=["identity"])
    async def create_enrollment_token(fed: FED, request: Request) -> dict[str, Any]:
        who = service.authenticator.authenticate(request.headers.get("authorization"))
        who.require_admin()
        who.require_federation(fed)
        body = await _small_json(request)
        if set(body) - {"uses", "ttl_s"}:
            raise BadRequest("unknown fields in the body (uses, ttl_s)", code="invalid_request")
        uses = _int_field(body, "uses", 1, MAX_USES, default=1)
        ttl_s = _int_field(body, "ttl_s", 1, ENROLL_MAX_TTL_S, default=3600)
        if await service.engine.store.get_spec(fed) is None:
            raise NotFound(f"no federation {fed!r}")
        try:
            issued = await service.enrollment.issue(fed, uses=uses, ttl_s=ttl_s)
        except ConfigError as err:
            raise BadRequest(err.message, code="invalid_request") from None
        return {
            "federation": fed,
            "id": issued.token_id,
            "token": issued.token,
            "uses": issued.uses,
            "expires_at": issued.expires_at,
        }

    return router


__all__ = ["PROOF_HEADER", "SELF_AUTHENTICATED_ROUTES", "identity_router", "make_proof"]
