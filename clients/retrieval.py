"""Retrieval over a user's own documents, on the device: the text never leaves it.

:class:`LocalRetriever` keeps one user's documents in a private directory (``<state_dir>/<user>/documents``,
mode 0700): per document ``<id>.json`` (text, metadata, chunk offsets, embedder name) and ``<id>.npy``
(the chunks' MiniLM embeddings, float32), each written atomically with mode 0600 (the ``.npy`` first;
the ``.json`` commits the document). Search is :class:`modeling.retrieval.HybridIndex` over every
chunk (dense + BM25, fused by RRF); :meth:`LocalRetriever.context_for` turns the best chunks into the
``context`` string a client sends with ``score``/``generate`` (:mod:`clients.retrieval_http`), so the
service sees only what is retrieved for that one request and stores nothing.

Deleting a document removes both files; :meth:`LocalRetriever.delete_all` removes the directory. One
process should own a directory at a time (the in-memory index is not shared between processes).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.files import atomic_write, fsync_dir
from modeling.retrieval import (
    DEFAULT_MAX_WORDS,
    DEFAULT_OVERLAP_WORDS,
    SEARCH_MODES,
    Embedder,
    HybridIndex,
    RetrievalError,
    SearchMode,
    build_context,
    chunk_text,
    load_embedder,
)
from schemas.errors import ConfigError

DOCUMENTS_DIR = "documents"
MAX_DOCUMENT_CHARS = 1 << 20
MAX_CONTEXT_BYTES = 64 * 1024  # what the service accepts as ``context`` (UTF-8 bytes)
MAX_K = 32
MAX_QUERY_CHARS = 4096
MAX_METADATA_ITEMS = 16
_DOC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # also a safe file name
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


@dataclass(frozen=True)
class LocalDocument:
    id: str
    chunks: int
    chars: int
    created_at: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalHit:
    doc_id: str
    chunk_id: int
    score: float
    dense: float | None
    lexical: float | None
    text: str


@dataclass(frozen=True)
class _Stored:
    info: LocalDocument
    text: str
    spans: list[tuple[int, int]]
    embedder: str
    vectors: np.ndarray


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    items = dict(metadata or {})
    if len(items) > MAX_METADATA_ITEMS:
        raise RetrievalError(f"at most {MAX_METADATA_ITEMS} metadata entries")
    for key, value in items.items():
        if not isinstance(key, str) or not isinstance(value, str) or len(key) > 64 or len(value) > 256:
            raise RetrievalError("metadata must map strings (<= 64 chars) to strings (<= 256 chars)")
    return items


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class LocalRetriever:
    """One user's documents and their index, in ``directory`` (created 0700)."""

    def __init__(
        self,
        directory: Path,
        *,
        embedder: Embedder | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        overlap_words: int = DEFAULT_OVERLAP_WORDS,
    ) -> None:
        self.directory = directory
        self._embedder = embedder
        self.max_words = max_words
        self.overlap_words = overlap_words
        self._lock = threading.RLock()
        self._docs: dict[str, _Stored] | None = None  # loaded on first use
        self._index: tuple[HybridIndex, list[tuple[str, int]]] | None = None

    @classmethod
    def for_user(cls, state_dir: Path, user: str, **kwargs: Any) -> LocalRetriever:
        """The retriever of ``user`` under an agent's state directory: ``<state_dir>/<user>/documents``."""
        if not _USER.fullmatch(user):
            raise ConfigError(f"invalid user id {user!r}")
        return cls(state_dir / user / DOCUMENTS_DIR, **kwargs)

    # -- storage -----------------------------------------------------------------------------------
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder()
        return self._embedder

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # mkdir's mode is masked by the umask

    def _paths(self, doc_id: str) -> tuple[Path, Path]:
        return self.directory / f"{doc_id}.json", self.directory / f"{doc_id}.npy"

    def _loaded(self) -> dict[str, _Stored]:
        if self._docs is None:
            self._docs = self._read_all()
        return self._docs

    def _read_all(self) -> dict[str, _Stored]:
        if not self.directory.exists():
            return {}
        mode = self.directory.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the document directory {self.directory} is open to others (chmod 700 it)")
        docs: dict[str, _Stored] = {}
        for path in sorted(self.directory.glob("*.json")):
            stored = self._read(path)
            docs[stored.info.id] = stored
        for orphan in self.directory.glob("*.npy"):  # an add that crashed before its .json was written
            if orphan.stem not in docs:
                orphan.unlink(missing_ok=True)
        return docs

    def _read(self, path: Path) -> _Stored:
        vectors_path = path.with_suffix(".npy")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vectors = np.load(vectors_path, allow_pickle=False)
            info = LocalDocument(
                id=str(data["id"]),
                chunks=len(data["chunks"]),
                chars=len(data["text"]),
                created_at=float(data["created_at"]),
                metadata={str(k): str(v) for k, v in dict(data.get("metadata") or {}).items()},
            )
            text = str(data["text"])
            spans = [(int(start), int(end)) for start, end in data["chunks"]]
            embedder = str(data["embedder"])
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(
                f"corrupt document file {path} ({type(err).__name__}: {err}); delete the document"
            ) from None
        if info.id != path.stem or not _DOC_ID.fullmatch(info.id):
            raise ConfigError(f"corrupt document file {path}: its id {info.id!r} does not match the name")
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(spans):
            raise ConfigError(f"corrupt embeddings {vectors_path}: shape {vectors.shape} {vectors.dtype}")
        if not np.isfinite(vectors).all() or any(not 0 <= s < e <= len(text) for s, e in spans):
            raise ConfigError(f"corrupt document {path}: non-finite embeddings or chunk offsets out of range")
        return _Stored(info=info, text=text, spans=spans, embedder=embedder, vectors=vectors)

    def _write(self, stored: _Stored) -> None:
        self._ensure_directory()
        json_path, npy_path = self._paths(stored.info.id)
        atomic_write(npy_path, _npy_bytes(stored.vectors), mode=0o600)
        record = {
            "id": stored.info.id,
            "created_at": stored.info.created_at,
            "metadata": stored.info.metadata,
            "embedder": stored.embedder,
            "chunks": [list(span) for span in stored.spans],
            "text": stored.text,
        }
        atomic_write(json_path, json.dumps(record, ensure_ascii=False).encode("utf-8"), mode=0o600)

    # -- documents ---------------------------------------------------------------------------------
    def add(
        self, text: str, *, doc_id: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> LocalDocument:
        """Chunk, embed and store ``text`` (replacing a document with the same id)."""
        doc_id = doc_id if doc_id is not None else uuid.uuid4().hex
        if not _DOC_ID.fullmatch(doc_id):
            raise RetrievalError(f"invalid document id {doc_id!r} (letters, digits, '.', '_', '-'; <= 128)")
        if len(text) > MAX_DOCUMENT_CHARS:
            raise RetrievalError(f"a document holds at most {MAX_DOCUMENT_CHARS} characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RetrievalError("the document is not valid Unicode (lone surrogates)") from None
        items = _check_metadata(metadata)
        chunks = chunk_text(text, max_words=self.max_words, overlap_words=self.overlap_words)
        if not chunks:
            raise RetrievalError("the document has no words")
        embedder = self.embedder()
        vectors = embedder.embed([chunk.text for chunk in chunks]).astype(np.float32, copy=False)
        info = LocalDocument(doc_id, len(chunks), len(text), time.time(), items)
        stored = _Stored(info, text, [(c.start, c.end) for c in chunks], embedder.name, vectors)
        with self._lock:
            docs = self._loaded()
            self._write(stored)
            docs[doc_id] = stored
            self._index = None
        return info

    def documents(self) -> list[LocalDocument]:
        """Every document, oldest first."""
        with self._lock:
            infos = [stored.info for stored in self._loaded().values()]
        return sorted(infos, key=lambda info: (info.created_at, info.id))

    def text(self, doc_id: str) -> str | None:
        with self._lock:
            stored = self._loaded().get(doc_id)
        return None if stored is None else stored.text

    def delete(self, doc_id: str) -> bool:
        """Remove a document's files (the ``.json`` first: a crash leaves an orphan ``.npy``, removed on
        the next load). Works on a corrupt document too. False if there was none."""
        if not _DOC_ID.fullmatch(doc_id):
            raise RetrievalError(f"invalid document id {doc_id!r}")
        with self._lock:
            json_path, npy_path = self._paths(doc_id)
            existed = json_path.exists() or npy_path.exists()
            json_path.unlink(missing_ok=True)
            npy_path.unlink(missing_ok=True)
            if existed:
                fsync_dir(self.directory)
            if self._docs is not None:
                self._docs.pop(doc_id, None)
            self._index = None
        return existed

    def delete_all(self) -> int:
        """Remove every document and the directory itself; returns how many documents there were."""
        with self._lock:
            count = len(list(self.directory.glob("*.json"))) if self.directory.exists() else 0
            if self.directory.exists():
                shutil.rmtree(self.directory)
                fsync_dir(self.directory.parent)
            self._docs = {}
            self._index = None
        return count

    # -- search ------------------------------------------------------------------------------------
    def _re_embed(self, stored: _Stored, chunk_texts: list[str], embedder: Embedder) -> _Stored:
        """A document embedded by another model, embedded again with ``embedder`` and stored."""
        vectors = embedder.embed(chunk_texts).astype(np.float32, copy=False)
        fresh = _Stored(stored.info, stored.text, stored.spans, embedder.name, vectors)
        self._write(fresh)
        self._loaded()[stored.info.id] = fresh
        return fresh

    def _current_index(self) -> tuple[HybridIndex, list[tuple[str, int]]]:
        if self._index is None:
            embedder = self.embedder()
            texts: list[str] = []
            owners: list[tuple[str, int]] = []
            blocks: list[np.ndarray] = []
            for doc_id in sorted(self._loaded()):
                stored = self._loaded()[doc_id]
                chunk_texts = [stored.text[s:e] for s, e in stored.spans]
                if stored.embedder != embedder.name or stored.vectors.shape[1] != embedder.dim:
                    stored = self._re_embed(stored, chunk_texts, embedder)
                texts.extend(chunk_texts)
                owners.extend((doc_id, i) for i in range(len(chunk_texts)))
                blocks.append(stored.vectors)
            matrix = np.concatenate(blocks) if blocks else np.zeros((0, embedder.dim), dtype=np.float32)
            self._index = (HybridIndex(texts, matrix), owners)
        return self._index

    def search(self, query: str, *, k: int = 4, mode: SearchMode = "hybrid") -> list[LocalHit]:
        """The ``k`` best chunks of this user's documents for ``query``."""
        if not 1 <= k <= MAX_K:
            raise RetrievalError(f"k must be in 1..{MAX_K}, got {k}")
        if mode not in SEARCH_MODES:
            raise RetrievalError(f"unknown search mode {mode!r} (one of {', '.join(SEARCH_MODES)})")
        if len(query) > MAX_QUERY_CHARS:
            raise RetrievalError(f"a query holds at most {MAX_QUERY_CHARS} characters")
        with self._lock:
            if not self._loaded():
                return []  # no document: no need to load the model
        vector = self.embedder().embed([query])[0] if mode != "lexical" else None
        with self._lock:
            index, owners = self._current_index()
            hits = index.search(query, vector, k, mode)
            return [
                LocalHit(
                    doc_id=owners[hit.position][0],
                    chunk_id=owners[hit.position][1],
                    score=hit.score,
                    dense=hit.dense,
                    lexical=hit.lexical,
                    text=index.texts[hit.position],
                )
                for hit in hits
            ]

    def context_for(
        self, query: str, *, k: int = 4, max_chars: int = 2048, mode: SearchMode = "hybrid"
    ) -> tuple[str, list[LocalHit]]:
        """``(context, hits)``: the best chunks joined (most relevant first, at most ``max_chars``) and
        the hits whose text is in it; at most ``MAX_CONTEXT_BYTES`` UTF-8 bytes (what the service accepts).
        Send ``context`` with ``score``/``generate`` (an empty one: no document matched)."""
        if not 1 <= max_chars <= MAX_CONTEXT_BYTES:
            raise RetrievalError(f"max_chars must be in 1..{MAX_CONTEXT_BYTES}, got {max_chars}")
        hits = self.search(query, k=k, mode=mode)
        texts = [hit.text for hit in hits]
        context = build_context(texts, max_chars=max_chars)
        while (size := len(context.encode("utf-8"))) > MAX_CONTEXT_BYTES:  # multi-byte characters
            max_chars = max_chars * MAX_CONTEXT_BYTES // size
            context = build_context(texts, max_chars=max_chars)
        used = next(
            n for n in range(len(hits) + 1) if build_context(texts[:n], max_chars=max_chars) == context
        )
        return context, hits[:used]
