"""HTTP fuzzing of the personalization API from its own OpenAPI spec (schemathesis), in-process: no 5xx.

The service runs in this test's event loop (``services.personalization.harness``: real Redis, tiny model);
schemathesis loads ``/openapi.json`` and generates, per operation, schema-conforming (positive) and
schema-violating (negative) requests with Hypothesis (derandomized: the same requests every run). Each is
sent through the ASGI app with one of: a valid user token, an admin token, an expired token, a token signed
with another secret, a garbage token, no token; half of them aim at a real federation (and the token's own
user) so that requests get past the 404s into the handlers. The only check is schemathesis'
``not_a_server_error``: bad input must be answered with a 4xx, never a 5xx. ``/readyz`` is left out (its 503
is its contract when a dependency is down).

``PFI_API_FUZZ_EXAMPLES`` sets the examples per operation and mode (default 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections import Counter
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from redis.asyncio import Redis
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from services.personalization.auth import TokenSigner
from services.personalization.harness import BASE_URL, Harness, serving
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore
from tests.support.federations import new_federation

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    # peft asks the tiny model for transformers' deprecated `is_gradient_checkpointing` (not our code).
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

EXAMPLES = int(os.environ.get("PFI_API_FUZZ_EXAMPLES", "12"))
SKIP = {("GET", "/readyz")}
USER = "fuzz-user"


def draw(strategy: Any, n: int) -> list[Any]:
    """``n`` (or fewer, when the space is small) derandomized examples of ``strategy``."""
    out: list[Any] = []

    @hypothesis.settings(
        max_examples=n,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(strategy)
    def collect(case: Any) -> None:
        out.append(case)

    with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # no negative request for a parameterless GET
        collect()
    return out


def tokens(h: Harness) -> list[tuple[str, dict[str, str]]]:
    now = time.time()
    stranger = TokenSigner(secrets.token_bytes(32))
    fed = h.federation or "no-federation"
    signer = h.service.signer
    return [
        ("user", {"Authorization": f"Bearer {h.token(USER)}"}),
        ("admin", {"Authorization": f"Bearer {h.token('fuzz-admin', admin=True)}"}),
        ("device", {"Authorization": f"Bearer {h.token(USER, role='device')}"}),
        (
            "expired",
            {"Authorization": f"Bearer {signer.issue(USER, federation=fed, ttl_s=60, now=now - 7200)}"},
        ),
        ("foreign", {"Authorization": f"Bearer {stranger.issue(USER, federation=fed)}"}),
        ("garbage", {"Authorization": "Bearer pfi2.%%%not-a-token"}),
        ("none", {}),
    ]


def to_httpx(kwargs: dict[str, Any]) -> dict[str, Any]:
    """requests-style transport kwargs (what schemathesis serializes) -> httpx ``request`` kwargs."""
    out: dict[str, Any] = {"method": kwargs["method"], "url": kwargs["url"]}
    for name in ("params", "headers", "json"):
        if kwargs.get(name) is not None:
            out[name] = kwargs[name]
    cookies = kwargs.get("cookies")  # schemathesis sends {} when there are none
    if cookies:  # as a Cookie header: httpx deprecates per-request ``cookies=``
        headers = {k: v for k, v in (out.get("headers") or {}).items() if k.lower() != "cookie"}
        sent = [v for k, v in (out.get("headers") or {}).items() if k.lower() == "cookie"]
        headers["Cookie"] = "; ".join([*sent, *(f"{k}={v}" for k, v in cookies.items())])
        out["headers"] = headers
    data = kwargs.get("data")
    if data is not None:
        if isinstance(data, bytes | str):
            out["content"] = data
        else:
            out["data"] = data
    return out


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


async def test_fuzz_personalization_api_has_no_server_errors(
    settings: PFISettings, redis_client: Redis
) -> None:
    fed = await new_federation(VersionStore(redis_client))
    async with serving(settings, ServeSettings(max_new_tokens=8), timeout_s=60, federation=fed.name) as h:
        spec = (await h.client.get("/openapi.json")).json()
        schema = schemathesis.openapi.from_dict(spec)
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 8, [op.label for op in operations]
        cases: list[Any] = []
        for op in operations:
            if (op.method.upper(), op.path) in SKIP:
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                cases += await asyncio.to_thread(draw, op.as_strategy(generation_mode=mode), EXAMPLES)
        auth = tokens(h)
        failures: list[str] = []
        statuses: Counter[int] = Counter()
        for i, case in enumerate(cases):
            label, headers = auth[i % len(auth)]
            params = case.path_parameters or {}
            if i % 2 == 0:  # aim at a real federation and the token's own user
                if "fed" in params:
                    params["fed"] = fed.name
                if "user" in params:
                    params["user"] = USER
            kwargs = to_httpx(case.as_transport_kwargs(base_url=BASE_URL, headers=headers))
            response = await h.client.request(**kwargs)
            statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=[not_a_server_error])
            except AssertionError as err:  # schemathesis' check failures are AssertionErrors
                failures.append(
                    f"{case.operation.label} [{label}] -> {response.status_code}: {response.text[:200]} "
                    f"({str(err).splitlines()[0][:120]})"
                )
        print(
            f"\nAPI fuzz: {len(cases)} requests over {len(operations)} operations; statuses {dict(statuses)}"
        )
        assert len(cases) >= 100
        assert not failures, f"{len(failures)} server errors:\n" + "\n".join(failures[:30])
