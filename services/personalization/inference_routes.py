"""Inference over HTTP: ``POST /v1/federations/{fed}/generate`` and ``POST /v1/federations/{fed}/score``.

The adapter used is the body's ``user_id``'s, else the token's user's (an admin token without
``user_id``: the global adapter alone); a user token may use its own user's only (403 otherwise).
``retrieval`` / ``context`` augment the prompt or text (:mod:`.augment`). Responses and the
``X-PFI-Global-Version`` / ``X-PFI-Personal-Adapter-Version`` headers name the versions that served.
The OpenAI-compatible routes are in :mod:`.openai_compat`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter
from fastapi.responses import Response

from services.personalization.api import (
    ERRORS,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
    ServedFields,
    TextScore,
)
from services.personalization.augment import augmentation
from services.personalization.auth import Principal
from services.personalization.engine import Served
from services.personalization.route_deps import FED, Auth, within_timeout

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

T = TypeVar("T")


def served_fields(fed: str, user: str | None, served: Served) -> dict[str, Any]:
    return {
        "federation": fed,
        "user_id": user,
        "global_version": served.global_version,
        "personal_adapter_version": served.personal_adapter_version,
        "timing": served.timing,
    }


def served_headers(response: Response, body: ServedFields) -> None:
    response.headers["X-PFI-Global-Version"] = str(body.global_version)
    response.headers["X-PFI-Personal-Adapter-Version"] = str(body.personal_adapter_version)


def acting_user(who: Principal, fed: str, user_id: str | None) -> str | None:
    """The user whose adapter a request uses: the body's, else the token's (admin: none)."""
    user = user_id if user_id is not None else (None if who.admin else who.user)
    who.require_federation(fed)
    if user is not None:
        who.require_user(fed, user)
    return user


def inference_router(service: PersonalizationService) -> APIRouter:
    """``app.include_router(inference_router(service))``."""
    router = APIRouter()
    serve = service.serve

    async def bounded(awaitable: Awaitable[T]) -> T:
        return await within_timeout(awaitable, serve.request_timeout_s)

    @router.post("/v1/federations/{fed}/generate", tags=["inference"], responses=ERRORS)
    async def generate(fed: FED, body: GenerateRequest, who: Auth, response: Response) -> GenerateResponse:
        user = acting_user(who, fed, body.user_id)
        result = await bounded(
            service.engine.generate(
                fed,
                user,
                body.prompt,
                max_new_tokens=body.max_new_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                version=body.global_version,
                use_personal=body.use_personal,
                tenant=f"{who.federation}/{who.user}",
                augment=augmentation(body.retrieval, body.context),
            )
        )
        out = GenerateResponse(
            **served_fields(fed, user, result.served),
            retrieval=None if result.retrieved is None else result.retrieved.info(),
            text=result.text,
            tokens=result.tokens,
            prompt_tokens=result.prompt_tokens,
            generated_tokens=len(result.tokens),
            finish_reason=result.finish_reason,
        )
        served_headers(response, out)
        return out

    @router.post("/v1/federations/{fed}/score", tags=["inference"], responses=ERRORS)
    async def score(fed: FED, body: ScoreRequest, who: Auth, response: Response) -> ScoreResponse:
        user = acting_user(who, fed, body.user_id)
        result = await bounded(
            service.engine.score(
                fed,
                user,
                body.texts,
                version=body.global_version,
                use_personal=body.use_personal,
                tenant=f"{who.federation}/{who.user}",
                augment=augmentation(body.retrieval, body.context),
            )
        )
        found = result.retrieved or [None] * len(result.results)
        out = ScoreResponse(
            **served_fields(fed, user, result.served),
            results=[
                TextScore(
                    mean_nll=r.mean_nll,
                    perplexity=math.exp(min(r.mean_nll, 700.0)),
                    token_accuracy=r.accuracy,
                    tokens=r.tokens,
                    retrieval=None if f is None else f.info(),
                )
                for r, f in zip(result.results, found, strict=True)
            ],
        )
        served_headers(response, out)
        return out

    return router
