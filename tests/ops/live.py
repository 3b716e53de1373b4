"""The services running for real, for the ops tests: an in-process aggregator (its own topics on the
local Kafka, a federation on the tiny model) and, when the package is there, the personalization
service, both serving ``/metrics`` over HTTP on free loopback ports, with traffic that makes their
series exist: accepted, rejected and aggregated updates, two versions (the second with staleness),
reported training losses, hot swaps, cache misses and hits, personal adapter loads, 2xx and 4xx
requests, an upload to the HTTPS ingest refused (a user's token, not a device's).

Everything runs on a private event loop in a background thread, so the (synchronous) tests can
scrape, start Prometheus and wait without touching pytest-asyncio's loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from schemas.events import TrainingMetrics
from services.health import HealthServer
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.stack.topics import delete_topics, ensure_topics
from services.store import keys
from services.store.versions import VersionStore
from tests.support.federations import (
    Client,
    global_state,
    new_client,
    new_federation,
    random_delta,
    running_aggregator,
    shapes_of,
    wait_version,
)

log = logging.getLogger("pfi.tests.ops.live")

USER = "ops-alice"
BROKEN_USER = "ops-mallory"  # whose stored adapter is corrupted
VERSIONS = 3  # committed versions (buffer of 3): two before serving starts, one while it serves


@dataclass
class Endpoints:
    aggregator: str  # host:port serving /metrics
    serving: str | None  # host:port serving the personalization registry's /metrics
    serving_skip: str | None  # why the personalization half is missing
    federation: str
    errors: list[str] = field(default_factory=list)


class LiveServices:
    def __init__(self, settings: PFISettings) -> None:
        self.settings = settings
        self.endpoints: Endpoints | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pfi-ops-live", daemon=True)

    # -- control from the test thread ------------------------------------------------------------
    def start(self, timeout_s: float = 180.0) -> Endpoints:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the live services did not come up within {timeout_s:.0f}s")
        if self._error is not None:
            raise RuntimeError(f"the live services failed to start: {self._error!r}") from self._error
        assert self.endpoints is not None
        return self.endpoints

    def stop(self, timeout_s: float = 90.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone already (start failed)
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("live services did not stop within %.0fs", timeout_s)

    # -- the private loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # surfaced through start()
            self._error = err
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await ensure_topics(self.settings)
        redis = Redis.from_url(self.settings.redis())
        store = VersionStore(redis)
        spec = await new_federation(store, buffer_size=3)
        name = spec.name
        try:
            async with (
                running_aggregator(self.settings, progress_interval_s=0.5) as aggregator,
                UpdateProducer(self.settings) as producer,
            ):
                assert aggregator.health.port is not None
                fleet = _Fleet(producer, await new_client(redis, spec), store)
                await fleet.start()
                # v1 from three updates on v0, v2 from three more still on v0 (staleness 1), and a
                # forged update (signature_invalid: a dead letter).
                await fleet.version(1)
                await fleet.version(2)
                await fleet.forged()
                async with self._serving(fleet) as serving:
                    serving_at, skip = serving
                    self.endpoints = Endpoints(f"127.0.0.1:{aggregator.health.port}", serving_at, skip, name)
                    self._ready.set()
                    await self._stop.wait()
        finally:
            await self._cleanup(redis, name)

    @contextlib.asynccontextmanager
    async def _serving(self, fleet: _Fleet) -> AsyncIterator[tuple[str | None, str | None]]:
        try:
            from services.personalization.harness import serving
        except ImportError as err:
            yield None, f"services.personalization is not importable yet ({err})"
            return
        from clients.http_source import upload_personal_adapter

        name, shapes = fleet.name, fleet.shapes
        async with serving(self.settings, federation=name) as h:
            health = HealthServer(h.service.registry, h.service.ready, "127.0.0.1", 0)
            await health.start()
            try:
                headers = h.auth(USER)
                path = f"/v1/federations/{name}"
                # Cache miss without a personal adapter, then an upload and loads of it.
                await self._ok(
                    h.client.post(f"{path}/score", json={"texts": ["To be, or not"]}, headers=headers)
                )
                await upload_personal_adapter(
                    h.client,
                    h.token(USER),
                    name,
                    USER,
                    random_delta(shapes, seed=7, scale=0.5),
                    trained_against=0,
                )
                await self._ok(
                    h.client.post(f"{path}/score", json={"texts": ["To be, or not"]}, headers=headers)
                )
                body = {"prompt": "ROMEO: ", "max_new_tokens": 4}
                await self._ok(h.client.post(f"{path}/generate", json=body, headers=headers))
                # A streamed completion through the OpenAI-compatible route (its stream metrics).
                stream = {"model": name, "prompt": "ROMEO: ", "max_tokens": 4, "stream": True}
                await self._ok(h.client.post("/v1/completions", json=stream, headers=headers))
                await h.client.get(f"{path}")  # 401: no token
                await h.client.post(f"{path}/updates", content=b"x", headers=headers)  # 403 not_a_device
                await self._unusable_adapter(h, name)
                await self._wait_served_version(h, name, VERSIONS - 1)
                # A version published while serving: a hot swap, then freshness on the first request.
                await fleet.version(VERSIONS)
                await self._wait_fresh(h, name, headers)
                traffic = asyncio.create_task(self._trickle(h, path, headers))
                try:
                    yield f"127.0.0.1:{health.port}", None
                finally:
                    traffic.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await traffic
            finally:
                await health.stop()

    async def _unusable_adapter(self, h: Any, name: str) -> None:
        """A stored personal adapter that cannot be decoded (written straight to Redis, as after a
        corruption, so no replica has it cached): loading it fails and the request gets a 503
        ``unavailable``, which PFIPersonalAdapterLoadFailures watches."""
        redis = Redis.from_url(self.settings.redis())
        try:
            good = await redis.hgetall(keys.user_adapter(name, USER))
            meta = json.loads(good[b"meta"]) | {"user_id": BROKEN_USER}
            await redis.hset(
                keys.user_adapter(name, BROKEN_USER),
                mapping={"version": good[b"version"], "meta": json.dumps(meta), "blob": b"not safetensors"},
            )
        finally:
            await redis.aclose()
        response = await h.client.post(
            f"/v1/federations/{name}/score", json={"texts": ["Alas"]}, headers=h.auth(BROKEN_USER)
        )
        if response.status_code != 503:
            raise RuntimeError(
                f"an unusable adapter should answer 503, got {response.status_code}: {response.text}"
            )

    async def _ok(self, request: Any) -> None:
        response = await request
        if response.status_code >= 400:
            raise RuntimeError(
                f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
            )

    async def _wait_served_version(self, h: Any, name: str, version: int, within: float = 60.0) -> None:
        """Until the service serves ``version`` by default (a request triggered the first load)."""
        deadline = time.monotonic() + within
        while h.sample("pfi_serve_global_version", federation=name) < version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"personalization never served v{version} of {name}")
            await asyncio.sleep(0.2)

    async def _wait_fresh(self, h: Any, name: str, headers: dict[str, str], within: float = 60.0) -> None:
        """Until a request was served on the hot-swapped version (its freshness is observed)."""
        deadline = time.monotonic() + within
        while h.sample("pfi_serve_global_freshness_seconds_count", federation=name) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"personalization never served the hot-swapped version of {name}")
            await h.client.post(f"/v1/federations/{name}/score", json={"texts": ["Hark"]}, headers=headers)
            await asyncio.sleep(0.2)

    async def _trickle(self, h: Any, path: str, headers: dict[str, str]) -> None:
        """A couple of requests a second, so rates have something to measure."""
        while True:
            await h.client.post(f"{path}/score", json={"texts": ["Wherefore art thou"]}, headers=headers)
            await asyncio.sleep(0.5)

    async def _cleanup(self, redis: Redis, name: str) -> None:
        with contextlib.suppress(Exception):
            names = [self.settings.updates_topic, self.settings.dlq_topic, self.settings.versions_topic]
            await delete_topics(self.settings, names)
        with contextlib.suppress(Exception):
            async for key in redis.scan_iter(match=f"*{{{name}}}*", count=500):
                await redis.delete(key)
            await redis.srem(keys.FEDERATIONS, name)
        await redis.aclose()


def live_settings(redis_url: str) -> PFISettings:
    return PFISettings(topic_prefix=f"t-ops-{uuid.uuid4().hex[:8]}", update_partitions=3, redis_url=redis_url)


class _Fleet:
    """Sends the updates of one test client (three per version, all trained on v0)."""

    def __init__(self, producer: UpdateProducer, client: Client, store: VersionStore) -> None:
        self.producer = producer
        self.client = client
        self.store = store
        self.name = client.spec.name
        self.shapes: dict[str, Any] = {}

    async def start(self) -> None:
        self.shapes = shapes_of(await global_state(self.store, self.name, 0))

    async def version(self, version: int) -> None:
        for i in range(3):
            envelope = self.client.update(
                random_delta(self.shapes, seed=10 * version + i),
                base_version=0,
                metrics=TrainingMetrics(
                    loss_before=3.2,
                    loss_after=2.0 + 0.25 * i,
                    steps=4,
                    # issue 16's quality report: the personal adapter helps, the new global too
                    val_loss_global=2.5,
                    val_loss_personal=2.2,
                    val_loss_prev_global=2.8,
                ),
            )
            await self.producer.send(envelope, key=self.client.key)
        await wait_version(self.store, self.name, version, within=60)

    async def forged(self) -> None:
        forged = Client(self.client.spec, self.client.client_id, secrets.token_bytes(32))
        await self.producer.send(forged.update(random_delta(self.shapes, seed=99), base_version=0))
