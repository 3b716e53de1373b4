"""What the API's route modules share: path parameters, the caller's principal and the request bound.

* ``FED`` / ``USER``: the federation name and user id path parameters (validated patterns);
* ``Auth``: the caller's :class:`~.auth.Principal`, a dependency (the gate, :mod:`.limits`, has already
  verified the token; mounted without the gate, the header is authenticated here);
* :func:`within_timeout`: awaits a service call within the request timeout (``Timeout``, 504, otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import Depends, Header, Path, Request

from services.personalization.api import USER_ID
from services.personalization.auth import Principal
from services.personalization.errors import Timeout

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

T = TypeVar("T")

FED = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="federation name")]
USER = Annotated[str, Path(pattern=USER_ID, description="user id")]


async def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    verified = getattr(request.state, "principal", None)  # by the gate, before the body was read
    if isinstance(verified, Principal):
        return verified
    service: PersonalizationService = request.app.state.service
    return service.authenticator.authenticate(authorization)


Auth = Annotated[Principal, Depends(principal)]


async def within_timeout(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``awaitable``'s result, or ``Timeout`` after ``timeout_s`` seconds."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise Timeout(f"the request took longer than {timeout_s:g}s") from None
