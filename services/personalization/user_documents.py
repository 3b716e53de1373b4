"""Private retrieval for the service: add, list, delete and search one user's documents.

:class:`UserDocuments` ties the Redis store (:mod:`.documents`), the replica's index cache
(:mod:`.document_index`) and the embedding model (``modeling.retrieval``, all-MiniLM-L6-v2, loaded on
first use) together. Every CPU step (chunking, embedding, building an index, a search) runs in a worker
thread, never on the event loop. Each search first reads the user's generation (one ``HGET``) and uses
a cached index only if it is of that generation, so a deleted document is never retrieved after its
delete returned, on any replica. Callers check who may act on ``user`` (the routes: the token's user or
an admin); nothing here crosses users: every key and cache entry is the (federation, user) pair's own.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis

from modeling.retrieval import SEARCH_MODES, Embedder, RetrievalError, SearchMode, chunk_text, load_embedder
from services.personalization.document_api import DocumentIn
from services.personalization.document_index import IndexCache, UserIndex, build_index
from services.personalization.documents import DocumentRecord, DocumentStore, NewDocument, stored_bytes
from services.personalization.errors import BadRequest, PayloadTooLarge, TooManyRequests, Unprocessable
from services.settings import ServeSettings

#: Add requests embedding at once per replica (429 beyond). A thread keeps its slot until the embedding
#: is done, even when its request timed out, so abandoned requests cannot pile up CPU work.
MAX_CONCURRENT_ADDS = 2
RETRIEVAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class DocumentMetrics:
    """``pfi_serve_retrieval_*`` / ``pfi_serve_documents_*`` (registry injected, no user labels)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "pfi_serve"
        self.retrieval_seconds = Histogram(
            f"{ns}_retrieval_duration_seconds",
            "One retrieval call on a user's documents (generation check, index build on a miss, "
            "query embedding, search of the request's queries), by mode",
            ["mode"],
            buckets=RETRIEVAL_BUCKETS,
            registry=registry,
        )
        self.index_builds = Histogram(
            f"{ns}_retrieval_index_build_duration_seconds",
            "Loading a user's chunks from Redis and building their in-memory index (cache misses)",
            buckets=RETRIEVAL_BUCKETS,
            registry=registry,
        )
        self.documents = Counter(
            f"{ns}_documents_total", "User documents stored or deleted", ["op"], registry=registry
        )
        self.chunks = Counter(
            f"{ns}_document_chunks_total", "Document chunks embedded and stored", registry=registry
        )
        self.cache_bytes = Gauge(
            f"{ns}_retrieval_index_cache_bytes",
            "Estimated bytes of the in-memory document indexes of this replica",
            registry=registry,
        )
        for mode in SEARCH_MODES:  # exported (at zero) before the first retrieval
            self.retrieval_seconds.labels(mode=mode)
        for op in ("added", "deleted"):
            self.documents.labels(op=op)


@dataclass(frozen=True)
class Found:
    doc_id: str
    chunk_id: int
    score: float
    dense: float | None
    lexical: float | None
    text: str


@dataclass(frozen=True)
class SearchResult:
    hits: list[Found]
    generation: int


