"""An in-process harness: a started :class:`PersonalizationService`, its app, and an ``httpx`` client
that talks to the app through ASGI (no socket). Used by the tests and by ``bench/serving.py``."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.personalization.app import create_app
from services.personalization.service import PersonalizationService
from services.settings import PFISettings, ServeSettings

BASE_URL = "http://pfi.test"


@dataclass
class Harness:
    service: PersonalizationService
    app: FastAPI
    client: httpx.AsyncClient

    def token(
        self, user: str, *, admin: bool = False, ttl_s: float = 3600, federation: str | None = None
    ) -> str:
        return self.service.signer.issue(user, admin=admin, ttl_s=ttl_s, federation=federation)

    def auth(self, user: str, *, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, admin=admin)}"}

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
            yield Harness(service, app, client)
