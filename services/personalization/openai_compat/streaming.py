"""From the model thread to server-sent events: incremental detokenization, stop strings, SSE lines.

:class:`TokenStream` is a generation row's ``on_token`` (:class:`~..backends.base.GenRow`): it runs on the
model thread for every new token, turns tokens into text as they come (:class:`Detokenizer`), holds
back the characters that could still become a stop string, ends the row (returns False) once a stop
string appears or the consumer cancelled (client gone, timeout), and hands each new piece of text to
the event loop (``call_soon_threadsafe`` into an ``asyncio.Queue``). The last piece is followed, on the
loop, by ``None`` when the generation's task ends.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi.responses import StreamingResponse
from prometheus_client import Counter
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends: completed, failed, or the
    client gone (also before the first byte, when the body iterator never even started)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """The index where the earliest stop string in ``text[start:]`` begins, or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    at = find_stop(text, stops)
    return (text, False) if at is None else (text[:at], True)


class Detokenizer:
    """Text of a growing token sequence, piece by piece, decoding only a short window each time (the
    prefix/read offsets of vLLM's incremental detokenizer): a piece is released once the window
    decodes to more text than before and does not end in an incomplete character."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""


class TokenStream:
    """The ``on_token`` of one streamed row (model thread) and its queue of text pieces (event loop)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        decode: Callable[[Sequence[int]], str],
        stops: Sequence[str],
        tokens: Counter | None = None,
    ) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.detokenizer = Detokenizer(decode)
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens = tokens
        self.text = ""  # decoded so far (model thread)
        self.sent = 0  # characters of ``text`` handed to the loop
        self.stop_found = False
        self._cancelled = threading.Event()

    # -- event loop ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        """End the generation at its next token (the consumer is gone)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def close(self) -> None:
        """The generation's task has ended: no piece follows."""
        self.queue.put_nowait(None)

    # -- model thread -------------------------------------------------------------------------------
    def __call__(self, token: int) -> bool:
        if self._cancelled.is_set():
            return False
        if self.tokens is not None:
            self.tokens.inc()
        self.text += self.detokenizer.push(token)
        at = find_stop(self.text, self.stops, self.sent) if self.stops else None
        if at is not None:
            self._send(self.text[self.sent : at])
            self.stop_found = True
            return False
        safe = len(self.text) - self.hold
        if safe > self.sent:
            self._send(self.text[self.sent : safe])
        return True

    def _send(self, piece: str) -> None:
        if not piece:
            return
        self.sent += len(piece)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)
        except RuntimeError:  # the loop is closed: nobody reads any more
            self._cancelled.set()
