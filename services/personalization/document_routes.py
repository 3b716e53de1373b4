"""A user's private documents over HTTP (retrieval store; logic in :mod:`.user_documents`).

* ``POST   /v1/federations/{fed}/users/{user}/documents`` ``{"documents": [{"id"?, "text", "metadata"?}]}``
  -> 201 ``{"documents": [{"id", "chunks", "chars", "created_at", "metadata"}], "generation"}``
* ``GET    /v1/federations/{fed}/users/{user}/documents?offset=0&limit=100``
  -> ``{"documents", "total", "offset", "limit"}``
* ``DELETE /v1/federations/{fed}/users/{user}/documents/{doc_id}`` -> 204 (404 if there is none)
* ``DELETE /v1/federations/{fed}/users/{user}/documents`` -> 204 (every document; nothing left in Redis)
* ``POST   /v1/federations/{fed}/users/{user}/documents/search`` ``{"query", "k", "mode"}`` -> ``{"hits"}``

Same token rules as the personal adapter: a user token acts on its own user only, an admin token of the
federation on anyone (403 otherwise). The gate (:mod:`.limits`) has already bounded the body and checked
the token; errors are the API's JSON errors (``{"error": {"code", "message"}}``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from services.personalization.api import ERRORS, USER_ID
from services.personalization.auth import Principal
from services.personalization.document_api import (
    MAX_LIST_LIMIT,
    AddDocumentsRequest,
    DocumentInfo,
    DocumentList,
    DocumentsAdded,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from services.personalization.documents import DOC_ID, DocumentRecord
from services.personalization.errors import NotFound, Timeout

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

T = TypeVar("T")
FED = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="federation name")]
USER = Annotated[str, Path(pattern=USER_ID, description="user id")]
DOC = Annotated[str, Path(pattern=DOC_ID, description="document id")]
DOCUMENTS_PATH = "/v1/federations/{fed}/users/{user}/documents"
SEARCH_PATH = DOCUMENTS_PATH + "/search"


def _info(record: DocumentRecord) -> DocumentInfo:
    return DocumentInfo(
        id=record.id,
        chunks=record.chunks,
        chars=record.chars,
        created_at=record.created_at,
        metadata=record.metadata,
    )


def document_router(service: PersonalizationService) -> APIRouter:
    router = APIRouter(tags=["documents"], responses=ERRORS)
    timeout_s = service.serve.request_timeout_s

    def who(request: Request, fed: str, user: str) -> Principal:
        principal = getattr(request.state, "principal", None)
        if not isinstance(principal, Principal):  # mounted without the gate
            principal = service.authenticator.authenticate(request.headers.get("authorization"))
        principal.require_user(fed, user)
        return principal

    def tenant(principal: Principal) -> str:
        return f"{principal.federation}/{principal.user}"  # as score/generate count the user's requests

    async def bounded(awaitable: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(awaitable, timeout_s)
        except TimeoutError:
            raise Timeout(f"the request took longer than {timeout_s:g}s") from None

    @router.post(DOCUMENTS_PATH, status_code=201)
    async def add_documents(
        fed: FED, user: USER, body: AddDocumentsRequest, request: Request
    ) -> DocumentsAdded:
        """Chunk, embed and store documents (an existing id is replaced)."""
        principal = who(request, fed, user)
        if await service.engine.store.get_spec(fed) is None:
            raise NotFound(f"federation {fed!r} does not exist")
        with service.engine.batcher.admit(tenant(principal)):  # the user's bound of in-flight requests
            records, generation = await bounded(service.engine.documents.add(fed, user, body.documents))
        return DocumentsAdded(documents=[_info(r) for r in records], generation=generation)

    @router.get(DOCUMENTS_PATH)
    async def list_documents(
        fed: FED,
        user: USER,
        request: Request,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
    ) -> DocumentList:
        who(request, fed, user)
        records, total = await bounded(service.engine.documents.page(fed, user, offset, limit))
        return DocumentList(documents=[_info(r) for r in records], total=total, offset=offset, limit=limit)

    @router.delete(DOCUMENTS_PATH + "/{doc_id}", status_code=204, response_class=Response)
    async def delete_document(fed: FED, user: USER, doc_id: DOC, request: Request) -> Response:
        """Erase one document: its record, chunks and embeddings, on every replica."""
        who(request, fed, user)
        if not await bounded(service.engine.documents.delete(fed, user, doc_id)):
            raise NotFound(f"no document {doc_id!r}")
        return Response(status_code=204)

    @router.delete(DOCUMENTS_PATH, status_code=204, response_class=Response)
    async def delete_documents(fed: FED, user: USER, request: Request) -> Response:
        """Erase every document of the user: nothing of them is left in Redis."""
        who(request, fed, user)
        await bounded(service.engine.documents.delete_all(fed, user))
        return Response(status_code=204)

    @router.post(SEARCH_PATH)
    async def search_documents(fed: FED, user: USER, body: SearchRequest, request: Request) -> SearchResponse:
        principal = who(request, fed, user)
        with service.engine.batcher.admit(tenant(principal)):
            found = await bounded(service.engine.documents.search(fed, user, body.query, body.k, body.mode))
        hits = [
            SearchHit(
                doc_id=h.doc_id,
                chunk_id=h.chunk_id,
                score=h.score,
                dense=h.dense,
                lexical=h.lexical,
                text=h.text,
            )
            for h in found.hits
        ]
        return SearchResponse(hits=hits, generation=found.generation)

    return router


__all__ = ["DOCUMENTS_PATH", "SEARCH_PATH", "document_router"]