class UserDocuments:
    def __init__(
        self,
        redis: Redis,
        serve: ServeSettings,
        registry: CollectorRegistry,
        *,
        embedder: Callable[[], Embedder] = load_embedder,
    ) -> None:
        self.serve = serve
        self.store = DocumentStore(
            redis, max_chunks=serve.doc_max_chunks_per_user, max_bytes=serve.doc_max_bytes_per_user
        )
        self.cache = IndexCache(serve.doc_index_cache_bytes)
        self.metrics = DocumentMetrics(registry)
        self._embedder_factory = embedder
        self._adds = 0
        self._adds_lock = threading.Lock()

    def embedder(self) -> Embedder:
        """The embedding model (loads it on first use: call from a worker thread)."""
        return self._embedder_factory()

    # -- writes ---------------------------------------------------------------------------------------
    def _check(self, docs: Sequence[DocumentIn]) -> None:
        serve = self.serve
        if len(docs) > serve.doc_max_per_request:
            raise PayloadTooLarge(
                f"{len(docs)} documents; the limit is {serve.doc_max_per_request} per request"
            )
        ids = [d.id for d in docs if d.id is not None]
        if len(ids) != len(set(ids)):
            raise Unprocessable("a document id appears twice in the request", code="duplicate_id")
        total = 0
        for i, doc in enumerate(docs):
            if len(doc.text) > serve.doc_max_chars:
                raise PayloadTooLarge(
                    f"documents[{i}] has {len(doc.text)} characters; the limit is {serve.doc_max_chars}"
                )
            try:
                doc.text.encode("utf-8")
            except UnicodeEncodeError:
                raise Unprocessable(f"documents[{i}] is not valid Unicode", code="invalid_text") from None
            total += len(doc.text)
        if total > serve.doc_max_request_chars:
            raise PayloadTooLarge(
                f"the documents have {total} characters; "
                f"the limit is {serve.doc_max_request_chars} per request"
            )

    def _prepare(self, docs: Sequence[DocumentIn]) -> list[NewDocument]:
        """Chunk and embed (CPU: worker thread)."""
        chunked = []
        for i, doc in enumerate(docs):
            chunks = [c.text for c in chunk_text(doc.text)]
            if not chunks:
                raise Unprocessable(f"documents[{i}] has no words to index", code="empty_document")
            chunked.append(chunks)
        flat = [text for chunks in chunked for text in chunks]
        vectors = self.embedder().embed(flat)
        out: list[NewDocument] = []
        now = datetime.now(UTC)
        first = 0
        for doc, chunks in zip(docs, chunked, strict=True):
            rows = vectors[first : first + len(chunks)]
            first += len(chunks)
            record = DocumentRecord(
                id=doc.id or uuid.uuid4().hex,
                chunks=len(chunks),
                chars=len(doc.text),
                bytes=stored_bytes(chunks, rows),
                created_at=now,
                metadata=dict(doc.metadata),
            )
            out.append(NewDocument(record, chunks, rows))
        return out

    def _prepare_slot(self, docs: Sequence[DocumentIn]) -> list[NewDocument]:
        try:
            return self._prepare(docs)
        finally:
            with self._adds_lock:
                self._adds -= 1

    async def add(self, fed: str, user: str, docs: Sequence[DocumentIn]) -> tuple[list[DocumentRecord], int]:
        """Store ``docs`` for ``user`` (an existing id is replaced); ``(records, generation)``."""
        self._check(docs)
        with self._adds_lock:
            if self._adds >= MAX_CONCURRENT_ADDS:
                raise TooManyRequests(
                    f"{MAX_CONCURRENT_ADDS} document uploads are being embedded; retry shortly",
                    retry_after_s=5,
                    code="documents_busy",
                )
            self._adds += 1
        prepared = await asyncio.to_thread(self._prepare_slot, docs)
        generation = await self.store.add(fed, user, prepared)
        self.cache.invalidate(fed, user)  # this replica's copy; others see the generation change
        self.metrics.documents.labels(op="added").inc(len(prepared))
        self.metrics.chunks.inc(sum(len(d.texts) for d in prepared))
        return [d.record for d in prepared], generation

    async def page(self, fed: str, user: str, offset: int, limit: int) -> tuple[list[DocumentRecord], int]:
        return await self.store.page(fed, user, offset, limit)

    async def delete(self, fed: str, user: str, doc_id: str) -> bool:
        deleted = await self.store.delete(fed, user, doc_id)
        self.cache.invalidate(fed, user)
        if deleted:
            self.metrics.documents.labels(op="deleted").inc()
        return deleted

    async def delete_all(self, fed: str, user: str) -> int:
        count = await self.store.delete_all(fed, user)
        self.cache.invalidate(fed, user)
        self.metrics.documents.labels(op="deleted").inc(count)
        return count

    # -- search ---------------------------------------------------------------------------------------
    async def _build(self, fed: str, user: str) -> UserIndex:
        began = time.perf_counter()
        dim = (await asyncio.to_thread(self.embedder)).dim
        snapshot = await self.store.snapshot(fed, user, dim)
        entry = await asyncio.to_thread(build_index, fed, user, snapshot)
        self.metrics.index_builds.observe(time.perf_counter() - began)
        return entry

    async def index(self, fed: str, user: str) -> UserIndex:
        """The user's index at the current generation (one Redis round trip on a cache hit)."""
        generation = await self.store.generation(fed, user)
        entry, _ = await self.cache.get_or_build(fed, user, generation, lambda: self._build(fed, user))
        self.metrics.cache_bytes.set(self.cache.nbytes)
        return entry

    def _search(
        self, entry: UserIndex, queries: Sequence[str], k: int, mode: SearchMode
    ) -> list[list[Found]]:
        """CPU (one batched query embedding, then the searches): worker thread."""
        if entry.index is None:
            return [[] for _ in queries]
        vectors = None if mode == "lexical" else self.embedder().embed(list(queries))
        snap = entry.snapshot
        out: list[list[Found]] = []
        for i, query in enumerate(queries):
            try:
                hits = entry.index.search(query, None if vectors is None else vectors[i], k, mode)
            except RetrievalError as err:
                raise BadRequest(err.message, code="invalid_search") from None
            out.append(
                [
                    Found(
                        doc_id=snap.refs[h.position][0],
                        chunk_id=snap.refs[h.position][1],
                        score=h.score,
                        dense=h.dense,
                        lexical=h.lexical,
                        text=snap.texts[h.position],
                    )
                    for h in hits
                ]
            )
        return out

    async def search_many(
        self, fed: str, user: str, queries: Sequence[str], k: int, mode: SearchMode
    ) -> list[SearchResult]:
        """The ``k`` best chunks of ``user``'s documents for each of ``queries`` (one generation check,
        one index, one batched query embedding)."""
        began = time.perf_counter()
        entry = await self.index(fed, user)
        found = await asyncio.to_thread(self._search, entry, queries, k, mode)
        self.metrics.retrieval_seconds.labels(mode=mode).observe(time.perf_counter() - began)
        return [SearchResult(hits, entry.generation) for hits in found]

    async def search(self, fed: str, user: str, query: str, k: int, mode: SearchMode) -> SearchResult:
        """The ``k`` best chunks of ``user``'s documents for ``query``."""
        return (await self.search_many(fed, user, [query], k, mode))[0]
