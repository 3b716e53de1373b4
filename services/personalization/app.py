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

Routes here: the probes and the federations (metadata, global adapter blobs). The others are routers:
:mod:`.personal_adapter_routes`, :mod:`.inference_routes` (generate, score), :mod:`.adapter_export_routes`,
:mod:`.document_routes`, :mod:`.identity_routes`, :mod:`.openai_compat` and the device ingest
(:mod:`services.ingest.routes`); their shared dependencies are in :mod:`.route_deps`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.ingest.routes import ingest_router
from services.personalization.adapter_export_routes import adapter_export_router
from services.personalization.api import ERRORS
from services.personalization.document_routes import document_router
from services.personalization.errors import ServeError, Unauthorized
from services.personalization.identity_routes import identity_router
from services.personalization.inference_routes import inference_router
from services.personalization.limits import GateMiddleware, route_template
from services.personalization.openai_compat import openai_routes
from services.personalization.personal_adapter_routes import personal_adapter_router
from services.personalization.route_deps import FED, Auth, within_timeout
from services.personalization.service import PersonalizationService

log = logging.getLogger("pfi.serve.http")

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
        # the routers added with include_router too (FastAPI keeps each as one entry without a path)
        return route_template(self.fastapi.router.routes, scope) or "unmatched"

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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """A body FastAPI cannot parse (not UTF-8, not JSON) in the API's error shape; others as usual."""
        if exc.status_code != 400:
            return await http_exception_handler(request, exc)
        request.state.error_code = "invalid_request"
        return _error(400, "invalid_request", f"the body is not valid UTF-8 JSON ({exc.detail})")

    # -- dependencies -------------------------------------------------------------------------------
    async def bounded(awaitable: Awaitable[T]) -> T:
        return await within_timeout(awaitable, serve.request_timeout_s)

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

    app.include_router(personal_adapter_router(service))  # PUT/GET/DELETE a user's personal adapter
    app.include_router(inference_router(service))  # POST generate, score
    app.include_router(ingest_router(service))  # POST /v1/federations/{fed}/updates (devices)
    app.include_router(adapter_export_router(service))  # a personal adapter as PEFT / GGUF (zip)
    app.include_router(document_router(service))  # a user's private documents (retrieval store)
    identity_router(service, app.router)  # enroll, token refresh, admin: clients, enrollment tokens
    openai_routes(service, app.router)  # /v1/completions, /v1/chat/completions, /v1/models
    app.add_middleware(GateMiddleware, service=service, fastapi=app)  # body size, then the token
    app.add_middleware(MetricsMiddleware, service=service, fastapi=app)  # outermost: counts the gate too
    return app
