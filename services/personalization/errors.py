"""Errors of the personalization service. Each carries the HTTP status it maps to and a stable code."""

from __future__ import annotations

from schemas.errors import PFIError


class ServeError(PFIError):
    """A request the service refuses (or cannot serve right now); ``status`` is the HTTP status."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BadRequest(ServeError):
    status = 400
    code = "bad_request"


class Unauthorized(ServeError):
    """Missing, malformed, forged or expired bearer token."""

    status = 401
    code = "unauthorized"


class Forbidden(ServeError):
    """A valid token that may not touch this resource (another user's adapter, an admin route)."""

    status = 403
    code = "forbidden"


class NotFound(ServeError):
    status = 404
    code = "not_found"


class Gone(ServeError):
    """A global version that existed but whose blob is not retained any more."""

    status = 410
    code = "gone"


class PayloadTooLarge(ServeError):
    status = 413
    code = "payload_too_large"


class Unprocessable(ServeError):
    """Well-formed but unusable: wrong tensor names/shapes, NaN/Inf, a prompt over the limits."""

    status = 422
    code = "unprocessable"


class Unavailable(ServeError):
    """The service cannot serve the request right now (model not loadable, no merged-copy slot)."""

    status = 503
    code = "unavailable"


class Timeout(ServeError):
    status = 504
    code = "timeout"


class TooManyRequests(ServeError):
    """Over a queue bound (the model queue, or one user's share of it): retry after ``retry_after_s``."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = max(1, int(retry_after_s))
