"""Response bodies of the OpenAI-compatible routes: whole completions and stream chunks, in OpenAI's
shapes (``text_completion`` / ``chat.completion`` / ``chat.completion.chunk``) with token ``usage`` and
the versions that served them under ``pfi``."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.personalization.engine import GenerateResult
from services.personalization.openai_compat.streaming import cut_at_stop


def served_headers(result: GenerateResult) -> dict[str, str]:
    """The headers the native routes send with the versions that served a request."""
    return {
        "X-PFI-Global-Version": str(result.served.global_version),
        "X-PFI-Personal-Adapter-Version": str(result.served.personal_adapter_version),
    }


@dataclass
class Reply:
    """The bodies of one completion (``chat``: a chat completion)."""

    chat: bool
    model: str
    federation: str
    stops: list[str]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def _id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def final_text(self, result: GenerateResult) -> tuple[str, str]:
        """The completion's text (cut at the first stop string) and OpenAI's finish reason."""
        text, stopped = cut_at_stop(result.text, self.stops)
        return text, ("length" if result.finish_reason == "length" and not stopped else "stop")

    def pfi(self, result: GenerateResult) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "global_version": result.served.global_version,
            "personal_adapter_version": result.served.personal_adapter_version,
        }

    @staticmethod
    def usage(result: GenerateResult) -> dict[str, int]:
        completion = len(result.tokens)
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self._id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, result: GenerateResult) -> dict[str, Any]:
        text, finish = self.final_text(result)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": self.usage(result),
            "pfi": self.pfi(result),
        }

    def chunk(
        self,
        text: str = "",
        *,
        role: bool = False,
        finish: str | None = None,
        result: GenerateResult | None = None,
    ) -> dict[str, Any]:
        """A stream chunk with ``text`` (chat: the first one carries ``role``; the last one the finish
        reason and, under ``pfi``, the versions that served)."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if result is not None:
            out["pfi"] = self.pfi(result)
        return out

    def usage_chunk(self, result: GenerateResult) -> dict[str, Any]:
        """``stream_options.include_usage``: the chunk after the last, with no choices."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(result), "pfi": self.pfi(result)}
