"""The HTTP API (FastAPI). :func:`create_app` wires routes to a :class:`PersonalizationService`.

Auth: every ``/v1`` route needs ``Authorization: Bearer <token>`` (401 without a valid one). User
tokens may read federation metadata and global adapters (edge agents download from here) and act on
their *own* personal adapter only (403 otherwise); admin tokens may act on anyone and list
federations. ``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and Prometheus).

Before any route runs, :class:`~.limits.GateMiddleware` refuses an oversized body (413, per-route caps,
counted while streaming, never buffered) and then a missing or bad token (401) from the header alone,
so nothing unauthenticated is read or parsed. The model queue is bounded and fair across users:
over a bound a request gets 429 with ``Retry-After`` (:mod:`.batcher`).

Errors are JSON ``{"error": {"code", "message"}}`` with a 4xx status for anything the client can fix;
an unexpected failure is a 500 and the service stays up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Match

from services.ingest.routes import ingest_router
from services.personalization.api import (
    ERRORS,
    USER_ID,
    VERSION_MAX,
    AdapterInfo,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
    ServedFields,
    TextScore,
)
from services.personalization.auth import Principal
from services.personalization.engine import Served
from services.personalization.errors import PayloadTooLarge, ServeError, Timeout, Unauthorized
from services.personalization.identity_routes import identity_router
from services.personalization.limits import GateMiddleware
from services.personalization.service import PersonalizationService
from services.personalization.user_adapters import AdapterRecord

log = logging.getLogger("pfi.serve.http")

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FED = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="federation name")]
USER = Annotated[str, Path(pattern=USER_ID, description="user id")]


async def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    verified = getattr(request.state, "principal", None)  # by the gate, before the body was read
    if isinstance(verified, Principal):
        return verified
    service: PersonalizationService = request.app.state.service
    return service.authenticator.authenticate(authorization)


Auth = Annotated[Principal, Depends(_principal)]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class MetricsMiddleware:
    """Per-route RED metrics (route *templates*, never ids) and a last-resort 500 for anything that
    escapes the routes, so an unexpected exception never takes the service down."""

    def __init__(self, app: ASGIApp, service: PersonalizationService, fastapi: FastAPI) -> None:
        self.app = app
        self.service = service
        self.fastapi = fastapi

    def _route(self, scope: Scope) -> str:
        for route in self.fastapi.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", "other"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.service.metrics
        route, method = self._route(scope), scope["method"]
        status = 500
        started_response = False

        async def wrapped(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started_response = True
            await send(message)

        began = time.perf_counter()
        metrics.in_flight.labels(route=route).inc()
        try:
            await self.app(scope, receive, wrapped)
        except Exception:
            log.exception("unhandled error on %s %s", method, route)
            status = 500
            scope.setdefault("state", {})["error_code"] = "internal"
            if not started_response:
                response = _error(500, "internal", "internal error (logged by the service)")
                await response(scope, receive, send)
        finally:
            metrics.in_flight.labels(route=route).dec()
            metrics.request_seconds.labels(route=route, method=method).observe(time.perf_counter() - began)
            metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            if status >= 400:
                code = scope.get("state", {}).get("error_code") or str(status)
                metrics.request_errors.labels(route=route, method=method, code=code).inc()


def create_app(service: PersonalizationService, *, manage_lifespan: bool = True) -> FastAPI:
    """The ASGI app. With ``manage_lifespan`` the app starts/stops ``service`` in its lifespan
    (uvicorn); tests that drive the app in-process start the service themselves."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifespan:
            await service.start()
        try:
            yield
        finally:
            if manage_lifespan:
                await service.stop()

    app = FastAPI(
        title="PFI personalization service",
        version="1",
        description="Base model + global adapter (merged, hot-swapped) + personal adapter, per user.",
        lifespan=lifespan,
    )
    app.state.service = service
    serve = service.serve

    # -- errors -------------------------------------------------------------------------------------
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        request.state.error_code = exc.code
        headers = {"WWW-Authenticate": 'Bearer realm="pfi"'} if isinstance(exc, Unauthorized) else None
        retry_after = getattr(exc, "retry_after_s", None)
        if isinstance(retry_after, int):
            headers = {**(headers or {}), "Retry-After": str(retry_after)}
        if isinstance(exc, Unauthorized):
            service.metrics.auth_failures.labels(reason=exc.code).inc()
        return _error(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.state.error_code = "invalid_request"
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    # -- dependencies -------------------------------------------------------------------------------
    async def bounded(awaitable: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(awaitable, serve.request_timeout_s)
        except TimeoutError:
            raise Timeout(f"the request took longer than {serve.request_timeout_s:g}s") from None

    def served_fields(fed: str, user: str | None, served: Served) -> dict[str, Any]:
        return {
            "federation": fed,
            "user_id": user,
            "global_version": served.global_version,
            "personal_adapter_version": served.personal_adapter_version,
            "timing": served.timing,
        }

    def served_headers(response: Response, body: ServedFields) -> None:
        response.headers["X-PFI-Global-Version"] = str(body.global_version)
        response.headers["X-PFI-Personal-Adapter-Version"] = str(body.personal_adapter_version)

    def acting_user(who: Principal, fed: str, user_id: str | None) -> str | None:
        """The user whose adapter a request uses: the body's, else the token's (admin: none)."""
        user = user_id if user_id is not None else (None if who.admin else who.user)
        who.require_federation(fed)
        if user is not None:
            who.require_user(fed, user)
        return user

    # -- probes ---------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        ok, checks = await service.ready()
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    # -- federations ----------------------------------------------------------------------------------
    @app.get("/v1/federations", tags=["federations"], responses=ERRORS)
    async def list_federations(who: Auth) -> dict[str, Any]:
        who.require_admin()
        engine = service.engine
        names = [n for n in await engine.store.list_federations() if n == who.federation]
        rows = []
        for name in names:
            runtime = engine.runtimes.get(name)
            rows.append(
                {
                    "name": name,
                    "latest_version": await engine.store.latest(name),
                    "served_version": None
                    if runtime is None or runtime.current is None
                    else runtime.current.version,
                }
            )
        return {"federations": rows}

    @app.get("/v1/federations/{fed}", tags=["federations"], responses=ERRORS)
    async def federation(fed: FED, who: Auth) -> dict[str, Any]:
        who.require_federation(fed)
        view = await bounded(service.engine.federation_view(fed))
        view["adapter_url"] = f"/v1/federations/{fed}/versions/latest/adapter"
        return view

    @app.get(
        "/v1/federations/{fed}/versions/{version}/adapter",
        tags=["federations"],
        responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
        response_class=Response,
    )
    async def global_adapter(
        fed: FED,
        version: Annotated[str, Path(description="a version number or 'latest'")],
        who: Auth,
        if_none_match: Annotated[str | None, Header()] = None,
        digest: Annotated[
            str | None,
            Query(
                pattern="^[0-9a-f]{64}$",
                description="expected blob digest: the response is then cacheable forever (409 if the "
                "version now has other content)",
            ),
        ] = None,
    ) -> Response:
        """The blob of a global version. ``ETag`` is its sha256 digest. A version number alone does not
        name content forever (a Redis failover can re-make version N with other content), so only a
        URL that carries the digest is ``immutable``; every other answer must be revalidated."""
        who.require_federation(fed)
        number, blob, meta = await bounded(service.engine.global_blob(fed, version))
        actual = meta.digest if meta is not None else ""
        if digest is not None and digest != actual:
            raise ServeError(
                f"global v{number} of {fed!r} now has digest {actual}, not {digest}",
                status=409,
                code="digest_mismatch",
            )
        headers = {
            "ETag": f'"{actual}"',
            "X-PFI-Federation": fed,
            "X-PFI-Version": str(number),
            "X-PFI-Digest": actual,
            "X-PFI-Encoding": "float32;none;zstd",
            "Cache-Control": "private, max-age=31536000, immutable" if digest is not None else "no-cache",
        }
        if if_none_match is not None and if_none_match.strip() in (f'"{actual}"', actual):
            return Response(status_code=304, headers=headers)
        return Response(blob, media_type="application/octet-stream", headers=headers)

    # -- personal adapters ----------------------------------------------------------------------------
    def adapter_info(record: AdapterRecord) -> AdapterInfo:
        data = record.model_dump(mode="json")
        return AdapterInfo(**data)

    async def read_body(request: Request) -> bytes:
        limit = serve.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.put(
        "/v1/federations/{fed}/users/{user}/adapter",
        tags=["personal adapters"],
        status_code=201,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def put_adapter(
        fed: FED,
        user: USER,
        request: Request,
        who: Auth,
        trained_against: Annotated[
            int, Query(ge=0, le=VERSION_MAX, description="global version it was trained against")
        ],
        dtype: Annotated[str, Query(pattern="^(float32|float16|bfloat16)$")] = "float32",
        quantization: Annotated[str, Query(pattern="^(none|int8)$")] = "none",
    ) -> AdapterInfo:
        """Upload a personal adapter: a safetensors blob keyed like the federation's adapter (as
        ``schemas.codec.encode_tensors`` writes it; zstd detected from the magic)."""
        who.require_user(fed, user)
        body = await read_body(request)
        record = await bounded(
            service.engine.upload(
                fed, user, body, trained_against=trained_against, dtype=dtype, quantization=quantization
            )
        )
        return adapter_info(record)

    @app.get("/v1/federations/{fed}/users/{user}/adapter", tags=["personal adapters"], responses=ERRORS)
    async def get_adapter(fed: FED, user: USER, who: Auth) -> AdapterInfo:
        who.require_user(fed, user)
        return adapter_info(await bounded(service.engine.adapter_record(fed, user)))

    @app.delete(
        "/v1/federations/{fed}/users/{user}/adapter",
        tags=["personal adapters"],
        status_code=204,
        responses=ERRORS,
        response_class=Response,
    )
    async def delete_adapter(fed: FED, user: USER, who: Auth) -> Response:
        """Erase the adapter from Redis and from the cache of every replica."""
        who.require_user(fed, user)
        await bounded(service.engine.delete(fed, user))
        return Response(status_code=204)

    # -- inference ------------------------------------------------------------------------------------
    @app.post("/v1/federations/{fed}/generate", tags=["inference"], responses=ERRORS)
    async def generate(fed: FED, body: GenerateRequest, who: Auth, response: Response) -> GenerateResponse:
        user = acting_user(who, fed, body.user_id)
        result = await bounded(
            service.engine.generate(
                fed,
                user,
                body.prompt,
                max_new_tokens=body.max_new_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                version=body.global_version,
                use_personal=body.use_personal,
                tenant=f"{who.federation}/{who.user}",
            )
        )
        out = GenerateResponse(
            **served_fields(fed, user, result.served),
            text=result.text,
            tokens=result.tokens,
            prompt_tokens=result.prompt_tokens,
            generated_tokens=len(result.tokens),
            finish_reason=result.finish_reason,
        )
        served_headers(response, out)
        return out

    @app.post("/v1/federations/{fed}/score", tags=["inference"], responses=ERRORS)
    async def score(fed: FED, body: ScoreRequest, who: Auth, response: Response) -> ScoreResponse:
        user = acting_user(who, fed, body.user_id)
        result = await bounded(
            service.engine.score(
                fed,
                user,
                body.texts,
                version=body.global_version,
                use_personal=body.use_personal,
                tenant=f"{who.federation}/{who.user}",
            )
        )
        out = ScoreResponse(
            **served_fields(fed, user, result.served),
            results=[
                TextScore(
                    mean_nll=r.mean_nll,
                    perplexity=math.exp(min(r.mean_nll, 700.0)),
                    token_accuracy=r.accuracy,
                    tokens=r.tokens,
                )
                for r in result.results
            ],
        )
        served_headers(response, out)
        return out

    app.include_router(ingest_router(service))  # POST /v1/federations/{fed}/updates (devices)
    identity_router(service, app.router)  # enroll, token refresh, admin: clients, enrollment tokens
    app.add_middleware(GateMiddleware, service=service, fastapi=app)  # body size, then the token
    app.add_middleware(MetricsMiddleware, service=service, fastapi=app)  # outermost: counts the gate too
    return app
