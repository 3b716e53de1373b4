"""Two replicas of the personalization service over one Redis (in-process, tiny model): a deleted personal
adapter is never served again by either of them, including a load that was in flight during the delete
and a replica whose stream reader missed the delete; and a global version re-made with other content
under the same number (as after a Redis failover) is served with its new content."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from modeling.blobs import BLOB_ENCODING
from schemas.codec import encode_tensors, sha256_hex
from schemas.events import FederationSpec, GlobalVersionPublished, make_envelope
from services.federation.admin import commit_state
from services.personalization.harness import Harness, serving
from services.personalization.user_adapters import NoAdapter, PersonalAdapter, user_key
from services.settings import PFISettings, ServeSettings
from services.store import keys
from services.store.versions import VersionStore
from tests.support.serving import global_state, random_state, shapes_of, tiny_federation

pytestmark = pytest.mark.integration

TEXT = "Now is the winter of our discontent made glorious summer."


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def fed(redis_client: Redis) -> FederationSpec:
    return await tiny_federation(VersionStore(redis_client))


async def score(h: Harness, fed: str, user: str = "alice") -> dict[str, Any]:
    response = await h.client.post(
        f"/v1/federations/{fed}/score", json={"texts": [TEXT]}, headers=h.auth(user, federation=fed)
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def upload(h: Harness, fed: str, user: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    response = await h.client.put(
        f"/v1/federations/{fed}/users/{user}/adapter",
        params={"trained_against": 0},
        content=encode_tensors(state, BLOB_ENCODING),
        headers=h.auth(user, federation=fed),
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def delete(h: Harness, fed: str, user: str) -> None:
    response = await h.client.delete(
        f"/v1/federations/{fed}/users/{user}/adapter", headers=h.auth(user, federation=fed)
    )
    assert response.status_code == 204, response.text


async def stop_subscriber(h: Harness) -> None:
    """This replica stops reading announcements (a lagging or broken stream reader)."""
    subscriber = h.service.subscriber
    assert subscriber is not None
    subscriber.stop()
    for _ in range(200):
        if not subscriber.running:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the subscriber did not stop")


def pause_after_read(h: Harness) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the next personal adapter load on ``h`` stop after it has read Redis: ``(read, release)``."""
    users = h.service.engine.users
    original: Callable[..., Awaitable[Any]] = users.load
    read, release = asyncio.Event(), asyncio.Event()

    async def load(fed: str, user: str) -> Any:
        result = await original(fed, user)
        if not read.is_set():
            read.set()
            await release.wait()
        return result

    users.load = load  # type: ignore[method-assign]
    return read, release


@pytest.mark.parametrize("stream", [True, False], ids=["stream-up", "stream-down"])
async def test_a_load_in_flight_during_a_delete_on_another_replica_is_never_served(
    settings: PFISettings, fed: FederationSpec, stream: bool
) -> None:
    name = fed.name
    async with serving(settings, federation=name) as one, serving(settings, federation=name) as two:
        shapes = shapes_of(await global_state(one.service.engine.store, name))
        base = (await score(two, name, "bob"))["results"][0]["mean_nll"]
        await upload(one, name, "alice", random_state(shapes, seed=1))
        if not stream:
            await stop_subscriber(two)
        read, release = pause_after_read(two)
        request = asyncio.create_task(score(two, name))  # replica 2: cache miss, loads alice's v1
        await asyncio.wait_for(read.wait(), 10)  # ... and has read it from Redis
        await delete(one, name, "alice")  # replica 1 deletes it meanwhile
        await asyncio.sleep(0.1)  # replica 2's stream reader (when up) has seen the delete
        release.set()
        served = await request
        assert served["personal_adapter_version"] is None
        assert served["results"][0]["mean_nll"] == pytest.approx(base, abs=1e-5)
        cached = two.service.engine.cache.peek(user_key(name, "alice"))
        assert cached is None or isinstance(cached, NoAdapter)
        for _ in range(3):
            assert (await score(two, name))["personal_adapter_version"] is None
            assert (await score(one, name))["personal_adapter_version"] is None
        if not stream:
            assert two.sample("pfi_serve_adapter_invalidations_total", origin="load") >= 1


