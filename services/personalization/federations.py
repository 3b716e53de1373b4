"""The federations this replica serves: their specs and adapter templates, the base models (loaded
once per model id), the served federations (activated on first use, hot-swapped on announcements) and
the metadata views of the HTTP API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from modeling.base import BaseModel
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors, sha256_hex
from schemas.errors import CodecError, PFIError
from schemas.records import VersionMeta
from services.personalization.backends.base import ServingBackend
from services.personalization.errors import BadRequest, Gone, NotFound, Unavailable
from services.personalization.metrics import ServeMetrics
from services.personalization.served_federation import FederationInfo, ServedFederation
from services.settings import ServeSettings
from services.store.versions import VersionStore

log = logging.getLogger("pfi.serve.engine")

ModelLoader = Callable[[str], BaseModel]
Watcher = Callable[[str], Coroutine[Any, Any, None]]


class Federations:
    """Federation specs, base models and served federations (event-loop confined)."""

    def __init__(
        self,
        store: VersionStore,
        serve: ServeSettings,
        metrics: ServeMetrics,
        *,
        backend: ServingBackend,
        model_loader: ModelLoader,
        max_decoded_bytes: int,
    ) -> None:
        self.store = store
        self.serve = serve
        self.metrics = metrics
        self.backend = backend
        self.model_loader = model_loader
        self.max_decoded_bytes = max_decoded_bytes
        self.watch: Watcher | None = None  # set by the service: subscribe to a federation's streams
        self.runtimes: dict[str, ServedFederation] = {}
        self.freshness_log: list[tuple[str, int, float]] = []
        self._infos: dict[str, FederationInfo] = {}
        self._info_tasks: dict[str, asyncio.Task[FederationInfo]] = {}
        self._activating: dict[str, asyncio.Task[ServedFederation]] = {}
        self._bases: dict[str, BaseModel] = {}
        self._base_lock = asyncio.Lock()

    async def close(self) -> None:
        for runtime in list(self.runtimes.values()):
            await runtime.close()
        self.runtimes.clear()

    async def info(self, fed: str) -> FederationInfo:
        cached = self._infos.get(fed)
        if cached is not None:
            return cached
        task = self._info_tasks.get(fed)
        if task is None:
            task = asyncio.create_task(self._load_info(fed))
            self._info_tasks[fed] = task
            task.add_done_callback(lambda _: self._info_tasks.pop(fed, None))
        return await asyncio.shield(task)

    async def _load_info(self, fed: str) -> FederationInfo:
        spec = await self.store.get_spec(fed)
        if spec is None:
            raise NotFound(f"federation {fed!r} does not exist")
        if self.watch is not None:
            await self.watch(fed)  # stream positions first: nothing published from now on is missed
        latest = await self.store.latest(fed)
        if latest is None:
            raise Unavailable(f"federation {fed!r} has no global adapter yet")
        blob = await self.store.get_blob(fed, latest)
        if blob is None:
            raise Unavailable(f"federation {fed!r}: the blob of v{latest} is missing")
        try:
            state = await asyncio.to_thread(
                decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=self.max_decoded_bytes
            )
        except CodecError as err:
            raise Unavailable(f"federation {fed!r}: global v{latest} does not decode: {err}") from None
        info = FederationInfo(spec=spec, template={k: tuple(v.shape) for k, v in state.items()})
        self._infos[fed] = info
        return info

    async def base_model(self, model_id: str) -> BaseModel:
        async with self._base_lock:
            base = self._bases.get(model_id)
            if base is None:
                try:
                    base = await asyncio.to_thread(self.model_loader, model_id)
                except PFIError as err:
                    raise Unavailable(f"base model {model_id!r} cannot be loaded: {err.message}") from None
                self._bases[model_id] = base
            return base

    async def runtime(self, fed: str) -> ServedFederation:
        runtime = self.runtimes.get(fed)
        if runtime is not None:
            return runtime
        task = self._activating.get(fed)
        if task is None:
            task = asyncio.create_task(self._activate(fed), name=f"pfi-activate-{fed}")
            self._activating[fed] = task
            task.add_done_callback(lambda _: self._activating.pop(fed, None))
        return await asyncio.shield(task)

    async def _activate(self, fed: str) -> ServedFederation:
        info = await self.info(fed)
        base = await self.base_model(info.spec.base_model)
        runtime = ServedFederation(
            info,
            base,
            backend=self.backend,
            store=self.store,
            serve=self.serve,
            metrics=self.metrics,
            max_decoded_bytes=self.max_decoded_bytes,
            freshness_log=self.freshness_log,
        )
        await runtime.refresh()
        self.runtimes[fed] = runtime
        return runtime

    def on_version_event(
        self, fed: str, version: int | None, published_at: float | None, digest: str | None = None
    ) -> None:
        """From the subscriber: ``fed`` published (or rolled back to) ``version`` with blob ``digest``.
        Nothing to do when that exact (version, digest) is already served; the same number with
        another digest (re-made after a Redis failover) rebuilds like a new version."""
        self.metrics.announcements.labels(kind="version").inc()
        runtime = self.runtimes.get(fed)
        if runtime is None:
            return
        current = runtime.current
        if current is not None and version == current.version and digest is not None:
            if current.digest == digest:
                return
            log.warning("%s: v%s announced with another digest than the one served", fed, version)
        runtime.announce(version, published_at)

    # -- metadata views ----------------------------------------------------------------------------
    async def federation_view(self, fed: str) -> dict[str, Any]:
        info = await self.info(fed)
        latest = await self.store.latest(fed)
        meta: VersionMeta | None = None if latest is None else await self.store.get_meta(fed, latest)
        runtime = self.runtimes.get(fed)
        return {
            "name": fed,
            "spec": info.spec.model_dump(mode="json"),
            "fingerprint": info.spec.fingerprint(),
            "latest_version": latest,
            "latest": None if meta is None else _meta_view(meta),
            "retained_versions": await self.store.retained_versions(fed),
            "served_version": None if runtime is None or runtime.current is None else runtime.current.version,
            "adapter_tensors": {k: list(v) for k, v in info.template.items()},
        }

    async def global_blob(self, fed: str, version: str) -> tuple[int, bytes, VersionMeta | None]:
        await self.info(fed)
        if version == "latest":
            number = await self.store.latest(fed)
            if number is None:
                raise NotFound(f"federation {fed!r} has no global adapter yet")
        else:
            try:
                number = int(version)
            except ValueError:
                raise BadRequest(
                    f"version must be 'latest' or a non-negative integer, got {version!r}"
                ) from None
            if number < 0:
                raise BadRequest("version must be >= 0")
        for _ in range(2):
            meta = await self.store.get_meta(fed, number)
            if meta is None:
                raise NotFound(f"federation {fed!r} has no global version {number}")
            blob = await self.store.get_blob(fed, number)
            if blob is None:
                raise Gone(f"{fed!r} global v{number} is not retained any more")
            if await asyncio.to_thread(sha256_hex, blob) == meta.digest:
                return number, blob, meta  # the ETag (the digest) names exactly these bytes
        raise Unavailable(f"{fed!r} global v{number}: the blob does not match its digest; retry")


def _meta_view(meta: VersionMeta) -> dict[str, Any]:
    return {
        "version": meta.version,
        "parent": meta.parent,
        "kind": meta.kind,
        "created_at": meta.created_at.isoformat(),
        "digest": meta.digest,
        "size_bytes": meta.size_bytes,
        "num_updates": len(meta.updates),
        "lora_mode": meta.lora_mode,
        "dp_epsilon": meta.dp_epsilon,
        "encoding": BLOB_ENCODING.model_dump(),
    }
