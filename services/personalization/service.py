"""Lifecycle of the personalization service: Redis clients, the engine (model thread), the subscriber,
preloaded federations, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from services.identity import ClientRegistry, Enrollment
from services.personalization.auth import Authenticator, RevocationCache, TokenSigner, load_secret
from services.personalization.engine import Engine, ModelLoader
from services.personalization.metrics import ServeMetrics
from services.personalization.subscriber import Subscriber
from services.settings import PFISettings, ServeSettings

log = logging.getLogger("pfi.serve")


class PersonalizationService:
    def __init__(
        self,
        settings: PFISettings,
        serve: ServeSettings,
        registry: CollectorRegistry | None = None,
        *,
        model_loader: ModelLoader | None = None,
        batching: bool = True,
        secret: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.serve = serve
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServeMetrics(self.registry)
        self.signer = TokenSigner(secret if secret is not None else load_secret(serve, settings))
        self.revocations = RevocationCache()
        self.authenticator = Authenticator(self.signer, self.revocations)
        self._clients: ClientRegistry | None = None
        self._enrollment: Enrollment | None = None
        self._model_loader = model_loader
        self._batching = batching
        self._engine: Engine | None = None
        self._redis: Redis | None = None
        self._sub_redis: Redis | None = None
        self.subscriber: Subscriber | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._preload: asyncio.Task[None] | None = None
        self._preload_error: str | None = None
        self._kafka: tuple[float, str | None] = (0.0, "not checked yet")
        self.started = False
        self._torch_threads = torch.get_num_threads()
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def on_stop(self, close: Callable[[], Awaitable[None]]) -> None:
        """Run ``close`` when the service stops (routers' resources: the ingest's Kafka producer)."""
        self._closers.append(close)

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("the service is not started")
        return self._redis

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the service is not started")
        return self._engine

    @property
    def clients(self) -> ClientRegistry:
        """The per-federation client registry (devices, their keys, revocation)."""
        if self._clients is None:
            raise RuntimeError("the service is not started")
        return self._clients

    @property
    def enrollment(self) -> Enrollment:
        if self._enrollment is None:
            raise RuntimeError("the service is not started")
        return self._enrollment

    async def start(self) -> None:
        if self.started:
            return
        # Intra-op threads: one team busy-waiting while another computes makes both crawl (OpenMP
        # oversubscription); half the CPUs leaves room for the event loop and background merges.
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.serve.torch_threads or max(1, (os.cpu_count() or 2) // 2))
        url = self.settings.redis()
        self._redis = Redis.from_url(url)
        self._sub_redis = Redis.from_url(url, socket_timeout=None)
        self._clients = ClientRegistry(self._redis)
        self._enrollment = Enrollment(self._redis)
        try:  # revocations loaded before the first request when Redis is up; the task keeps them fresh
            await asyncio.wait_for(self.revocations.refresh(self._redis, force=True), 2.0)
        except Exception as err:
            log.warning("token revocations not loaded yet: %s", err)
        self._tasks.append(
            asyncio.create_task(self.revocations.run(self._redis), name="pfi-serve-revocations")
        )
        engine = Engine(
            self._redis,
            self.settings,
            self.serve,
            self.metrics,
            batching=self._batching,
            model_loader=self._model_loader,
        )
        engine.start()
        self._engine = engine
        self.subscriber = Subscriber(self._sub_redis, engine, self.metrics)
        engine.watch = self.subscriber.watch
        self._tasks.append(asyncio.create_task(self.subscriber.run(), name="pfi-serve-subscriber"))
        self._preload = asyncio.create_task(self._load_federations(), name="pfi-serve-preload")
        self.started = True
        log.info("personalization service started (redis %s)", url)

    async def _load_federations(self) -> None:
        wanted = [f.strip() for f in self.serve.federations.split(",") if f.strip()]
        if wanted == ["*"]:
            wanted = await self.engine.store.list_federations()
        for fed in wanted:
            try:
                runtime = await self.engine.runtime(fed)
                log.info("%s: loaded (global v%s)", fed, runtime.current.version if runtime.current else "?")
            except Exception as err:
                self._preload_error = f"{fed}: {err}"
                log.error("could not load federation %s: %s", fed, err)

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        if self.subscriber is not None:
            self.subscriber.stop()
        for task in [*self._tasks, *([self._preload] if self._preload else [])]:
            if not task.done():
                task.cancel()
            await _bounded(f"task {task.get_name()}", task)
        self._tasks.clear()
        for close in reversed(self._closers):
            await _bounded(f"closer {close!r}", close())
        if self._engine is not None:
            await _bounded("the engine", self._engine.close())
        for client in (self._redis, self._sub_redis):
            if client is not None:
                await _bounded("a Redis client", client.aclose())
        torch.set_num_threads(self._torch_threads)
        log.info("personalization service stopped")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PersonalizationService]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def _kafka_check(self) -> str | None:
        checked_at, result = self._kafka
        if time.monotonic() - checked_at < self.serve.kafka_check_interval_s and checked_at > 0:
            return result
        from services.stack.broker import settings_health

        try:
            result = await settings_health(self.settings, "serving", timeout_s=2.0)
        except Exception as err:
            result = f"{type(err).__name__}: {err}"
        self._kafka = (time.monotonic(), result)
        return result

    async def ready(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        if not self.started or self._redis is None:
            return False, {"service": "not started"}
        try:
            await asyncio.wait_for(self._redis.ping(), 2.0)
            checks["redis"] = "ok"
        except Exception as err:
            checks["redis"] = f"error: {err}"
        kafka = await self._kafka_check()
        checks["kafka"] = "ok" if kafka is None else f"error: {kafka}"
        checks["revocations"] = "ok" if self.revocations.loaded else "not loaded"
        checks["model_thread"] = "ok" if self.engine.batcher.alive else "not running"
        checks["subscriber"] = (
            "ok" if self.subscriber is not None and self.subscriber.running else "not running"
        )
        if self._preload is not None and not self._preload.done():
            checks["models"] = "loading"
        elif self._preload_error is not None:
            checks["models"] = f"error: {self._preload_error}"
        else:
            loaded = sorted(self.engine.runtimes)
            checks["models"] = "ok" + (
                f" ({', '.join(loaded)})" if loaded else " (federations load on demand)"
            )
        ok = all(v == "ok" or v.startswith("ok ") for v in checks.values())
        return ok, checks


STOP_STEP_TIMEOUT_S = 10.0


async def _bounded(what: str, step: Awaitable[Any]) -> None:
    """One step of the shutdown, never longer than :data:`STOP_STEP_TIMEOUT_S`: a step that hangs (a
    library that ignores a cancellation, a thread that does not finish) is logged by name and skipped, so
    that a SIGTERM always ends the process within the pod's grace period."""
    try:
        await asyncio.wait_for(step, STOP_STEP_TIMEOUT_S)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the shutdown itself is being cancelled; a cancelled step is expected
    except TimeoutError:
        log.error("shutdown: %s did not finish within %.0fs; going on", what, STOP_STEP_TIMEOUT_S)
    except Exception:
        log.exception("shutdown: %s failed", what)
