"""What the PFI service said when it refused a request, as one line (its ``{"error": {code, message}}``)."""

from __future__ import annotations

import httpx


def error_text(response: httpx.Response, limit: int = 300) -> str:
    """``"<code>: <message>"`` from the service's error shape, else the start of the body."""
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return f"{error.get('code')}: {error.get('message')}"
    except ValueError:
        pass
    return response.text[:limit]
