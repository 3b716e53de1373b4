"""Score and generate with context retrieved on the device (the service stores no document text).

``score_with_context`` / ``generate_with_context`` POST to ``/v1/federations/{fed}/score`` and
``/generate`` with a ``context`` string (from :meth:`clients.retrieval.LocalRetriever.context_for`);
the service prepends it to the text/prompt for that request only. ``generate_with_local_retrieval`` does
both steps. They follow :mod:`clients.http_source`: a bearer token, an ``httpx.AsyncClient`` the caller
owns, :class:`~clients.http_source.HttpError` for an error status, ``SourceError`` for transport errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from clients.http_errors import error_text
from clients.http_source import HttpError
from clients.retrieval import LocalHit, LocalRetriever
from clients.source import SourceError
from modeling.retrieval import SearchMode


async def _post(
    client: httpx.AsyncClient, token: str, url: str, body: dict[str, Any], what: str
) -> dict[str, Any]:
    try:
        response = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as err:
        raise SourceError(f"{what}: {type(err).__name__}: {err}") from None
    if response.status_code >= 400:
        raise HttpError(f"{what}: HTTP {response.status_code} {error_text(response)}", response.status_code)
    result: dict[str, Any] = response.json()
    return result


def _optional(**fields: Any) -> dict[str, Any]:
    """The fields that are set (an empty ``context``, nothing retrieved, is not sent: the service
    refuses an empty one)."""
    return {name: value for name, value in fields.items() if value is not None and value != ""}


async def score_with_context(
    client: httpx.AsyncClient,
    token: str,
    federation: str,
    texts: Sequence[str],
    context: str,
    *,
    base_url: str = "",
    user_id: str | None = None,
    global_version: int | None = None,
    use_personal: bool = True,
) -> dict[str, Any]:
    """``POST /v1/federations/{fed}/score`` with ``context``: each text is scored conditioned on it."""
    body = {
        "texts": list(texts),
        "use_personal": use_personal,
        **_optional(context=context, user_id=user_id, global_version=global_version),
    }
    url = f"{base_url.rstrip('/')}/v1/federations/{federation}/score"
    return await _post(client, token, url, body, f"score in {federation!r}")


async def generate_with_context(
    client: httpx.AsyncClient,
    token: str,
    federation: str,
    prompt: str,
    context: str,
    *,
    base_url: str = "",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    user_id: str | None = None,
    global_version: int | None = None,
    use_personal: bool = True,
) -> dict[str, Any]:
    """``POST /v1/federations/{fed}/generate`` with ``context`` prepended to the prompt."""
    body = {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "use_personal": use_personal,
        **_optional(context=context, seed=seed, user_id=user_id, global_version=global_version),
    }
    url = f"{base_url.rstrip('/')}/v1/federations/{federation}/generate"
    return await _post(client, token, url, body, f"generate in {federation!r}")


async def generate_with_local_retrieval(
    client: httpx.AsyncClient,
    token: str,
    federation: str,
    retriever: LocalRetriever,
    prompt: str,
    *,
    k: int = 4,
    max_chars: int = 2048,
    mode: SearchMode = "hybrid",
    base_url: str = "",
    **options: Any,
) -> tuple[dict[str, Any], list[LocalHit]]:
    """Retrieve from the device's documents for ``prompt`` (off the event loop), then generate with it.

    Returns the service's answer and the local hits whose text was sent."""
    context, hits = await asyncio.to_thread(
        retriever.context_for, prompt, k=k, max_chars=max_chars, mode=mode
    )
    answer = await generate_with_context(
        client, token, federation, prompt, context, base_url=base_url, **options
    )
    return answer, hits
