"""Scoring through the personalization service, as each user: personal adapters (with their gate), the
user's private documents (the retrieval store) and ``score`` requests, with or without retrieval.

Retrieval is **causal**: a held-out chunk is scored with context retrieved by a query made of the text
*before* it (the previous held-out chunk, or the end of the user's training text for the first one;
:func:`causal_queries`), never by the chunk itself, and the retrieval store holds only the user's
training text. One request per chunk (each has its own query); only the chunk's tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from clients.http_source import upload_personal_adapter
from modeling.lora import StateDict
from schemas.errors import PFIError
from services.personalization.auth import TokenSigner

DOC_CHARS = 4000  # the training text goes to the store as documents of about this size
DOCS_PER_REQUEST = 64
QUERY_CHARS = 1000  # the tail of the training text used as the first chunk's query


@dataclass(frozen=True)
class Score:
    nll: float
    accuracy: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {"nll": self.nll, "accuracy": self.accuracy, "tokens": self.tokens}


@dataclass(frozen=True)
class RagConfig:
    """``retrieval`` of the score requests: ``k`` chunks, ``mode``, at most ``max_context_tokens``."""

    k: int = 4
    mode: str = "hybrid"
    max_context_tokens: int = 256

    def body(self, query: str) -> dict[str, Any]:
        return {"k": self.k, "mode": self.mode, "query": query, "max_context_tokens": self.max_context_tokens}


def pooled(parts: list[tuple[float, float, int]]) -> Score:
    """Token-weighted mean of ``(mean_nll, accuracy, tokens)`` parts."""
    tokens = sum(t for _, _, t in parts)
    if tokens == 0:
        raise PFIError("nothing was scored (no tokens)")
    nll = sum(n * t for n, _, t in parts) / tokens
    acc = sum(a * t for _, a, t in parts) / tokens
    return Score(nll, acc, tokens)


def _tail(text: str, chars: int) -> str:
    body = text.strip()
    if len(body) <= chars:
        return body
    cut = body[-chars:]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < len(cut) - 1 else cut


def causal_queries(train_text: str, chunks: list[str], *, tail_chars: int = QUERY_CHARS) -> list[str]:
    """The retrieval query of each held-out chunk: the text just before it (see the module doc)."""
    first = _tail(train_text, tail_chars) or "."
    return [first, *(_tail(c, tail_chars) or "." for c in chunks[:-1])][: len(chunks)]


def documents(text: str, size: int = DOC_CHARS) -> list[str]:
    """``text`` as documents of about ``size`` characters, cut at paragraph boundaries when possible."""
    parts: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) + 2 > size:
            parts.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
        while len(current) > size:  # one huge paragraph
            parts.append(current[:size])
            current = current[size:]
    if current.strip():
        parts.append(current)
    return [p for p in parts if p.strip()]


class ServiceScorer:
    """Uploads personal adapters and documents and scores texts through the service's HTTP API, as
    each user (a token per user)."""

    def __init__(self, client: httpx.AsyncClient, signer: TokenSigner, federation: str) -> None:
        self.client = client
        self.signer = signer
        self.federation = federation
        self._tokens: dict[str, str] = {}
        self.requests = 0

    def token(self, user: str) -> str:
        if user not in self._tokens:
            self._tokens[user] = self.signer.issue(user, ttl_s=24 * 3600, federation=self.federation)
        return self._tokens[user]

    def _auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}

    async def upload(
        self, user: str, state: StateDict, trained_against: int, *, gate: float = 1.0
    ) -> dict[str, Any]:
        self.requests += 1
        return await upload_personal_adapter(
            self.client,
            self.token(user),
            self.federation,
            user,
            state,
            trained_against=trained_against,
            gate=gate,
        )

    async def _post(self, user: str, path: str, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
        self.requests += 1
        try:
            response = await self.client.post(
                f"/v1/federations/{self.federation}{path}", json=body, headers=self._auth(user)
            )
        except httpx.HTTPError as err:
            raise PFIError(f"{path} for {user!r}: {type(err).__name__}: {err}") from None
        if response.status_code != expect:
            raise PFIError(f"{path} for {user!r}: HTTP {response.status_code} {response.text[:300]}")
        out: dict[str, Any] = response.json()
        return out

    async def add_documents(self, user: str, text: str) -> dict[str, int]:
        """The user's training text into their private retrieval store (as ~4 KB documents)."""
        docs = documents(text)
        chunks = chars = 0
        for start in range(0, len(docs), DOCS_PER_REQUEST):
            batch = docs[start : start + DOCS_PER_REQUEST]
            body = {"documents": [{"id": f"train-{start + i}", "text": d} for i, d in enumerate(batch)]}
            out = await self._post(user, f"/users/{user}/documents", body, expect=201)
            chunks += sum(int(d["chunks"]) for d in out["documents"])
            chars += sum(int(d["chars"]) for d in out["documents"])
        return {"documents": len(docs), "chunks": chunks, "chars": chars}

    async def score(
        self,
        user: str,
        texts: list[str],
        *,
        use_personal: bool,
        global_version: int | None = None,
        retrieval: dict[str, Any] | None = None,
    ) -> tuple[Score, dict[str, Any]]:
        body: dict[str, Any] = {"texts": texts, "use_personal": use_personal}
        if global_version is not None:
            body["global_version"] = global_version
        if retrieval is not None:
            body["retrieval"] = retrieval
        out = await self._post(user, "/score", body)
        parts = [(r["mean_nll"], r["token_accuracy"], r["tokens"]) for r in out["results"]]
        served: dict[str, Any] = {
            "global_version": out.get("global_version"),
            "personal_adapter_version": out.get("personal_adapter_version"),
        }
        if retrieval is not None:
            infos = [r.get("retrieval") or {} for r in out["results"]]
            served["context_tokens"] = [int(i.get("context_tokens", 0)) for i in infos]
            served["hits"] = [len(i.get("hits", [])) for i in infos]
        return pooled(parts), served

    async def score_rag(
        self, user: str, chunks: list[str], queries: list[str], rag: RagConfig, *, use_personal: bool
    ) -> tuple[Score, dict[str, Any]]:
        """Each chunk with context retrieved by its own (causal) query; pooled over the chunks."""
        parts: list[tuple[float, float, int]] = []
        served: dict[str, Any] = {"context_tokens": [], "hits": []}
        for chunk, query in zip(chunks, queries, strict=True):
            score, one = await self.score(user, [chunk], use_personal=use_personal, retrieval=rag.body(query))
            parts.append((score.nll, score.accuracy, score.tokens))
            served["global_version"] = one["global_version"]
            served["personal_adapter_version"] = one["personal_adapter_version"]
            served["context_tokens"] += one["context_tokens"]
            served["hits"] += one["hits"]
        return pooled(parts), served
