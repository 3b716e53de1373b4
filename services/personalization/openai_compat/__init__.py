"""OpenAI-compatible routes of the personalization service: ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true``: server-sent events) and ``GET /v1/models``, so that an
OpenAI SDK program talks to PFI by changing its base URL and key (:mod:`.routes`)."""

from services.personalization.openai_compat.routes import openai_routes

__all__ = ["openai_routes"]
