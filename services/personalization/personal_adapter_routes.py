"""A user's personal adapter over HTTP (storage and serving in :mod:`.engine` / :mod:`.user_adapters`).

* ``PUT    /v1/federations/{fed}/users/{user}/adapter?trained_against=N&dtype=&quantization=&gate=G``
  (body: the safetensors blob, ``application/octet-stream``, at most ``max_upload_bytes``) -> 201
  :class:`~.api.AdapterInfo`;
* ``GET    /v1/federations/{fed}/users/{user}/adapter`` -> :class:`~.api.AdapterInfo` (404 without one);
* ``DELETE /v1/federations/{fed}/users/{user}/adapter`` -> 204 (erased from Redis and every replica's cache).

A user token acts on its own user only, an admin token of the federation on anyone (403 otherwise). The
export of an adapter as PEFT / GGUF is in :mod:`.adapter_export_routes`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from services.personalization.api import ERRORS, VERSION_MAX, AdapterInfo
from services.personalization.errors import PayloadTooLarge
from services.personalization.route_deps import FED, USER, Auth, within_timeout
from services.personalization.user_adapters import AdapterRecord

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

T = TypeVar("T")


def personal_adapter_router(service: PersonalizationService) -> APIRouter:
    """``app.include_router(personal_adapter_router(service))``."""
    router = APIRouter()
    serve = service.serve

    async def bounded(awaitable: Awaitable[T]) -> T:
        return await within_timeout(awaitable, serve.request_timeout_s)

    def adapter_info(record: AdapterRecord) -> AdapterInfo:
        data = record.model_dump(mode="json")
        return AdapterInfo(**data)

    async def read_body(request: Request) -> bytes:
        limit = serve.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @router.put(
        "/v1/federations/{fed}/users/{user}/adapter",
        tags=["personal adapters"],
        status_code=201,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def put_adapter(
        fed: FED,
        user: USER,
        request: Request,
        who: Auth,
        trained_against: Annotated[
            int, Query(ge=0, le=VERSION_MAX, description="global version it was trained against")
        ],
        dtype: Annotated[str, Query(pattern="^(float32|float16|bfloat16)$")] = "float32",
        quantization: Annotated[str, Query(pattern="^(none|int8)$")] = "none",
        gate: Annotated[
            float,
            Query(
                ge=0.0,
                le=1.0,
                allow_inf_nan=False,
                description="scale of the personal adapter's output (0: off, 1: full; chosen on the "
                "user's own validation text)",
            ),
        ] = 1.0,
    ) -> AdapterInfo:
        """Upload a personal adapter: a safetensors blob keyed like the federation's adapter (as
        ``schemas.codec.encode_tensors`` writes it; zstd detected from the magic)."""
        who.require_user(fed, user)
        body = await read_body(request)
        record = await bounded(
            service.engine.upload(
                fed,
                user,
                body,
                trained_against=trained_against,
                dtype=dtype,
                quantization=quantization,
                gate=gate,
            )
        )
        return adapter_info(record)

    @router.get("/v1/federations/{fed}/users/{user}/adapter", tags=["personal adapters"], responses=ERRORS)
    async def get_adapter(fed: FED, user: USER, who: Auth) -> AdapterInfo:
        who.require_user(fed, user)
        return adapter_info(await bounded(service.engine.adapter_record(fed, user)))

    @router.delete(
        "/v1/federations/{fed}/users/{user}/adapter",
        tags=["personal adapters"],
        status_code=204,
        responses=ERRORS,
        response_class=Response,
    )
    async def delete_adapter(fed: FED, user: USER, who: Auth) -> Response:
        """Erase the adapter from Redis and from the cache of every replica."""
        who.require_user(fed, user)
        await bounded(service.engine.delete(fed, user))
        return Response(status_code=204)

    return router
