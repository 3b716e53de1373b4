"""``POST /v1/federations/{fed}/updates``: devices upload their updates here (the REST-proxy pattern).

One request carries ONE framed message (``application/octet-stream``): a whole signed ``AdapterUpdate``
or one signed ``AdapterUpdateChunk`` (``schemas.chunking.split_frame(..., key=...)``). In this order,
each step refusing with a JSON error (``{"error": {"code", "message"}}``) and producing nothing:

1. a device token of ``fed`` (401 without a valid token, 403 for another federation or a user/admin token);
2. the client's quota: in-flight requests and a byte-rate token bucket (429 + ``Retry-After``);
   a declared ``Content-Length`` over ``PFISettings.kafka_max_message_bytes`` is a 413 before any read;
3. the body, read up to that limit (413 past it), decoded in a worker thread (400 for garbage);
4. the message's ``federation`` is ``fed`` and its ``client_id`` is the token's subject (403);
5. the signature verifies under the client's key from the federation's registry (403; chunks must be
   signed too; a client that is unknown or revoked is refused);
6. idempotency (:mod:`services.ingest.idempotency`): a message already stored is answered 202 with its
   original ``partition``/``offset`` and ``"duplicate": true`` and produced nothing; one that another
   request is producing right now is a 409 ``in_progress`` + ``Retry-After: 1``;
7. produced keyed by federation (``federation/client`` for a hierarchical one) with ``acks=all`` by the
   ``ingest`` Kafka principal: 202 ``{"update_id", "partition", "offset"}``; Kafka (or the client
   registry) unavailable: 503 + ``Retry-After``.

The app's gate (:mod:`services.personalization.limits`) checks the body cap and the token first; the
route uses the principal it left (and checks the token itself when mounted without the gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import APIRouter, FastAPI, Header, Path, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.errors import RejectedInput, SignatureError
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame
from schemas.signing import KeyStore, verify_chunk, verify_update
from services.ingest.idempotency import Claim, UploadLedger, message_part
from services.ingest.metrics import IngestMetrics
from services.ingest.producer import Produced, UpdateProducer
from services.ingest.quota import Quotas
from services.ingest.settings import IngestSettings
from services.ingest.topology import TopologyCache
from services.personalization.auth import Principal
from services.personalization.errors import ServeError, Unauthorized

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

log = logging.getLogger("pfi.ingest")

FED = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="federation name")]
UPDATES_PATH = "/v1/federations/{fed}/updates"


class KeySource(Protocol):
    """The verifier's view of the client registry (``services.identity.keys.FederationKeys``)."""

    def view(self, fed: str) -> KeyStore: ...

    async def refresh(self, redis: Redis, feds: Iterable[str], *, force: bool = False) -> None: ...

    async def ensure(self, redis: Redis, fed: str, client_id: str) -> None: ...


class IngestRefused(ServeError):
    """A refused upload (status and code set per case)."""


@dataclass(frozen=True)
class Accepted:
    update_id: str
    partition: int
    offset: int
    duplicate: bool = False


def _refuse(status: int, code: str, message: str) -> IngestRefused:
    return IngestRefused(message, status=status, code=code)


def _decode(body: bytes, max_bytes: int) -> Envelope[Any]:
    return decode_frame(body, max_frame_bytes=max_bytes)


