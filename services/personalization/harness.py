"""An in-process harness: a started :class:`PersonalizationService`, its app, and an ``httpx`` client
that talks to the app through ASGI (no socket). Used by the tests and by ``bench/serving.py``."""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.personalization.app import create_app
from services.personalization.auth import Role, TokenSigner
from services.personalization.service import PersonalizationService
from services.settings import PFISettings, ServeSettings

BASE_URL = "http://pfi.test"


class FederationTokens(httpx.Auth):
    """Presents, per request, a token of the federation named in the URL (``/v1/federations/{fed}/...``):
    for harnesses (demo, benchmarks) that drive several federations through one client, since every token
    is limited to one federation. Set it as a client's ``auth``; it replaces any ``Authorization``."""

    _PATH = re.compile(r"^/v1/federations/([a-z0-9][a-z0-9._-]{0,62})(/|$)")

    def __init__(self, signer: TokenSigner, user: str, *, ttl_s: float = 24 * 3600) -> None:
        self.signer = signer
        self.user = user
        self.ttl_s = ttl_s
        self._tokens: dict[str, str] = {}

    def token(self, federation: str) -> str:
        if federation not in self._tokens:
            self._tokens[federation] = self.signer.issue(self.user, federation=federation, ttl_s=self.ttl_s)
        return self._tokens[federation]

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        match = self._PATH.match(request.url.path)
        if match is not None:
            request.headers["Authorization"] = f"Bearer {self.token(match.group(1))}"
        yield request


@dataclass
class Harness:
    service: PersonalizationService
    app: FastAPI
    client: httpx.AsyncClient
    #: The federation of tokens minted without one (every token is limited to one federation).
    federation: str | None = None

    def token(
        self,
        user: str,
        *,
        admin: bool = False,
        ttl_s: float | None = None,
        federation: str | None = None,
        role: Role | None = None,
    ) -> str:
        fed = federation if federation is not None else self.federation
        if fed is None:
            raise ValueError("Harness.token needs a federation (or set Harness.federation)")
        return self.service.signer.issue(
            user, federation=fed, role=role or ("admin" if admin else "user"), ttl_s=ttl_s
        )

    def auth(self, user: str, *, admin: bool = False, federation: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, admin=admin, federation=federation)}"}

    def sample(self, name: str, **labels: str) -> float:
        value = self.service.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def serving(
    settings: PFISettings,
    serve: ServeSettings | None = None,
    *,
    secret: bytes | None = None,
    timeout_s: float = 120.0,
    federation: str | None = None,
    **service_kwargs: Any,
) -> AsyncIterator[Harness]:
    service = PersonalizationService(
        settings,
        serve or ServeSettings(),
        CollectorRegistry(),
        secret=secret or secrets.token_bytes(32),
        **service_kwargs,
    )
    app = create_app(service, manage_lifespan=False)
    async with service.running():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=timeout_s) as client:
            yield Harness(service, app, client, federation)
