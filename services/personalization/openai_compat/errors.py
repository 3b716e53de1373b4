"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of
the service's own error (401, 403, 404, 400/413/422, 429 with ``Retry-After``, 5xx)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from services.personalization.errors import BadRequest, NotFound, ServeError, TooManyRequests, Unauthorized

#: Paths answered in OpenAI's error shape (the gate uses it for its own early answers too).
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class InvalidParam(BadRequest):
    """A request parameter the service does not accept (400, naming the parameter)."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


class ModelNotFound(NotFound):
    """``model`` names no federation (or version) this token can see."""

    code = "model_not_found"

    def __init__(self, model: str, why: str = "") -> None:
        detail = f" ({why})" if why else ""
        super().__init__(f"The model {model!r} does not exist or you do not have access to it{detail}")
        self.param = "model"


def is_openai_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS)


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int, code: str, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def from_serve_error(err: ServeError) -> JSONResponse:
    """The OpenAI-shaped answer to a refusal of the service (headers as the native routes send)."""
    headers: dict[str, str] = {}
    if isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="pfi"'
    if isinstance(err, TooManyRequests):
        headers["Retry-After"] = str(err.retry_after_s)
    param = getattr(err, "param", None)
    return error_response(err.status, err.code, err.message, param=param, headers=headers or None)