class IngestGate:
    """The ingest's state: quotas, key cache, producer (started lazily, closed with the service)."""

    def __init__(
        self,
        service: PersonalizationService,
        settings: IngestSettings | None = None,
        *,
        keys: KeySource | None = None,
        producer: UpdateProducer | None = None,
    ) -> None:
        self.service = service
        self.settings = settings or IngestSettings()
        self.max_bytes = service.settings.kafka_max_message_bytes
        self.topologies = TopologyCache()  # issue 15: hierarchical federations are keyed by client
        self.metrics = IngestMetrics(service.registry)
        self.quotas = Quotas(
            client_in_flight=self.settings.client_in_flight,
            total_in_flight=self.settings.total_in_flight,
            bytes_per_s=self.settings.client_bytes_per_s,
            burst_bytes=max(self.settings.client_burst_bytes, self.max_bytes),
            max_clients=self.settings.max_tracked_clients,
        )
        self._keys = keys
        self._ledger: UploadLedger | None = None
        self.producer = producer or UpdateProducer(
            service.settings, principal="ingest", client_id="pfi-ingest"
        )

    @property
    def keys(self) -> KeySource:
        if self._keys is None:
            from services.identity.keys import FederationKeys

            self._keys = FederationKeys()
        return self._keys

    @property
    def ledger(self) -> UploadLedger:
        if self._ledger is None:
            self._ledger = UploadLedger(
                self.service.redis,
                ttl_s=self.settings.dedupe_ttl_s,
                pending_ttl_s=int(self.settings.produce_timeout_s) + 30,
            )
        return self._ledger

    async def close(self) -> None:
        await self.producer.close()

    # -- the steps ---------------------------------------------------------------------------------

    def authenticate(self, fed: str, authorization: str | None, verified: Principal | None = None) -> str:
        """The client id of a device token of ``fed`` (raises 401/403). ``verified``: the principal the
        app's gate already authenticated from the same header (not verified twice)."""
        who = verified if verified is not None else self.service.authenticator.authenticate(authorization)
        if not who.device:
            raise _refuse(403, "not_a_device", f"uploads need a device token, not a {who.role} token")
        if who.federation != fed:
            raise _refuse(403, "wrong_federation", f"the token is not a device token of federation {fed!r}")
        return str(who.user)

    async def read_body(self, request: Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise _refuse(413, "payload_too_large", f"a message may have at most {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def check(self, fed: str, client_id: str, body: bytes) -> Envelope[Any]:
        if not body:
            raise _refuse(400, "malformed", "empty body: send one framed message")
        try:
            envelope = await asyncio.to_thread(_decode, body, self.max_bytes)
        except RejectedInput as err:
            raise _refuse(400, "malformed", f"not a valid framed message: {err.message}") from None
        data = envelope.data
        if not isinstance(data, AdapterUpdate | AdapterUpdateChunk):
            raise _refuse(400, "wrong_event", f"expected an adapter update or chunk, got {envelope.type}")
        if data.federation != fed:
            raise _refuse(403, "wrong_federation", f"the message is for federation {data.federation!r}")
        if data.client_id != client_id:
            raise _refuse(403, "wrong_client", "the message's client_id is not the token's client")
        redis = self.service.redis
        try:
            await self.keys.refresh(redis, [fed])  # rate-limited (<= 1/s): revocations apply within seconds
            await self.keys.ensure(redis, fed, client_id)
        except RedisError as err:
            log.warning("ingest: client registry unavailable: %s", err)
            raise _refuse(
                503, "registry_unavailable", "the client registry is unavailable; retry later"
            ) from None
        store = self.keys.view(fed)
        if store.get(client_id) is None:
            raise _refuse(403, "unknown_client", f"client {client_id!r} is not active in {fed!r}")
        try:
            if isinstance(data, AdapterUpdate):
                verify_update(envelope, store, payload_verified=True)
            else:
                verify_chunk(envelope, store, payload_verified=True)
        except SignatureError as err:
            code = "unsigned" if not data.signature else "bad_signature"
            raise _refuse(403, code, err.message) from None
        return envelope

    async def produce(self, fed: str, body: bytes, key: str | None = None) -> Produced:
        started = time.perf_counter()
        try:
            produced = await asyncio.wait_for(
                self.producer.produce(fed, body, key=key), self.settings.produce_timeout_s
            )
        except Exception as err:  # TimeoutError, KafkaError, ProducerClosedError...
            log.warning("ingest: produce to Kafka failed: %s: %s", type(err).__name__, err)
            raise _refuse(503, "kafka_unavailable", "the update log is unavailable; retry later") from None
        self.metrics.produce_seconds.observe(time.perf_counter() - started)
        return produced

    async def produce_claimed(self, fed: str, body: bytes, kafka_key: str | None, claim: Claim) -> Produced:
        """Produce under ``claim``: settled with the position, or released when producing failed."""
        try:
            produced = await self.produce(fed, body, kafka_key)
        except BaseException:
            with contextlib.suppress(RedisError):  # an unreleased claim expires after pending_ttl_s
                await self.ledger.release(claim)
            raise
        try:
            await self.ledger.settle(claim, produced.partition, produced.offset)
        except RedisError as err:  # stored all the same: a retry after the claim expired may produce again
            log.warning("ingest: recording %s failed: %s", claim.key, err)
        return produced

    async def handle(self, fed: str, request: Request, authorization: str | None) -> Accepted:
        verified = getattr(request.state, "principal", None)
        client_id = self.authenticate(
            fed, authorization, verified if isinstance(verified, Principal) else None
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _refuse(413, "payload_too_large", f"a message may have at most {self.max_bytes} bytes")
        charge = int(declared) if declared is not None and declared.isdigit() else self.max_bytes
        key = (fed, client_id)
        refusal = self.quotas.admit(key, charge)
        if refusal is not None:
            raise QuotaExceeded(refusal.message, code=refusal.reason, retry_after_s=refusal.retry_after_s)
        used = 0
        try:
            body = await self.read_body(request)
            used = len(body)
            envelope = await self.check(fed, client_id, body)
            data = envelope.data
            try:
                kafka_key = await self.topologies.key(self.service.redis, fed, client_id)
                claim = await self.ledger.claim(fed, client_id, data.update_id, message_part(data))
            except RedisError:
                raise _refuse(503, "registry_unavailable", "the federation registry is unavailable") from None
            if claim.state == "done":
                self.metrics.duplicates.inc()
                return Accepted(str(data.update_id), claim.partition, claim.offset, duplicate=True)
            if claim.state == "pending":
                raise InProgress("this message is being stored by another request; retry shortly")
            produced = await self.produce_claimed(fed, body, kafka_key, claim)
        finally:
            self.quotas.release(key, refund=max(0, charge - used))
        self.metrics.messages.labels(kind="update" if isinstance(data, AdapterUpdate) else "chunk").inc()
        self.metrics.bytes.labels(outcome="accepted").observe(len(body))
        return Accepted(str(data.update_id), produced.partition, produced.offset)


class InProgress(ServeError):
    """The same message is being produced by another request (409, retry after a second)."""

    status = 409
    code = "in_progress"


class QuotaExceeded(ServeError):
    status = 429
    code = "quota"

    def __init__(self, message: str, *, code: str, retry_after_s: int) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


def _outcome(err: ServeError) -> str:
    if err.status in (409, 429):  # retry later: in progress elsewhere, or over quota
        return "throttled"
    if err.status == 503:
        return "unavailable"
    return "refused"


def ingest_router(
    service: PersonalizationService,
    settings: IngestSettings | None = None,
    *,
    keys: KeySource | None = None,
) -> APIRouter:
    """The ingest route for ``service`` (``app.include_router(ingest_router(service))``). The gate is
    closed with the service (and with the app's lifespan when the app manages it)."""
    gate = IngestGate(service, settings, keys=keys)
    service.on_stop(gate.close)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await gate.close()

    router = APIRouter(lifespan=lifespan)
    router.gate = gate  # type: ignore[attr-defined]  # tests and harnesses reach it here

    @router.post(
        UPDATES_PATH,
        tags=["ingest"],
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def post_update(
        fed: FED, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        """Upload one framed update or signed chunk (device token of ``fed``)."""
        gate.metrics.in_flight.inc()
        try:
            accepted = await gate.handle(fed, request, authorization)
        except ServeError as err:
            request.state.error_code = err.code
            gate.metrics.requests.labels(outcome=_outcome(err), reason=err.code).inc()
            headers: dict[str, str] = {}
            if isinstance(err, Unauthorized):
                headers["WWW-Authenticate"] = 'Bearer realm="pfi"'
            if isinstance(err, QuotaExceeded):
                headers["Retry-After"] = str(err.retry_after_s)
            elif isinstance(err, InProgress):
                headers["Retry-After"] = "1"
            elif err.status == 503:
                headers["Retry-After"] = str(gate.settings.retry_after_s)
            if err.status != 401 and err.status < 500:
                gate.metrics.bytes.labels(outcome="refused").observe(
                    int(request.headers.get("content-length") or 0)
                    if (request.headers.get("content-length") or "").isdigit()
                    else 0
                )
            return JSONResponse(
                {"error": {"code": err.code, "message": err.message}}, status_code=err.status, headers=headers
            )
        finally:
            gate.metrics.in_flight.dec()
        gate.metrics.requests.labels(
            outcome="accepted", reason="duplicate" if accepted.duplicate else "ok"
        ).inc()
        answer: dict[str, Any] = {
            "update_id": accepted.update_id,
            "partition": accepted.partition,
            "offset": accepted.offset,
        }
        if accepted.duplicate:
            answer["duplicate"] = True
        return JSONResponse(answer, status_code=202)

    return router
