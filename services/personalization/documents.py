"""A user's private retrieval store in Redis: documents, their chunks and chunk embeddings.

Layout (names in :mod:`services.store.keys`, all in the federation's hash slot):

* ``pfi:{fed}:user:<uid>:documents`` (:func:`~services.store.keys.user_documents`), one hash holding
  everything of the user: ``g`` (generation), ``n`` (chunks), ``b`` (stored bytes: chunk texts in UTF-8
  plus embeddings), ``s`` (insertion sequence), ``d:<doc>`` (the document's :class:`DocumentRecord`,
  JSON), ``t:<doc>:<i>`` (chunk ``i``'s text) and ``v:<doc>:<i>`` (its embedding, float32 bytes).
* ``pfi:{fed}:user:<uid>:document-order`` (:func:`~services.store.keys.user_document_order`), the
  document ids by insertion (listing pages).
* ``pfi:{fed}:document-generation`` (:func:`~services.store.keys.document_generation`), a federation
  counter holding no user data: every change of any user's documents takes its next value as that
  user's generation, so a generation is never reused, even after a delete-all removed the user's keys.

Adding is one Lua script (``add_documents.lua``: limits checked, old chunks of a replaced document
removed, new ones written, generation bumped), deleting one document another (``delete_document.lua``;
the last document takes both keys with it) and deleting all is one ``DEL`` of both keys: when a delete
returns, nothing of the deleted text is left in Redis. Replicas cache a user's in-memory index by
generation (:mod:`.document_index`) and compare it with ``g`` on every search (one ``HGET``), so no
replica serves a deleted document after the delete returned. A user without documents has no keys
and generation 0.

Document ids match :data:`DOC_ID` (no ``:``), so field names cannot collide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import Field
from redis.asyncio import Redis

from schemas.events import StrictModel
from services.personalization.errors import PayloadTooLarge
from services.store import keys
from services.store.scripts import lua

DOC_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class DocumentRecord(StrictModel):
    """What the store keeps about a document besides its chunks."""

    id: str = Field(pattern=DOC_ID)
    chunks: int = Field(ge=1)
    chars: int = Field(ge=1)
    bytes: int = Field(ge=0, description="stored bytes: chunk texts (UTF-8) + embeddings")
    created_at: datetime
    metadata: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class NewDocument:
    """A document ready to store: its record, chunk texts and their embeddings ``(chunks, dim)``."""

    record: DocumentRecord
    texts: list[str]
    vectors: np.ndarray


@dataclass(frozen=True)
class Snapshot:
    """Every chunk of a user at one generation, in a stable order (document id, chunk index)."""

    generation: int
    refs: list[tuple[str, int]]  # (doc id, chunk index) per position
    texts: list[str]
    vectors: np.ndarray  # (positions, dim) float32

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes) + sum(len(t) for t in self.texts) + 64 * len(self.refs)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def stored_bytes(texts: Sequence[str], vectors: np.ndarray) -> int:
    return sum(len(t.encode()) for t in texts) + int(vectors.astype(np.float32).nbytes)


class DocumentStore:
    """The Redis side of users' documents (see the module docstring)."""

    def __init__(self, redis: Redis, *, max_chunks: int, max_bytes: int) -> None:
        self.redis = redis
        self.max_chunks = max_chunks
        self.max_bytes = max_bytes
        self._add = redis.register_script(lua("add_documents.lua"))
        self._delete = redis.register_script(lua("delete_document.lua"))

    def _keys(self, fed: str, user: str) -> list[str]:
        return [
            keys.user_documents(fed, user),
            keys.user_document_order(fed, user),
            keys.document_generation(fed),
        ]

    async def add(self, fed: str, user: str, docs: Sequence[NewDocument]) -> int:
        """Store ``docs`` (a document with an existing id replaces it); returns the new generation.
        Over the user's chunk or byte limit: :class:`PayloadTooLarge`, nothing written."""
        args: list[Any] = [self.max_chunks, self.max_bytes, len(docs)]
        for doc in docs:
            vectors = np.ascontiguousarray(doc.vectors, dtype=np.float32)
            args += [doc.record.id, doc.record.model_dump_json(), len(doc.texts)]
            args += [t.encode() for t in doc.texts]
            args += [row.tobytes() for row in vectors]
        status, value, *_ = await self._add(keys=self._keys(fed, user), args=args)
        if int(status) == -1:
            raise PayloadTooLarge(
                f"the user would have {int(value)} chunks; the limit is {self.max_chunks}",
                code="too_many_chunks",
            )
        if int(status) == -2:
            raise PayloadTooLarge(
                f"the user's documents would take {int(value)} bytes; the limit is {self.max_bytes}",
                code="documents_too_large",
            )
        return int(status)

    async def generation(self, fed: str, user: str) -> int:
        """The user's generation (0: no documents), one round trip."""
        raw = await self.redis.hget(keys.user_documents(fed, user), "g")
        return 0 if raw is None else int(_text(raw))

    async def page(self, fed: str, user: str, offset: int, limit: int) -> tuple[list[DocumentRecord], int]:
        """A page of the user's documents by insertion order, and how many there are."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrange(keys.user_document_order(fed, user), offset, offset + limit - 1)
            pipe.zcard(keys.user_document_order(fed, user))
            ids, total = await pipe.execute()
        if not ids:
            return [], int(total)
        raws = await self.redis.hmget(keys.user_documents(fed, user), [f"d:{_text(i)}" for i in ids])
        records = [DocumentRecord.model_validate_json(_text(r)) for r in raws if r is not None]
        return records, int(total)

    async def delete(self, fed: str, user: str, doc_id: str) -> bool:
        """Erase one document (its chunks and embeddings); False if there was none."""
        return int(await self._delete(keys=self._keys(fed, user), args=[doc_id])) >= 0

    async def delete_all(self, fed: str, user: str) -> int:
        """Erase every document of the user (both keys); returns how many there were."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zcard(keys.user_document_order(fed, user))
            pipe.delete(keys.user_documents(fed, user), keys.user_document_order(fed, user))
            pipe.incr(keys.document_generation(fed))
            count, _, _ = await pipe.execute()
        return int(count)

    async def snapshot(self, fed: str, user: str, dim: int) -> Snapshot:
        """Every chunk of the user with the generation they belong to (one atomic ``HGETALL``)."""
        raw: dict[Any, Any] = await self.redis.hgetall(keys.user_documents(fed, user))
        return parse_snapshot(raw, dim)


def parse_snapshot(raw: dict[Any, Any], dim: int) -> Snapshot:
    """A snapshot from the fields of a user's documents hash (pure: no I/O)."""
    fields = {_text(k): v for k, v in raw.items()}
    generation = int(_text(fields.get("g", b"0")))
    refs: list[tuple[str, int]] = []
    for name in fields:
        if name.startswith("t:"):
            doc, _, index = name[2:].rpartition(":")
            refs.append((doc, int(index)))
    refs.sort()
    texts = [_text(fields[f"t:{doc}:{i}"]) for doc, i in refs]
    vectors = np.zeros((len(refs), dim), dtype=np.float32)
    for row, (doc, i) in enumerate(refs):
        blob = fields.get(f"v:{doc}:{i}")
        if isinstance(blob, bytes) and len(blob) == 4 * dim:
            vectors[row] = np.frombuffer(blob, dtype=np.float32)
    return Snapshot(generation, refs, texts, vectors)
