"""The personalization service's HTTP API as an edge agent's :class:`~clients.source.GlobalSource`,
plus the personal adapter calls (upload, metadata, delete).

``HttpGlobalSource`` reads ``GET /v1/federations/{fed}`` (spec) and
``GET /v1/federations/{fed}/versions/latest/adapter`` (bytes) with a bearer token. The adapter is
verified against the digest the server states, decoded once per version and cached; a repeated
download of an unchanged version is a ``304 Not Modified`` (``If-None-Match`` with the digest).
Pass ``client=`` to reuse an ``httpx.AsyncClient`` (tests use one with an ASGI transport).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import torch

from clients.http_errors import error_text
from clients.source import GlobalAdapter, GlobalSource, SourceError
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors, encode_tensors
from schemas.events import FederationSpec, TensorEncoding


class HttpError(SourceError):
    """The service answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise HttpError(f"{what}: HTTP {response.status_code} {error_text(response)}", response.status_code)


TokenSource = Callable[[], Awaitable[str]]


class HttpGlobalSource:
    """:class:`~clients.source.GlobalSource` over the personalization service. ``token``: a bearer token,
    or an async callable returning a current one (``DeviceIdentity.token``: refreshed before expiry)."""

    def __init__(
        self,
        base_url: str,
        token: str | TokenSource,
        *,
        timeout_s: float = 30.0,
        client: httpx.AsyncClient | None = None,
        max_decoded_bytes: int = 1 << 31,
    ) -> None:
        self._own = client is None
        self.client = (
            client if client is not None else httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        )
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._specs: dict[str, FederationSpec] = {}
        self._cache: dict[str, tuple[str, GlobalAdapter]] = {}  # federation -> (digest, adapter)
        self._lock = asyncio.Lock()
        self._max = max_decoded_bytes

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def token(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token()}"}

    async def _get(self, path: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
        auth = await self.auth_headers()
        try:
            return await self.client.get(self._url(path), headers={**auth, **(headers or {})})
        except httpx.HTTPError as err:
            raise SourceError(f"GET {path}: {type(err).__name__}: {err}") from None

    async def federation(self, federation: str) -> dict[str, Any]:
        response = await self._get(f"/v1/federations/{federation}")
        _check(response, f"federation {federation!r}")
        body: dict[str, Any] = response.json()
        return body

    async def spec(self, federation: str) -> FederationSpec:
        if federation not in self._specs:
            body = await self.federation(federation)
            self._specs[federation] = FederationSpec.model_validate(body["spec"])
        return self._specs[federation]

    async def adapter(self, federation: str, version: int | str = "latest") -> GlobalAdapter:
        """A global adapter version (``"latest"`` by default), decoded; cached per federation."""
        async with self._lock:
            cached = self._cache.get(federation)
            conditional = {"If-None-Match": f'"{cached[0]}"'} if cached is not None else {}
            response = await self._get(
                f"/v1/federations/{federation}/versions/{version}/adapter", conditional
            )
            if response.status_code == 304 and cached is not None:
                return cached[1]
            _check(response, f"{federation!r} global adapter {version}")
            digest = response.headers.get("X-PFI-Digest", "")
            number = int(response.headers["X-PFI-Version"])
            blob = response.content
            if digest and hashlib.sha256(blob).hexdigest() != digest:
                raise SourceError(f"{federation!r} v{number}: the download does not match its digest")
            state = await asyncio.to_thread(decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=self._max)
            adapter = GlobalAdapter(federation, number, state)
            self._cache[federation] = (digest, adapter)
            return adapter

    async def latest(self, federation: str) -> GlobalAdapter:
        return await self.adapter(federation, "latest")

    # -- personal adapters -----------------------------------------------------------------------
    async def upload_personal(
        self,
        federation: str,
        user: str,
        state: Mapping[str, torch.Tensor],
        *,
        trained_against: int,
        encoding: TensorEncoding = BLOB_ENCODING,
        gate: float = 1.0,
    ) -> dict[str, Any]:
        return await upload_personal_adapter(
            self.client,
            await self.token(),
            federation,
            user,
            state,
            trained_against=trained_against,
            encoding=encoding,
            base_url=self.base_url,
            gate=gate,
        )

    async def personal_info(self, federation: str, user: str) -> dict[str, Any] | None:
        response = await self._get(f"/v1/federations/{federation}/users/{user}/adapter")
        if response.status_code == 404:
            return None
        _check(response, f"personal adapter of {user!r}")
        body: dict[str, Any] = response.json()
        return body

    async def delete_personal(self, federation: str, user: str) -> bool:
        try:
            response = await self.client.delete(
                self._url(f"/v1/federations/{federation}/users/{user}/adapter"),
                headers=await self.auth_headers(),
            )
        except httpx.HTTPError as err:
            raise SourceError(f"DELETE personal adapter: {type(err).__name__}: {err}") from None
        if response.status_code == 404:
            return False
        _check(response, f"deleting the personal adapter of {user!r}")
        return True

    async def aclose(self) -> None:
        if self._own:
            await self.client.aclose()


async def upload_personal_adapter(
    client: httpx.AsyncClient,
    token: str,
    federation: str,
    user: str,
    state: Mapping[str, torch.Tensor],
    *,
    trained_against: int,
    encoding: TensorEncoding = BLOB_ENCODING,
    base_url: str = "",
    gate: float = 1.0,
) -> dict[str, Any]:
    """PUT a personal adapter (keyed like the federation's adapter) served at ``gate`` (0..1: the scale
    of its output, see :mod:`clients.personalize`); returns its metadata."""
    blob = await asyncio.to_thread(encode_tensors, state, encoding)
    params = {
        "trained_against": str(trained_against),
        "dtype": encoding.dtype,
        "quantization": encoding.quantization,
        "gate": repr(float(gate)),
    }
    try:
        response = await client.put(
            f"{base_url.rstrip('/')}/v1/federations/{federation}/users/{user}/adapter",
            params=params,
            content=blob,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
        )
    except httpx.HTTPError as err:
        raise SourceError(f"upload of {user!r}'s adapter: {type(err).__name__}: {err}") from None
    _check(response, f"upload of {user!r}'s adapter")
    body: dict[str, Any] = response.json()
    return body


def _conforms(source: HttpGlobalSource) -> GlobalSource:
    """Static check (mypy): :class:`HttpGlobalSource` implements the ``GlobalSource`` protocol."""
    return source
