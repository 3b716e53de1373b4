"""Uploading updates: each framed message is POSTed to the ingest route with the device token.

:class:`HttpUpdateSender` is the outbox's :class:`~clients.outbox.Sender`: ``send_raw(federation,
messages)`` returns once the service acknowledged (202: stored in the update log) every message of one
update. What a failure means for the queued update:

* **retryable** (the outbox keeps it and retries with back-off): connection errors and timeouts, 408,
  409 (the same message is being stored by another request), 429 (``Retry-After`` honoured by the
  back-off), 5xx (503: the update log is unavailable);
* a retry of a message the service already stored is answered 202 with ``"duplicate": true`` and its
  first position: acknowledged, never stored twice;
* **permanent** (:class:`~clients.outbox.RejectedUpdate`; the outbox moves the item to ``rejected/`` and
  reports it): any other 4xx, e.g. a bad signature or a revoked device. A 401 first gets one token
  refresh and one more try.

A chunked update that failed half-way resumes at its first unacknowledged message (the acknowledged
ones are remembered per update, by content digest), so a retry never sends a chunk twice in one process.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from clients.http_errors import error_text
from clients.outbox import RejectedUpdate
from schemas.errors import PFIError

log = logging.getLogger("pfi.edge.uploader")

TokenSource = Callable[[], Awaitable[str]]
RETRYABLE_4XX = frozenset({408, 409, 429})


class UploadError(PFIError):
    """A retryable upload failure (the update stays queued)."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class HttpUpdateSender:
    """Sends framed messages to ``POST {base_url}/v1/federations/{fed}/updates``.

    ``token``: an async callable returning a current device token (``DeviceIdentity.token``);
    ``refresh``: an async callable forcing a new one after a 401 (``DeviceIdentity.refresh``)."""

    def __init__(
        self,
        base_url: str,
        token: TokenSource,
        *,
        refresh: TokenSource | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._refresh = refresh
        self._own = client is None
        self.client = client if client is not None else httpx.AsyncClient(timeout=timeout_s)
        self._acked: dict[bytes, int] = {}  # update digest -> messages acknowledged
        self.messages_sent = 0
        self.last_retry_after_s: float | None = None

    def url(self, federation: str) -> str:
        return f"{self.base_url}/v1/federations/{federation}/updates"

    async def _post(self, federation: str, message: bytes, token: str) -> httpx.Response:
        try:
            return await self.client.post(
                self.url(federation),
                content=message,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
            )
        except httpx.HTTPError as err:
            raise UploadError(f"upload to {self.base_url}: {type(err).__name__}: {err}") from None

    async def send_one(self, federation: str, message: bytes) -> dict[str, Any]:
        """POST one message; the service's answer ``{update_id, partition, offset}``."""
        response = await self._post(federation, message, await self._token())
        if response.status_code == 401 and self._refresh is not None:
            response = await self._post(federation, message, await self._refresh())
        status = response.status_code
        if status == 202 or 200 <= status < 300:
            try:
                body: dict[str, Any] = response.json()
            except ValueError:
                body = {}
            return body
        text = f"HTTP {status} {error_text(response)}"
        if status in RETRYABLE_4XX or status >= 500:
            retry = _retry_after(response)
            self.last_retry_after_s = retry
            raise UploadError(f"upload refused for now: {text}", status, retry)
        raise RejectedUpdate(f"upload rejected: {text}", status=status)

    async def send_raw(self, federation: str, messages: list[bytes]) -> int:
        """Send the messages of one update in order (the outbox :class:`~clients.outbox.Sender`)."""
        digest = hashlib.sha256(b"".join(hashlib.sha256(m).digest() for m in messages)).digest()
        done = self._acked.get(digest, 0)
        try:
            for index in range(done, len(messages)):
                await self.send_one(federation, messages[index])
                self._acked[digest] = index + 1
                self.messages_sent += 1
        except RejectedUpdate:
            self._acked.pop(digest, None)
            raise
        self._acked.pop(digest, None)
        return len(messages)

    async def close(self) -> None:
        if self._own:
            await self.client.aclose()

    async def __aenter__(self) -> HttpUpdateSender:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
