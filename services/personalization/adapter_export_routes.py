"""A user's personal adapter as a file other serving stacks load (conversion in
:mod:`services.federation.adapter_io`, shared with ``pfi federation export``).

``GET /v1/federations/{fed}/users/{user}/adapter/export?format=peft|gguf&include_global=true`` -> 200
``application/zip``: a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) or a
llama.cpp LoRA (``adapter.gguf``, LLaMA-family bases only: 422 ``unsupported_base`` otherwise), each
with ``pfi_export.json``. With ``include_global`` (the default) the file is what PFI serves the user: the
latest global adapter plus the personal one scaled by its gate, stacked into one LoRA of rank ``2r``
(:func:`services.federation.adapter_export.stack_adapters`); without it, the personal adapter alone (a
delta meant to be applied on top of the global version it was trained against). Headers
``X-PFI-Global-Version`` (the stacked global, ``None`` without one) and ``X-PFI-Personal-Adapter-Version``.

Same token rules as the other personal adapter routes (``who.require_user``): a user token exports its
own user's adapter only (403 otherwise), an admin token of the federation anyone's. 404 without an
adapter. CPU work (decode, stack, serialize, zip) runs off the event loop, bounded by the request timeout.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.errors import CodecError, ConfigError
from services.federation.adapter_export import stack_adapters, zip_files
from services.federation.adapter_io import export_files, provenance
from services.personalization.api import ERRORS, USER_ID
from services.personalization.auth import Principal
from services.personalization.errors import NotFound, Timeout, Unavailable, Unprocessable
from services.personalization.user_adapters import decode_stored

if TYPE_CHECKING:
    from services.personalization.service import PersonalizationService

EXPORT_PATH = "/v1/federations/{fed}/users/{user}/adapter/export"
FED = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="federation name")]
USER = Annotated[str, Path(pattern=USER_ID, description="user id")]


def adapter_export_router(service: PersonalizationService) -> APIRouter:
    """``app.include_router(adapter_export_router(service))``."""
    router = APIRouter()
    max_bytes = service.settings.max_decoded_bytes

    def principal(request: Request, fed: str, user: str) -> Principal:
        who = getattr(request.state, "principal", None)
        if not isinstance(who, Principal):  # mounted without the gate
            who = service.authenticator.authenticate(request.headers.get("authorization"))
        who.require_user(fed, user)
        return who

    async def build(fed: str, user: str, fmt: str, include_global: bool) -> tuple[bytes, int | None, int]:
        engine = service.engine
        info = await engine.info(fed)
        found = await engine.users.get(fed, user, with_blob=True)
        record, blob = found if found is not None else (None, None)
        if record is None or blob is None:
            raise NotFound(f"user {user!r} has no personal adapter in federation {fed!r}")
        spec = info.spec
        try:
            state = await asyncio.to_thread(decode_stored, blob, info.template, max_bytes)
        except CodecError as err:
            raise Unavailable(f"the stored adapter of {user!r} does not decode: {err}") from None
        lora, kind, number, digest = spec.lora, "personal", None, record.digest
        if include_global:
            number = await engine.store.latest(fed)
            meta = None if number is None else await engine.store.get_meta(fed, number)
            global_blob = None if number is None else await engine.store.get_blob(fed, number)
            if number is None or meta is None or global_blob is None:
                raise Unavailable(f"federation {fed!r} has no global adapter to stack with")
            try:
                global_state = await asyncio.to_thread(
                    decode_tensors, global_blob, BLOB_ENCODING, max_decoded_bytes=max_bytes
                )
            except CodecError as err:
                raise Unavailable(f"global v{number} of {fed!r} does not decode: {err}") from None
            state, lora = stack_adapters(global_state, state, spec.lora, gate=record.gate)
            kind = "personal+global"
        facts = {
            **provenance(spec, number if number is not None else record.trained_against, digest, kind),
            "user_id": user,
            "personal_adapter_version": record.version,
            "trained_against": record.trained_against,
            "gate": record.gate,
            "global_version": number,
        }
        try:
            files = await asyncio.to_thread(export_files, state, lora, spec.base_model, fmt, provenance=facts)
        except ConfigError as err:
            raise Unprocessable(err.message, code="unsupported_base") from None
        return await asyncio.to_thread(zip_files, files), number, record.version

    @router.get(
        EXPORT_PATH,
        tags=["personal adapters"],
        responses={**ERRORS, 200: {"content": {"application/zip": {}}}},
        response_class=Response,
    )
    async def export_adapter(
        fed: FED,
        user: USER,
        request: Request,
        format: Annotated[
            Literal["peft", "gguf"], Query(description="peft directory or llama.cpp GGUF")
        ] = "peft",
        include_global: Annotated[
            bool, Query(description="stack the latest global adapter in (what PFI serves the user)")
        ] = True,
    ) -> Response:
        """The user's personal adapter as a zip of a PEFT directory or a llama.cpp GGUF LoRA."""
        principal(request, fed, user)
        timeout_s = service.serve.request_timeout_s
        try:
            body, global_version, personal_version = await asyncio.wait_for(
                build(fed, user, format, include_global), timeout_s
            )
        except TimeoutError:
            raise Timeout(f"the export took longer than {timeout_s:g}s") from None
        filename = f"{fed}-{user}-p{personal_version}-{format}.zip"
        return Response(
            body,
            media_type="application/zip",
            headers={
                "Content-Disposition": f'attachment; filename="{filename}"',
                "X-PFI-Global-Version": str(global_version),
                "X-PFI-Personal-Adapter-Version": str(personal_version),
                "Cache-Control": "no-store",
            },
        )

    return router
