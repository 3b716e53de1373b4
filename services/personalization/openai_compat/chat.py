"""Chat messages -> one prompt: the model's own chat template when its tokenizer has one, else a plain
fallback (``"<role>: <content>\\n"`` per message, then ``"assistant:"``) for models without one (the
tiny test model, base models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.personalization.backends.base import TokenCodec
from services.personalization.openai_compat.errors import InvalidParam
from services.personalization.openai_compat.schemas import ChatMessage

FALLBACK_REPLY = "assistant:"


def fallback_prompt(messages: Sequence[ChatMessage]) -> str:
    return "".join(f"{m.role}: {m.text}\n" for m in messages) + FALLBACK_REPLY


def chat_prompt(tokens: TokenCodec, messages: Sequence[ChatMessage]) -> str:
    """The prompt for ``messages`` (CPU work: call it off the event loop). The template runs in the
    tokenizer's sandboxed Jinja environment; a template that refuses the messages is a 400."""
    tokenizer: Any = getattr(tokens, "tokenizer", None)
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        return fallback_prompt(messages)
    turns = [{"role": m.role, "content": m.text} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja's TemplateError, raise_exception() in a template, ...
        raise InvalidParam(
            f"the model's chat template refused these messages: {err}", param="messages"
        ) from None
    if not isinstance(text, str):
        raise InvalidParam("the model's chat template did not produce text", param="messages")
    return text
