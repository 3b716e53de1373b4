"""The personal adapter's gate through the service (real Redis, tiny model, in-process app).

``PUT .../adapter?gate=g`` (0..1, 422 otherwise) stores the gate with the adapter; serving scales the
personal LoRA's output by it: gate 0 scores exactly as global-only, gate 1 as an ungated adapter,
and a gate in between lies between them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from clients.http_source import upload_personal_adapter
from modeling.blobs import BLOB_ENCODING
from schemas.codec import encode_tensors
from schemas.events import FederationSpec
from services.personalization.harness import Harness, serving
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore
from tests.support.federations import global_state, new_federation, random_delta, shapes_of

pytestmark = pytest.mark.integration

TEXTS = ["To be, or not to be, that is the question.", "Now is the winter of our discontent."]


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def fed(redis_client: Redis) -> FederationSpec:
    return await new_federation(VersionStore(redis_client))


@pytest.fixture
async def shapes(redis_client: Redis, fed: FederationSpec) -> dict[str, tuple[int, ...]]:
    return shapes_of(await global_state(VersionStore(redis_client), fed.name))


@pytest.fixture
async def h(settings: PFISettings, fed: FederationSpec) -> AsyncIterator[Harness]:
    async with serving(settings, ServeSettings(), federation=fed.name) as harness:
        yield harness


async def _score(h: Harness, fed: str, user: str, **body: Any) -> list[float]:
    response = await h.client.post(
        f"/v1/federations/{fed}/score", json={"texts": TEXTS, **body}, headers=h.auth(user)
    )
    assert response.status_code == 200, response.text
    return [r["mean_nll"] for r in response.json()["results"]]


async def _upload(h: Harness, fed: str, user: str, state: dict[str, torch.Tensor], gate: float) -> Any:
    return await upload_personal_adapter(
        h.client, h.token(user), fed, user, state, trained_against=0, gate=gate
    )


async def test_gate_scales_the_personal_adapter(
    h: Harness, fed: FederationSpec, shapes: dict[str, tuple[int, ...]]
) -> None:
    name = fed.name
    state = random_delta(shapes, seed=5, scale=0.5)
    global_only = await _score(h, name, "alice", use_personal=False)

    info = await _upload(h, name, "alice", state, gate=0.0)
    assert info["gate"] == 0.0
    assert await _score(h, name, "alice") == global_only  # exactly: the adapter is not applied at all

    info = await _upload(h, name, "alice", state, gate=1.0)
    assert info["gate"] == 1.0
    full = await _score(h, name, "alice")
    # A gate of 1 is today's behaviour: the same adapter uploaded without a gate scores the same.
    await upload_personal_adapter(h.client, h.token("bob"), name, "bob", state, trained_against=0)
    assert await _score(h, name, "bob") == full
    assert all(abs(f - g) > 1e-3 for f, g in zip(full, global_only, strict=True))

    info = await _upload(h, name, "alice", state, gate=0.5)
    assert info["gate"] == 0.5
    half = await _score(h, name, "alice")
    assert half != full
    assert half != global_only
    # gate 0.5 == an ungated adapter whose B is halved (the gate scales the LoRA output).
    halved = {k: (v * 0.5 if ".lora_B." in k else v) for k, v in state.items()}
    await _upload(h, name, "carol", halved, gate=1.0)
    assert await _score(h, name, "carol") == pytest.approx(half, abs=1e-5)

    got = await h.client.get(f"/v1/federations/{name}/users/alice/adapter", headers=h.auth("alice"))
    assert got.status_code == 200
    assert got.json()["gate"] == 0.5


@pytest.mark.parametrize("gate", ["-0.01", "1.0001", "nan", "inf", "-inf", "abc", "", "1e309"])
async def test_gate_out_of_range_is_422(
    h: Harness, fed: FederationSpec, shapes: dict[str, tuple[int, ...]], gate: str
) -> None:
    blob = encode_tensors(random_delta(shapes, seed=1, scale=0.1), BLOB_ENCODING)
    response = await h.client.put(
        f"/v1/federations/{fed.name}/users/alice/adapter",
        params={"trained_against": "0", "gate": gate},
        content=blob,
        headers={**h.auth("alice"), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 422, response.text
    missing = await h.client.get(f"/v1/federations/{fed.name}/users/alice/adapter", headers=h.auth("alice"))
    assert missing.status_code == 404  # nothing was stored
