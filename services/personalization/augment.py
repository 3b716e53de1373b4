"""Retrieval-augmented score and generate: find the context of a request and prepend its tokens.

A request asks for context either with ``retrieval`` (searched here, in the acting user's own documents:
:mod:`.user_documents`) or with ``context`` (retrieved on the device by the SDK; the service stores
nothing). The context's tokens go between the tokenizer's prefix (BOS, if any) and the text's tokens:
``prefix + context + "\\n\\n" + text``. For ``score`` only the text's tokens are scored, conditioned on the
context (:attr:`~.backends.base.ScoreRow.context_len`). The context is cut to ``max_context_tokens``
and to the positions the model has left (most relevant chunks first, so the end is cut).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from modeling.retrieval import SearchMode, build_context
from services.personalization.api import RetrievalParams
from services.personalization.backends.base import TokenCodec
from services.personalization.errors import Unprocessable
from services.personalization.user_documents import Found, UserDocuments

SEPARATOR = "\n\n"
DEVICE_MAX_CONTEXT_TOKENS = 2048
CHARS_PER_TOKEN_BOUND = 16  # characters of context built per allowed token before tokenizing (then cut)


@dataclass(frozen=True)
class Augmentation:
    """What a request asked for: service-side retrieval (``k``, ``mode``, ``query``) or a device
    ``context``."""

    k: int = 4
    mode: SearchMode = "hybrid"
    query: str | None = None
    max_context_tokens: int = 512
    context: str | None = None
    queries: tuple[str, ...] | None = None  # one per text


def augmentation(retrieval: RetrievalParams | None, context: str | None) -> Augmentation | None:
    """From the API fields (at most one of them is set: the request model checks it)."""
    if context is not None:
        return Augmentation(context=context, max_context_tokens=DEVICE_MAX_CONTEXT_TOKENS)
    if retrieval is None:
        return None
    return Augmentation(
        k=retrieval.k,
        mode=retrieval.mode,
        query=retrieval.query,
        max_context_tokens=retrieval.max_context_tokens,
        queries=None if retrieval.queries is None else tuple(retrieval.queries),
    )


@dataclass(frozen=True)
class Retrieved:
    """The context of one text or prompt and where it came from."""

    source: str  # "service" | "device"
    context: str
    k: int | None = None
    mode: str | None = None
    hits: list[Found] = field(default_factory=list)
    generation: int | None = None
    max_context_tokens: int = DEVICE_MAX_CONTEXT_TOKENS
    context_tokens: int = 0

    def info(self) -> dict[str, Any]:
        """The response's ``retrieval`` field (``api.RetrievalInfo``)."""
        return {
            "source": self.source,
            "k": self.k,
            "mode": self.mode,
            "hits": [{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score} for h in self.hits],
            "generation": self.generation,
            "context_tokens": self.context_tokens,
        }


async def retrieve(
    documents: UserDocuments,
    fed: str,
    user: str | None,
    queries: Sequence[str],
    augment: Augmentation | None,
) -> list[Retrieved | None]:
    """The context of each of ``queries`` (texts or the prompt); one search per distinct query."""
    if augment is None:
        return [None] * len(queries)
    if augment.context is not None:
        device = Retrieved("device", augment.context, max_context_tokens=augment.max_context_tokens)
        return [device] * len(queries)
    if user is None:
        raise Unprocessable("retrieval searches a user's documents: name the user (user_id)")
    if augment.queries is not None and len(augment.queries) != len(queries):
        raise Unprocessable(
            f"retrieval.queries has {len(augment.queries)} queries for {len(queries)} texts: one per text"
        )
    if augment.queries is not None:
        wanted = list(augment.queries)
    else:
        wanted = [augment.query if augment.query is not None else q for q in queries]
    distinct = list(dict.fromkeys(wanted))
    results = await documents.search_many(fed, user, distinct, augment.k, augment.mode)
    max_chars = augment.max_context_tokens * CHARS_PER_TOKEN_BOUND
    found: dict[str, Retrieved] = {}
    for query, result in zip(distinct, results, strict=True):
        found[query] = Retrieved(
            "service",
            build_context([h.text for h in result.hits], max_chars=max_chars),
            k=augment.k,
            mode=augment.mode,
            hits=result.hits,
            generation=result.generation,
            max_context_tokens=augment.max_context_tokens,
        )
    return [found[q] for q in wanted]


def _without_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    return ids[len(prefix) :] if prefix and ids[: len(prefix)] == prefix else ids


def with_context(
    tokens: TokenCodec, ids: list[int], context: str, *, max_tokens: int, room: int
) -> tuple[list[int], int, int]:
    """``(ids with the context's tokens, context_len, context tokens)``: ``prefix + context + text``
    where ``prefix`` is what the tokenizer puts before any text (BOS) and ``context_len`` counts the
    ids after ``ids[0]`` that are context (targets not to score). At most ``min(max_tokens, room)``
    context tokens (the separator included); none if that leaves no room."""
    limit = min(max_tokens, room)
    if not context or limit <= 0:
        return ids, 0, 0
    prefix = tokens.encode("")
    body = _without_prefix(ids, prefix)
    ctx = _without_prefix(tokens.encode(context + SEPARATOR), prefix)
    if len(ctx) > limit:
        sep = _without_prefix(tokens.encode(SEPARATOR), prefix)
        ctx = ctx[: limit - len(sep)] + sep if limit > len(sep) else []
    if not ctx:
        return ids, 0, 0
    out = [*prefix, *ctx, *body]
    start = len(prefix) + len(ctx)  # index of the text's first token
    # Score the same targets as without context: with no prefix (a tokenizer without BOS) the text's
    # first token is not predicted without context, so it is not scored with context either.
    return out, (start - 1 if prefix else start), len(ctx)


def counted(retrieved: Retrieved, context_tokens: int) -> Retrieved:
    return replace(retrieved, context_tokens=context_tokens)


def timed_ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 3)
