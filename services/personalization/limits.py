"""The gate every HTTP request passes before any route runs: body size, then the bearer token.

:class:`GateMiddleware` is a pure ASGI middleware (it never buffers a body):

1. **Body size.** Each route has a byte cap (:func:`body_caps`): a personal adapter upload
   ``max_upload_bytes``, a device update ``kafka_max_message_bytes``, an enrollment 1 KiB, adding
   documents :func:`documents_body_cap`, a document search 64 KiB, routes
   without a body and the other routes without a bearer token 1 KiB, every other route (JSON)
   :func:`json_body_cap`. A ``Content-Length`` over the cap is answered 413 at once, before
   authentication and without reading a byte; a chunked body is counted as the route reads it and
   answered 413 the moment the count passes the cap (the route sees a disconnect, nothing more is read).
2. **Authentication.** Every ``/v1`` route except those that authenticate with something else
   (:data:`services.personalization.identity_routes.SELF_AUTHENTICATED_ROUTES`) needs a valid bearer
   token, checked from the header alone (:meth:`Authenticator.authenticate`: signature, expiry,
   revocation, no I/O) before the body is read or parsed: no token, no 422 and no read. The principal
   is left in ``scope["state"]["principal"]`` for the routes (no second verification).

Early answers carry ``Connection: close`` so that a server never drains an unread body, and are in
OpenAI's error shape on the OpenAI-compatible paths (an OpenAI completion's cap:
:func:`~.openai_compat.schemas.body_cap`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import Match

from services.personalization.api import MAX_CONTEXT_BYTES
from services.personalization.errors import ServeError, Unauthorized
from services.personalization.identity_routes import MAX_BODY_BYTES as ENROLL_MAX_BYTES
from services.personalization.identity_routes import SELF_AUTHENTICATED_ROUTES
from services.personalization.openai_compat.errors import error_body, is_openai_path
from services.personalization.openai_compat.schemas import CHAT_ROUTE, COMPLETIONS_ROUTE
from services.personalization.openai_compat.schemas import body_cap as completion_body_cap
from services.settings import PFISettings, ServeSettings

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

log = logging.getLogger("pfi.serve.gate")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KIB = 1024
ADAPTER_ROUTE = ("PUT", "/v1/federations/{fed}/users/{user}/adapter")
UPDATES_ROUTE = ("POST", "/v1/federations/{fed}/updates")
ENROLL_ROUTE = ("POST", "/v1/federations/{fed}/enroll")
DOCUMENTS_ROUTE = ("POST", "/v1/federations/{fed}/users/{user}/documents")
DOCUMENT_SEARCH_ROUTE = ("POST", "/v1/federations/{fed}/users/{user}/documents/search")
SEARCH_CAP = 64 * KIB  # a query of at most 4096 characters, k and mode
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
BODYLESS_CAP = 1 * KIB


def json_body_cap(serve: ServeSettings) -> int:
    """The largest JSON body a route of this service needs: ``max_score_texts`` texts of
    ``max_prompt_chars`` characters (UTF-8: at most 4 bytes each) plus 64 KiB for the rest."""
    return 4 * serve.max_prompt_chars * max(1, serve.max_score_texts) + 4 * MAX_CONTEXT_BYTES + 64 * KIB


def documents_body_cap(serve: ServeSettings) -> int:
    """An add-documents body: ``doc_max_request_chars`` characters (4 bytes each at most) + 64 KiB."""
    return 4 * serve.doc_max_request_chars + 64 * KIB


def body_caps(settings: PFISettings, serve: ServeSettings) -> dict[tuple[str, str], int]:
    """Per-route caps, ``(method, path template) -> bytes``; other routes get :func:`json_body_cap`."""
    return {
        ADAPTER_ROUTE: serve.max_upload_bytes,
        UPDATES_ROUTE: settings.kafka_max_message_bytes,
        ENROLL_ROUTE: ENROLL_MAX_BYTES,
        COMPLETIONS_ROUTE: completion_body_cap(serve),
        CHAT_ROUTE: completion_body_cap(serve),
        DOCUMENTS_ROUTE: documents_body_cap(serve),
        DOCUMENT_SEARCH_ROUTE: SEARCH_CAP,
    }


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, *, path: str = ""
) -> JSONResponse:
    """An early answer in the API's error shape (OpenAI's on the OpenAI-compatible paths)."""
    native = {"error": {"code": code, "message": message}}
    return JSONResponse(
        error_body(status, code, message) if is_openai_path(path) else native,
        status_code=status,
        headers={"Connection": "close", **(headers or {})},
    )


def route_template(routes: Any, scope: Scope) -> str | None:
    """The path template of the route matching ``scope``. Routers added with ``include_router`` (no
    prefix in this app) are searched too: FastAPI keeps them as one entry that holds the original router."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found = route_template(inner.routes, scope)
            if found is not None:
                return found
            continue
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", None))
    return None


class GateMiddleware:
    def __init__(self, app: ASGIApp, service: PersonalizationService, fastapi: FastAPI) -> None:
        self.app = app
        self.service = service
        self.fastapi = fastapi
        self.caps = body_caps(service.settings, service.serve)
        self.json_cap = json_body_cap(service.serve)
        self.open_routes = frozenset(SELF_AUTHENTICATED_ROUTES)

    def _template(self, scope: Scope) -> str | None:
        return route_template(self.fastapi.router.routes, scope)

    def cap(self, method: str, template: str | None) -> int:
        if template is not None and (method, template) in self.caps:
            return self.caps[(method, template)]
        if method in BODYLESS_METHODS or (method, template) in self.open_routes:
            return BODYLESS_CAP  # no body needed, or no bearer token to answer for a large one
        return self.json_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope["method"]).upper()
        path = str(scope.get("path", ""))
        template = self._template(scope)
        cap = self.cap(method, template)
        metrics = self.service.metrics
        state = scope.setdefault("state", {})

        declared: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                text = value.decode("latin-1").strip()
                declared = int(text) if text.isdigit() else None
        if declared is not None and declared > cap:
            metrics.body_rejections.labels(reason="declared").inc()
            state["error_code"] = "payload_too_large"
            await _error(
                413,
                "payload_too_large",
                f"the body has {declared} bytes; this route accepts at most {cap}",
                path=path,
            )(scope, receive, send)
            return

        if path.startswith("/v1/") and (method, template) not in self.open_routes:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            try:
                state["principal"] = self.service.authenticator.authenticate(headers.get("authorization"))
            except ServeError as err:
                state["error_code"] = err.code
                if isinstance(err, Unauthorized):
                    metrics.auth_failures.labels(reason=err.code).inc()
                extra = {"WWW-Authenticate": 'Bearer realm="pfi"'} if isinstance(err, Unauthorized) else {}
                await _error(err.status, err.code, err.message, extra, path=path)(scope, receive, send)
                return

        received = 0
        responded = False  # by us (413 mid-body): the app's own answer is dropped
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if responded:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def counted_receive() -> Message:
            nonlocal received, responded
            if responded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                metrics.body_bytes.inc(size)
                if received > cap:
                    metrics.body_rejections.labels(reason="streamed").inc()
                    state["error_code"] = "payload_too_large"
                    if not started:
                        await _error(
                            413,
                            "payload_too_large",
                            f"the body exceeds this route's limit of {cap} bytes",
                            path=path,
                        )(scope, receive, send)
                    responded = True
                    return {"type": "http.disconnect"}
            return message

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not responded:
                raise
            # The route failed on the disconnect we gave it after answering 413: nothing to report.