async def test_a_replica_that_missed_the_delete_stops_serving_within_the_ttl(
    settings: PFISettings, fed: FederationSpec
) -> None:
    name = fed.name
    ttl = 0.3
    serve = ServeSettings(adapter_revalidate_s=ttl)
    async with (
        serving(settings, serve, federation=name) as one,
        serving(settings, serve, federation=name) as two,
    ):
        shapes = shapes_of(await global_state(one.service.engine.store, name))
        await upload(one, name, "alice", random_state(shapes, seed=2))
        assert (await score(two, name))["personal_adapter_version"] == 1  # cached on replica 2
        assert isinstance(two.service.engine.cache.peek(user_key(name, "alice")), PersonalAdapter)
        await stop_subscriber(two)  # replica 2 will never hear of the delete
        await delete(one, name, "alice")
        await asyncio.sleep(ttl + 0.05)
        after = await score(two, name)
        assert after["personal_adapter_version"] is None
        assert two.sample("pfi_serve_adapter_cache_evictions_total", reason="stale") == 1
        # A re-upload is picked up the same way (a negative entry is revalidated too).
        await upload(one, name, "alice", random_state(shapes, seed=3))
        await asyncio.sleep(ttl + 0.05)
        assert (await score(two, name))["personal_adapter_version"] == 1


async def test_a_version_remade_with_other_content_is_served_with_the_new_content(
    settings: PFISettings, fed: FederationSpec, redis_client: Redis
) -> None:
    store = VersionStore(redis_client)
    name = fed.name
    state = await global_state(store, name)
    shapes = shapes_of(state)
    step = random_state(shapes, seed=4, scale=0.3)
    v1 = await commit_state(store, fed, {k: v + step[k] for k, v in state.items()}, source="pfi://tests")
    async with serving(settings, federation=name) as h:
        first = await score(h, name)
        assert first["global_version"] == 1
        old = await h.client.get(f"/v1/federations/{name}/versions/1/adapter", headers=h.auth("edge"))
        assert old.headers["ETag"] == f'"{v1.digest}"'
        assert old.headers["Cache-Control"] == "no-cache"  # a number alone does not name content
        pinned = await h.client.get(
            f"/v1/federations/{name}/versions/1/adapter",
            params={"digest": v1.digest},
            headers=h.auth("edge"),
        )
        assert "immutable" in pinned.headers["Cache-Control"]

        # Failover: v1 re-made with other content (blob + meta), and announced with its digest.
        other = random_state(shapes, seed=5, scale=0.3)
        blob = encode_tensors({k: v + other[k] for k, v in state.items()}, BLOB_ENCODING)
        digest = sha256_hex(blob)
        meta = v1.model_copy(update={"digest": digest, "size_bytes": len(blob)})
        await redis_client.set(keys.adapter(name, 1), blob)
        await redis_client.set(keys.meta(name, 1), meta.model_dump_json())
        event = GlobalVersionPublished(
            federation=name,
            version=1,
            parent=0,
            digest=digest,
            num_updates=0,
            size_bytes=len(blob),
            created_at=meta.created_at,
        )
        envelope = make_envelope(event, source="pfi://tests", subject=name, event_id=f"{name}-v1-remade")
        await redis_client.xadd(keys.events(name), {"event": envelope.model_dump_json()})

        runtime = h.service.engine.runtimes[name]
        for _ in range(500):
            current = runtime.current
            if current is not None and current.meta is not None and current.meta.digest == digest:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the replica kept serving the old content of v1")
        after = await score(h, name)
        assert after["global_version"] == 1
        assert abs(after["results"][0]["mean_nll"] - first["results"][0]["mean_nll"]) > 1e-4
        assert h.sample("pfi_serve_global_stale_copies_total", federation=name) == 1

        new = await h.client.get(
            f"/v1/federations/{name}/versions/1/adapter",
            headers={**h.auth("edge"), "If-None-Match": f'"{v1.digest}"'},
        )
        assert new.status_code == 200  # the old ETag no longer matches
        assert new.headers["ETag"] == f'"{digest}"'
        assert new.content == blob
        stale = await h.client.get(
            f"/v1/federations/{name}/versions/1/adapter",
            params={"digest": v1.digest},
            headers=h.auth("edge"),
        )
        assert stale.status_code == 409, stale.text
        assert stale.json()["error"]["code"] == "digest_mismatch"

    # A fresh replica computes the same thing from the new content.
    async with serving(settings, federation=name) as fresh:
        again = await score(fresh, name)
        assert again["results"][0]["mean_nll"] == pytest.approx(after["results"][0]["mean_nll"], abs=1e-5)
