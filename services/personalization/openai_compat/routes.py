"""The OpenAI-compatible routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models`` and ``GET /v1/models/{model}``.

* ``model`` names a federation the token can see (every token is limited to one federation), optionally
  pinned to a retained global version: ``fed@N``. Anything else is a 404 ``model_not_found``.
* The user is the token's (its personal adapter is applied); the OpenAI ``user`` field may name another
  user only with an admin token (403 otherwise).
* Generation is the native ``generate`` path (same tokenization, limits, fair queue, model thread,
  metrics), so the same seed and parameters give the same text. ``stream: true`` answers server-sent
  events in OpenAI's chunk format, each piece of text sent as the model thread produces it
  (:mod:`.streaming`); a client that goes away mid-stream ends the generation at its next token.
* Errors are OpenAI-shaped (:mod:`.errors`) with the status of the service's own error; the gate's
  early answers (401, 413) on these paths take the same shape (:mod:`..limits`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from services.personalization.auth import Principal
from services.personalization.engine import GenerateResult
from services.personalization.errors import Forbidden, Gone, NotFound, ServeError, Timeout, Unauthorized
from services.personalization.openai_compat.chat import chat_prompt
from services.personalization.openai_compat.errors import (
    ModelNotFound,
    error_body,
    error_response,
    from_serve_error,
)
from services.personalization.openai_compat.metrics import OpenAIMetrics
from services.personalization.openai_compat.replies import Reply, served_headers
from services.personalization.openai_compat.schemas import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    parse_body,
    parse_model,
)
from services.personalization.openai_compat.streaming import DONE, EventStream, TokenStream, sse

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

log = logging.getLogger("pfi.serve.openai")
T = TypeVar("T")
TAGS: list[str | Any] = ["OpenAI-compatible"]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined (an OpenAPI request body cannot use them)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return dict(walk(schema))


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    schema = _inline(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class OpenAICompat:
    def __init__(self, service: PersonalizationService) -> None:
        self.service = service
        self.metrics = OpenAIMetrics(service.registry)

    # -- shared -------------------------------------------------------------------------------------
    def principal(self, request: Request) -> Principal:
        verified = getattr(request.state, "principal", None)  # by the gate, from the header alone
        if isinstance(verified, Principal):
            return verified
        return self.service.authenticator.authenticate(request.headers.get("authorization"))

    async def answer(self, request: Request, handler: Callable[[Principal], Awaitable[Response]]) -> Response:
        """Run ``handler`` for the request's principal; a refusal becomes an OpenAI-shaped error."""
        try:
            return await handler(self.principal(request))
        except ServeError as err:
            request.state.error_code = err.code
            if isinstance(err, Unauthorized):
                self.service.metrics.auth_failures.labels(reason=err.code).inc()
            return from_serve_error(err)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            request.state.error_code = "internal"
            return error_response(500, "internal", "internal error (logged by the service)")

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        timeout = self.service.serve.request_timeout_s
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise Timeout(f"the request took longer than {timeout:g}s") from None

    @staticmethod
    def federation_of(who: Principal, model: str) -> tuple[str, int | None]:
        try:
            fed, version = parse_model(model)
        except ValueError:
            raise ModelNotFound(model, "use a federation name, or name@version") from None
        if fed != who.federation:
            raise ModelNotFound(model)
        return fed, version

    @staticmethod
    def acting_user(who: Principal, fed: str, user: str | None) -> str | None:
        """The token's user; ``user`` may name another one only for an admin (none: global only)."""
        if user is not None and user != who.user and not who.admin:
            raise Forbidden("`user` names another user: only an admin token may act for another user")
        acting = user if user is not None else (None if who.admin else who.user)
        who.require_federation(fed)
        if acting is not None:
            who.require_user(fed, acting)
        return acting

    # -- models -------------------------------------------------------------------------------------
    async def _entries(self, fed: str) -> list[dict[str, Any]]:
        store = self.service.engine.store
        latest = await store.latest(fed)
        if latest is None:
            return []
        versions = sorted(set(await store.retained_versions(fed)) | {latest})
        metas = await asyncio.gather(*(store.get_meta(fed, v) for v in versions))
        created = {
            v: 0 if m is None else int(m.created_at.timestamp()) for v, m in zip(versions, metas, strict=True)
        }

        def entry(model_id: str, version: int) -> dict[str, Any]:
            return {
                "id": model_id,
                "object": "model",
                "created": created[version],
                "owned_by": "pfi",
                "pfi": {"federation": fed, "global_version": version},
            }

        return [entry(fed, latest), *(entry(f"{fed}@{v}", v) for v in reversed(versions))]

    async def models(self, who: Principal) -> Response:
        entries = await self.bounded(self._entries(who.federation))
        return JSONResponse({"object": "list", "data": entries})

    async def model(self, who: Principal, model: str) -> Response:
        fed, _ = self.federation_of(who, model)
        found = [e for e in await self.bounded(self._entries(fed)) if e["id"] == model]
        if not found:
            raise ModelNotFound(model)
        return JSONResponse(found[0])

    # -- completions --------------------------------------------------------------------------------
    async def complete(self, request: Request, who: Principal, *, chat: bool) -> Response:
        started = time.perf_counter()
        raw = await request.body()  # bounded by the gate (body_cap)
        body: CompletionRequest | ChatRequest = (
            parse_body(ChatRequest, raw) if chat else parse_body(CompletionRequest, raw)
        )
        fed, version = self.federation_of(who, body.model)
        user = self.acting_user(who, fed, body.user)
        engine = self.service.engine
        try:
            tokens = (await self.bounded(engine.runtime(fed))).base_only().tokens
            budget: int
            if isinstance(body, ChatRequest):
                prompt = await asyncio.to_thread(chat_prompt, tokens, body.messages)
                asked = body.budget
                budget = (
                    asked if asked is not None else await asyncio.to_thread(self._chat_budget, tokens, prompt)
                )
            else:
                prompt = body.text
                budget = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
            loop = asyncio.get_running_loop()
            counted = self.metrics.stream_tokens if body.stream else None
            stream = TokenStream(loop, tokens.decode, body.stops, counted)
            call = engine.generate(
                fed,
                user,
                prompt,
                max_new_tokens=budget,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                version=version,
                tenant=f"{who.federation}/{who.user}",
                on_token=stream,  # stop strings, and a generation that outlives its request ends
            )
            reply = Reply(chat, body.model, fed, body.stops)
            if body.stream:
                return await self._stream(call, stream, reply, body.include_usage, started)
            try:
                result = await self.bounded(call)
            finally:
                stream.cancel()  # timed out or cancelled: the model thread stops at the next token
        except (NotFound, Gone) as err:
            raise ModelNotFound(body.model, err.message) from None
        return JSONResponse(reply.whole(result), headers=served_headers(result))

    def _chat_budget(self, tokens: Any, prompt: str) -> int:
        """Chat without ``max_tokens``: as many tokens as the cap and the model's positions allow."""
        room = int(tokens.max_positions) - len(tokens.encode(prompt))
        return max(1, min(self.service.serve.max_new_tokens, room))

    async def _stream(
        self,
        call: Awaitable[GenerateResult],
        stream: TokenStream,
        reply: Reply,
        include_usage: bool,
        started: float,
    ) -> Response:
        """Start the generation and answer once its first piece of text (or its end) is there, so a
        refusal (429, 413, 404...) is still an HTTP status and not an event."""
        task = asyncio.ensure_future(call)
        task.add_done_callback(lambda _: stream.close())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.service.serve.request_timeout_s
        try:
            first = await asyncio.wait_for(stream.queue.get(), deadline - loop.time())
        except BaseException as err:  # timed out, or this request was cancelled
            stream.cancel()
            task.cancel()
            self.metrics.streams.labels(
                outcome="timeout" if isinstance(err, TimeoutError) else "cancelled"
            ).inc()
            if isinstance(err, TimeoutError):
                raise Timeout("no first token in time") from None
            raise
        if first is None and not task.cancelled() and task.exception() is not None:
            self.metrics.streams.labels(outcome="error").inc()
            await task  # raises: a ServeError is answered with its status, anything else is a 500
        if first is not None:
            self.metrics.first_token.observe(time.perf_counter() - started)
        outcome = ["cancelled"]  # unless the events get to their end: the client went away

        def close() -> None:
            if not task.done():
                stream.cancel()  # the model thread ends the row at its next token
                task.cancel()
            self.metrics.streams.labels(outcome=outcome[0]).inc()

        return EventStream(self._events(task, stream, reply, first, deadline, include_usage, outcome), close)

    async def _events(
        self,
        task: asyncio.Future[GenerateResult],
        stream: TokenStream,
        reply: Reply,
        first: str | None,
        deadline: float,
        include_usage: bool,
        outcome: list[str],
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        sent: list[str] = []
        try:
            if reply.chat:
                yield sse(reply.chunk(role=True))
            piece = first
            while piece is not None:
                sent.append(piece)
                yield sse(reply.chunk(piece))
                piece = await asyncio.wait_for(stream.queue.get(), max(0.0, deadline - loop.time()))
            result = await task
            text, finish = reply.final_text(result)
            streamed = "".join(sent)
            if not text.startswith(streamed):
                log.warning("streamed text is not a prefix of the decoded completion; the rest is dropped")
            rest = text[len(streamed) :] if text.startswith(streamed) else ""
            yield sse(reply.chunk(rest, finish=finish, result=result))
            if include_usage:
                yield sse(reply.usage_chunk(result))
            yield DONE
            outcome[0] = "completed"
        except TimeoutError:
            outcome[0] = "timeout"
            timeout = self.service.serve.request_timeout_s
            yield sse(error_body(504, "timeout", f"the request took longer than {timeout:g}s"))
        except ServeError as err:
            outcome[0] = "error"
            yield sse(error_body(err.status, err.code, err.message))
        except Exception:
            log.exception("streamed completion failed")
            outcome[0] = "error"
            yield sse(error_body(500, "internal", "internal error (logged by the service)"))


def openai_routes(service: PersonalizationService, router: APIRouter | None = None) -> APIRouter:
    """The routes, on ``router`` (the app's own: ``openai_routes(service, app.router)``, so that the
    gate and the metrics middleware resolve their templates) or on a new one."""
    router = router if router is not None else APIRouter()
    api = OpenAICompat(service)
    errors: dict[int | str, dict[str, Any]] = {
        code: {"description": "OpenAI-shaped error"} for code in (400, 401, 403, 404, 413, 422, 429)
    }

    @router.get("/v1/models", tags=TAGS, responses=errors)
    async def list_models(request: Request) -> Response:
        """The federation of this token as ``fed`` (its latest version) and ``fed@N`` per retained version."""
        return await api.answer(request, api.models)

    @router.get("/v1/models/{model}", tags=TAGS, responses=errors)
    async def get_model(request: Request, model: str) -> Response:
        return await api.answer(request, lambda who: api.model(who, model))

    @router.post("/v1/completions", tags=TAGS, responses=errors, openapi_extra=_body_doc(CompletionRequest))
    async def completions(request: Request) -> Response:
        """OpenAI ``completions`` (``stream: true``: server-sent events, ``data: [DONE]`` last)."""
        return await api.answer(request, lambda who: api.complete(request, who, chat=False))

    @router.post("/v1/chat/completions", tags=TAGS, responses=errors, openapi_extra=_body_doc(ChatRequest))
    async def chat_completions(request: Request) -> Response:
        """OpenAI ``chat.completions`` with the model's chat template (``stream: true``: SSE chunks)."""
        return await api.answer(request, lambda who: api.complete(request, who, chat=True))

    return router
