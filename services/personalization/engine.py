"""The serving engine: federations, their merged model stacks and hot swaps, personal adapters, and
the request-level score/generate logic (the HTTP layer only authenticates and maps errors).

Per federation (:class:`FederationRuntime`):

* ``current`` is the stack every unpinned request leases. An announcement (:meth:`refresh`) reads
  the ``latest`` pointer and, if it moved, builds the new merged stack in a background thread while
  requests keep being served by the old one, then swaps ``current`` in one assignment on the event
  loop. Requests already holding a lease on the old stack finish on it; the old stack becomes idle and
  is dropped when the slot is needed. Announcements that arrive during a build coalesce into one more
  refresh (a rollback is just another move of ``latest``).
* At most ``max_merged_copies`` (2) merged stacks exist or are being built: the current one plus one
  more (the next version during a swap, or a pinned one). A request pinning a retained version leases
  that version's stack, built on demand into the free slot (an idle non-current stack is dropped to
  make room); when both copies are busy it waits up to ``pin_wait_s`` and then gets a 503.
* ``served`` records the first request served on a version: freshness = now - publication time.

Personal adapters live in one byte-bounded LRU (:class:`.adapter_cache.AdapterCache`) shared by all
federations; a miss reads the user's hash from Redis, decodes and validates it off the loop. Uploads
and deletes invalidate locally at once and announce on Redis for the other replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import torch
from redis.asyncio import Redis

from modeling.base import BaseModel, load_base_model
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors, sha256_hex
from schemas.errors import CodecError, PFIError
from schemas.events import FederationSpec, TensorEncoding, utcnow
from schemas.records import VersionMeta
from services.personalization.adapter_cache import AdapterCache
from services.personalization.batcher import Batcher, BatchInfo, Incoming
from services.personalization.errors import (
    BadRequest,
    Gone,
    NotFound,
    PayloadTooLarge,
    ServeError,
    Unavailable,
    Unprocessable,
)
from services.personalization.inference import GenOut, GenRow, ScoreOut, ScoreRow
from services.personalization.metrics import ServeMetrics
from services.personalization.stacks import ModelStack, base_stack, build_merged_stack
from services.personalization.user_adapters import (
    NEGATIVE_ENTRY_BYTES,
    AdapterRecord,
    CacheValue,
    NoAdapter,
    PersonalAdapter,
    UserAdapterStore,
    decode_stored,
    decode_upload,
    encode_for_storage,
    sniff_encoding,
    state_nbytes,
    to_params,
    user_key,
)
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore

log = logging.getLogger("pfi.serve.engine")

ModelLoader = Callable[[str], BaseModel]
LOAD_ATTEMPTS = 3  # loads of a personal adapter overtaken by a change, before a 503
Template = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class FederationInfo:
    spec: FederationSpec
    template: Template  # the adapter's tensor names and shapes


@dataclass(frozen=True)
class Served:
    """What every response reports besides its payload."""

    global_version: int | None  # None: base model alone (benchmarks)
    personal_adapter_version: int | None
    timing: dict[str, float | int | str]


@dataclass(frozen=True)
class ScoreResult:
    results: list[ScoreOut]
    served: Served


@dataclass(frozen=True)
class GenerateResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    served: Served


class FederationRuntime:
    """The model stacks of one federation (event-loop confined)."""

    def __init__(self, engine: Engine, info: FederationInfo, base: BaseModel) -> None:
        self.engine = engine
        self.info = info
        self.spec = info.spec
        self.name = info.spec.name
        self.base = base
        self.stacks: dict[int, ModelStack] = {}
        self.current: ModelStack | None = None
        self._building: dict[int, asyncio.Task[ModelStack]] = {}
        self._released = asyncio.Event()
        self._swap_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_again = False
        self.published: dict[int, float] = {}  # version -> unix time it was announced as published
        self._base_stack: ModelStack | None = None

    @property
    def max_copies(self) -> int:
        return self.engine.serve.max_merged_copies

    @property
    def copies(self) -> int:
        return len(self.stacks) + len(self._building)

    def base_only(self) -> ModelStack:
        if self._base_stack is None:
            self._base_stack = base_stack(self.base, self.name)
        return self._base_stack

    # -- swapping -----------------------------------------------------------------------------------
    def announce(self, version: int | None, published_at: float | None) -> None:
        """A version announcement: refresh in the background (coalescing bursts)."""
        if version is not None and published_at is not None:
            self.published.setdefault(version, published_at)
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_again = True
            return
        self._refresh_task = asyncio.create_task(self._refresh_loop(), name=f"pfi-refresh-{self.name}")

    async def _refresh_loop(self) -> None:
        while True:
            self._refresh_again = False
            try:
                await self.refresh()
            except Exception as err:
                self.engine.metrics.swap_failures.labels(federation=self.name).inc()
                log.error("%s: could not refresh the global adapter: %s", self.name, err)
            if not self._refresh_again:
                return

    async def refresh(self) -> ModelStack:
        """Serve the federation's ``latest`` version (build + atomic swap when it moved, or when the
        version's content changed under the same number: its digest differs from the one loaded, as
        after a Redis failover that re-made version N)."""
        async with self._swap_lock:
            store = self.engine.store
            latest = await store.latest(self.name)
            if latest is None:
                raise Unavailable(f"federation {self.name!r} has no global adapter yet")
            meta = await store.get_meta(self.name, latest)
            digest = None if meta is None else meta.digest
            if (
                self.current is not None
                and self.current.version == latest
                and _digest(self.current) == digest
            ):
                return self.current
            started = time.perf_counter()
            for _ in range(3):
                self.forget_stale(latest, digest)
                stack = await self._obtain(latest, wait_s=None)  # the lease becomes current's reference
                if digest is None or _digest(stack) == digest:
                    break
                self._release(stack)  # built from content replaced meanwhile: build again
            else:
                raise Unavailable(f"{self.name!r} global v{latest} keeps changing; not swapped")
            if stack.published_at is None:
                stack.published_at = self.published.get(latest)
            old, self.current = self.current, stack
            if old is not None:
                self._release(old)
            elapsed = time.perf_counter() - started
            metrics = self.engine.metrics
            metrics.global_version.labels(federation=self.name).set(latest)
            metrics.swap_seconds.labels(federation=self.name).observe(elapsed)
            metrics.swaps.labels(federation=self.name).inc()
            log.info(
                "%s: serving global v%d (was %s; merged copy built in %.3fs, swap after %.3fs)",
                self.name,
                latest,
                "none" if old is None else f"v{old.version}",
                stack.build_seconds,
                elapsed,
            )
            return stack

    async def _obtain(self, version: int, wait_s: float | None) -> ModelStack:
        """A reference to ``version``'s stack, built if needed within the copy bound."""
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        while True:
            stack = self.stacks.get(version)
            if stack is not None:
                stack.refs += 1
                return stack
            pending = self._building.get(version)
            if pending is not None:
                try:
                    built = await asyncio.shield(pending)
                except BaseException:
                    if self._building.get(version) is pending:
                        del self._building[version]
                        self._notify()
                    raise
                if self._building.get(version) is pending:  # the first one back adopts the stack
                    del self._building[version]
                    self.stacks[version] = built
                    self.engine.metrics.merged_copies.labels(federation=self.name).set(len(self.stacks))
                    self._notify()
                if self.stacks.get(version) is built:
                    built.refs += 1  # no await since the check: it cannot have been dropped
                    return built
                continue  # adopted and dropped again before we got here: start over
            if self.copies >= self.max_copies:
                idle = [s for s in self.stacks.values() if s.refs == 0 and s is not self.current]
                if idle:
                    self._drop(min(idle, key=lambda s: s.version))
                    continue
                released = self._released
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise Unavailable(
                        f"{self.name}: {self.max_copies} merged copies are in use; retry later",
                        code="busy",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), remaining)
                continue
            self._building[version] = asyncio.create_task(
                self._build(version), name=f"pfi-build-{self.name}-v{version}"
            )

    def forget_stale(self, version: int, digest: str | None) -> None:
        """Stop serving a merged copy of ``version`` built from other content than ``digest`` (requests
        that hold it finish on it; nothing new leases it)."""
        stack = self.stacks.get(version)
        if stack is not None and digest is not None and _digest(stack) != digest:
            del self.stacks[version]
            self.engine.metrics.merged_copies.labels(federation=self.name).set(len(self.stacks))
            self.engine.metrics.stale_global_copies.labels(federation=self.name).inc()
            log.warning(
                "%s: the content of v%d changed (digest %s -> %s): rebuilding its merged copy",
                self.name,
                version,
                _digest(stack),
                digest,
            )
            self._notify()

    async def _build(self, version: int) -> ModelStack:
        store = self.engine.store
        for _ in range(2):
            meta = await store.get_meta(self.name, version)
            blob = await store.get_blob(self.name, version)
            if blob is None:
                raise Gone(f"{self.name!r} global v{version} is not retained any more")
            if meta is None or await asyncio.to_thread(sha256_hex, blob) == meta.digest:
                break  # the blob is the one its metadata describes (re-read once: a rewrite raced us)
        else:
            raise Unavailable(f"{self.name!r} global v{version}: the blob does not match its digest")
        state = await asyncio.to_thread(
            decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=self.engine.settings.max_decoded_bytes
        )
        return await asyncio.to_thread(
            build_merged_stack,
            self.base,
            self.spec,
            version,
            state,
            slots=self.engine.serve.adapter_slots,
            meta=meta,
        )

    def _drop(self, stack: ModelStack) -> None:
        if self.stacks.get(stack.version) is stack:
            del self.stacks[stack.version]
            self.engine.metrics.merged_copies.labels(federation=self.name).set(len(self.stacks))
            log.info("%s: dropped the merged copy of v%d", self.name, stack.version)

    def _notify(self) -> None:
        self._released.set()
        self._released = asyncio.Event()

    def _release(self, stack: ModelStack) -> None:
        stack.refs -= 1
        if stack.refs <= 0 and stack is not self.current:
            self._notify()

    @contextlib.asynccontextmanager
    async def lease(self, version: int | None = None) -> AsyncIterator[ModelStack]:
        """The stack to serve on: current, or a pinned retained ``version``."""
        current = self.current
        if current is None:
            current = await self.refresh()
            current = self.current or current
        if version is None or version == current.version:
            stack = current
            stack.refs += 1
        else:
            await self._check_pinnable(version)
            stack = await self._obtain(version, wait_s=self.engine.serve.pin_wait_s)
        try:
            yield stack
        finally:
            self._release(stack)

    async def _check_pinnable(self, version: int) -> None:
        store = self.engine.store
        meta = None if version < 0 else await store.get_meta(self.name, version)
        if meta is None:
            raise NotFound(f"federation {self.name!r} has no global version {version}")
        self.forget_stale(version, meta.digest)  # a pinned copy of content since re-made: rebuild it
        if version not in self.stacks and version not in await store.retained_versions(self.name):
            raise Gone(f"{self.name!r} global v{version} is not retained any more")

    def served(self, stack: ModelStack) -> None:
        if stack.first_served or stack.kind != "merged":
            return
        stack.first_served = True
        if stack.published_at is not None:
            freshness = max(0.0, time.time() - stack.published_at)
            self.engine.metrics.freshness.labels(federation=self.name).observe(freshness)
            self.engine.metrics.last_freshness.labels(federation=self.name).set(freshness)
            self.engine.freshness_log.append((self.name, stack.version, freshness))

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh_task
        for task in list(self._building.values()):
            with contextlib.suppress(BaseException):
                await task
        self.stacks.clear()
        self.current = None


Watcher = Callable[[str], Coroutine[Any, Any, None]]


class Engine:
    def __init__(
        self,
        redis: Redis,
        settings: PFISettings,
        serve: ServeSettings,
        metrics: ServeMetrics,
        *,
        model_loader: ModelLoader = load_base_model,
        batching: bool = True,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.serve = serve
        self.metrics = metrics
        self.store = VersionStore(redis)
        self.users = UserAdapterStore(redis)
        self.model_loader = model_loader
        self.cache: AdapterCache[CacheValue] = AdapterCache(
            serve.cache_bytes, metrics=metrics, on_evict=self._on_evict, ttl_s=serve.adapter_revalidate_s
        )
        self.batcher = Batcher(
            metrics,
            max_rows=serve.max_batch,
            max_tokens=serve.max_batch_tokens,
            linger_s=serve.batch_wait_ms / 1000,
            batching=batching,
            max_queue=serve.max_queue,
            max_per_tenant=serve.max_user_in_flight,
        )
        self.watch: Watcher | None = None  # set by the service: subscribe to a federation's streams
        self._infos: dict[str, FederationInfo] = {}
        self._info_tasks: dict[str, asyncio.Task[FederationInfo]] = {}
        self._runtimes: dict[str, FederationRuntime] = {}
        self._activating: dict[str, asyncio.Task[FederationRuntime]] = {}
        self._bases: dict[str, BaseModel] = {}
        self._base_lock = asyncio.Lock()
        self.freshness_log: list[tuple[str, int, float]] = []

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        for runtime in list(self._runtimes.values()):
            await runtime.close()
        self._runtimes.clear()
        await asyncio.to_thread(self.batcher.stop)

    @property
    def runtimes(self) -> dict[str, FederationRuntime]:
        return dict(self._runtimes)

    # -- federations --------------------------------------------------------------------------------
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
                decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=self.settings.max_decoded_bytes
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

    async def runtime(self, fed: str) -> FederationRuntime:
        runtime = self._runtimes.get(fed)
        if runtime is not None:
            return runtime
        task = self._activating.get(fed)
        if task is None:
            task = asyncio.create_task(self._activate(fed), name=f"pfi-activate-{fed}")
            self._activating[fed] = task
            task.add_done_callback(lambda _: self._activating.pop(fed, None))
        return await asyncio.shield(task)

    async def _activate(self, fed: str) -> FederationRuntime:
        info = await self.info(fed)
        base = await self.base_model(info.spec.base_model)
        runtime = FederationRuntime(self, info, base)
        await runtime.refresh()
        self._runtimes[fed] = runtime
        return runtime

    def on_version_event(
        self, fed: str, version: int | None, published_at: float | None, digest: str | None = None
    ) -> None:
        """From the subscriber: ``fed`` published (or rolled back to) ``version`` with blob ``digest``.
        Nothing to do when that exact (version, digest) is already served; the same number with
        another digest (re-made after a Redis failover) rebuilds like a new version."""
        self.metrics.announcements.labels(kind="version").inc()
        runtime = self._runtimes.get(fed)
        if runtime is None:
            return
        current = runtime.current
        if current is not None and version == current.version and digest is not None:
            if _digest(current) == digest:
                return
            log.warning("%s: v%s announced with another digest than the one served", fed, version)
        runtime.announce(version, published_at)

    # -- personal adapters --------------------------------------------------------------------------
    def _on_evict(self, key: str, value: CacheValue, reason: str) -> None:
        if isinstance(value, PersonalAdapter):
            value.evicted = True
            if reason != "capacity":
                # Let go of the tensors on every stack now, not at the next batch of that stack.
                stacks = [s for r in self._runtimes.values() for s in r.stacks.values()]

                def release() -> None:
                    for stack in stacks:
                        stack.release_evicted()

                self.batcher.run_on_thread(release)

    def on_user_event(
        self, fed: str, key: str, op: str, digest: str | None, generation: int | None = None
    ) -> None:
        """From the subscriber: an upload or delete on some replica (maybe this one). The key is
        invalidated even when it is not cached: that makes a load already in flight here start over
        instead of inserting what it read before the change."""
        self.metrics.announcements.labels(kind="user-delete" if op == "delete" else "user-put").inc()
        cached = self.cache.peek(key)
        if (
            op == "put"
            and isinstance(cached, PersonalAdapter)
            and cached.record.digest == digest
            and (generation is None or cached.generation >= generation)
        ):
            return  # already this exact adapter (our own upload)
        if self.cache.invalidate(key, "deleted" if op == "delete" else "invalidated"):
            self.metrics.invalidations.labels(origin="stream").inc()

    async def personal(self, fed: str, user: str) -> tuple[PersonalAdapter | None, str, float]:
        """``(adapter or None, "hit" | "miss", load seconds)``."""
        info = await self.info(fed)
        key = user_key(fed, user)
        spent = 0.0

        async def load_once() -> tuple[CacheValue, int] | None:
            generation, found = await self.users.load(fed, user)
            if found is None:
                value: CacheValue = NoAdapter(generation)
                nbytes = NEGATIVE_ENTRY_BYTES
            else:
                record, blob = found
                try:
                    state = await asyncio.to_thread(
                        decode_stored, blob, info.template, self.settings.max_decoded_bytes
                    )
                except (CodecError, ServeError) as err:
                    raise Unavailable(f"the stored adapter of user {user!r} is unusable: {err}") from None
                value, nbytes = self._adapter(key, record, state, generation), state_nbytes(state)
            # An upload or delete on any replica since the read bumped the generation: the value is
            # already outdated and must not be cached (nor served).
            if await self.users.generation(fed, user) != generation:
                self.metrics.invalidations.labels(origin="load").inc()
                return None
            return value, nbytes

        async def load() -> tuple[CacheValue, int]:
            nonlocal spent
            started = time.perf_counter()
            try:
                for _ in range(LOAD_ATTEMPTS):
                    result = await load_once()
                    if result is not None:
                        return result
                raise Unavailable(
                    f"the personal adapter of user {user!r} kept changing while loading; retry", code="busy"
                )
            finally:
                spent = time.perf_counter() - started
                self.metrics.adapter_load_seconds.observe(spent)

        async def revalidate(value: CacheValue) -> bool:
            return await self.users.generation(fed, user) == value.generation

        value, hit = await self.cache.get_or_load(key, load, revalidate=revalidate)
        adapter = value if isinstance(value, PersonalAdapter) else None
        return adapter, "hit" if hit else "miss", spent

    @staticmethod
    def _adapter(
        key: str, record: AdapterRecord, state: dict[str, torch.Tensor], generation: int
    ) -> PersonalAdapter:
        return PersonalAdapter(
            key=key, record=record, params=to_params(state), nbytes=state_nbytes(state), generation=generation
        )

    async def upload(
        self,
        fed: str,
        user: str,
        body: bytes,
        *,
        trained_against: int,
        dtype: str = "float32",
        quantization: str = "none",
    ) -> AdapterRecord:
        info = await self.info(fed)
        if len(body) > self.serve.max_upload_bytes:
            raise PayloadTooLarge(f"upload of {len(body)} bytes exceeds {self.serve.max_upload_bytes}")
        if trained_against < 0 or await self.store.get_meta(fed, trained_against) is None:
            raise Unprocessable(
                f"trained_against={trained_against}: federation {fed!r} has no such global version",
                code="unknown_version",
            )
        encoding: TensorEncoding = sniff_encoding(body, dtype, quantization)
        # A legitimate blob decodes to ~4 bytes per parameter plus headers: cap zstd expansion there.
        limit = 4 * sum(math.prod(s) for s in info.template.values()) + 256 * len(info.template) + (1 << 20)
        try:
            state = await asyncio.to_thread(
                decode_upload, body, encoding, info.template, max_decoded_bytes=limit
            )
        except ServeError:
            self.metrics.adapter_uploads.labels(outcome="rejected").inc()
            raise
        blob = await asyncio.to_thread(encode_for_storage, state)
        record = AdapterRecord(
            federation=fed,
            user_id=user,
            version=1,
            trained_against=trained_against,
            created_at=utcnow(),
            digest=sha256_hex(blob),
            size_bytes=len(blob),
            num_tensors=len(state),
            num_parameters=sum(t.numel() for t in state.values()),
            upload_encoding=encoding,
        )
        version, generation = await self.users.put(record, blob)
        record = record.model_copy(update={"version": version})
        key = user_key(fed, user)
        if self.cache.invalidate(key, "invalidated"):
            self.metrics.invalidations.labels(origin="local").inc()
        self.cache.put(key, self._adapter(key, record, state, generation), state_nbytes(state))
        self.metrics.adapter_uploads.labels(outcome="stored").inc()
        return record

    async def adapter_record(self, fed: str, user: str) -> AdapterRecord:
        await self.info(fed)
        found = await self.users.get(fed, user, with_blob=False)
        if found is None:
            raise NotFound(f"user {user!r} has no personal adapter in federation {fed!r}")
        return found[0]

    async def delete(self, fed: str, user: str) -> None:
        await self.info(fed)
        deleted = await self.users.delete(fed, user)
        if self.cache.invalidate(user_key(fed, user), "deleted"):
            self.metrics.invalidations.labels(origin="local").inc()
        if not deleted:
            raise NotFound(f"user {user!r} has no personal adapter in federation {fed!r}")
        self.metrics.adapter_deletes.inc()

    # -- requests -----------------------------------------------------------------------------------
    def _tokenize(self, tokens: Any, text: str, what: str) -> list[int]:
        if len(text) > self.serve.max_prompt_chars:
            raise PayloadTooLarge(
                f"{what} has {len(text)} characters; the limit is {self.serve.max_prompt_chars}"
            )
        ids: list[int] = tokens.encode(text)
        if len(ids) > self.serve.max_prompt_tokens:
            raise PayloadTooLarge(
                f"{what} has {len(ids)} tokens; the limit is {self.serve.max_prompt_tokens}"
            )
        return ids

    async def _prepare(
        self, fed: str, user: str | None, use_personal: bool
    ) -> tuple[FederationRuntime, PersonalAdapter | None, dict[str, float | int | str]]:
        runtime = await self.runtime(fed)
        timing: dict[str, float | int | str] = {"cache": "none"}
        adapter = None
        if user is not None and use_personal:
            adapter, cache, load_s = await self.personal(fed, user)
            timing["cache"] = cache
            if cache == "miss":
                timing["adapter_load_ms"] = round(load_s * 1000, 3)
        return runtime, adapter, timing

    def _admit(self, tenant: str | None) -> contextlib.AbstractContextManager[None]:
        """The per-user bound of an HTTP request (``tenant``: its principal); in-process callers
        (benchmarks) pass none and are bounded by the queue alone."""
        return contextlib.nullcontext() if tenant is None else self.batcher.admit(tenant)

    @staticmethod
    def _finish(
        timing: dict[str, float | int | str], info: BatchInfo, started: float
    ) -> dict[str, float | int | str]:
        timing.update(
            queue_ms=round(info.queue_seconds * 1000, 3),
            compute_ms=round(info.compute_seconds * 1000, 3),
            batch_rows=info.batch_rows,
            batch_requests=info.batch_requests,
            total_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return timing

    async def _submit(
        self,
        kind: str,
        runtime: FederationRuntime,
        adapter: PersonalAdapter | None,
        rows: list[Any],
        *,
        version: int | None,
        base_only: bool,
        mark: Incoming,
        tenant: str,
    ) -> tuple[list[Any], BatchInfo, int | None]:
        if base_only:
            outs, info = await self.batcher.submit(
                kind, runtime.base_only(), None, rows, mark=mark, tenant=tenant, admitted=True
            )
            return outs, info, None
        async with runtime.lease(version) as stack:
            outs, info = await self.batcher.submit(
                kind, stack, adapter, rows, mark=mark, tenant=tenant, admitted=True
            )
            runtime.served(stack)
            return outs, info, stack.version

    async def score(
        self,
        fed: str,
        user: str | None,
        texts: list[str],
        *,
        version: int | None = None,
        use_personal: bool = True,
        base_only: bool = False,
        tenant: str | None = None,
    ) -> ScoreResult:
        """Per-text next-token NLL / accuracy on base + global (+ the user's personal adapter)."""
        started = time.perf_counter()
        if not texts:
            raise BadRequest("texts must not be empty")
        if len(texts) > self.serve.max_score_texts:
            raise PayloadTooLarge(
                f"{len(texts)} texts; the limit is {self.serve.max_score_texts} per request"
            )
        admission = self._admit(tenant)
        tenant = tenant if tenant is not None else (user or "")
        with admission, self.batcher.incoming() as mark:
            runtime, adapter, timing = await self._prepare(fed, user, use_personal and not base_only)
            tokens = runtime.base_only().tokens
            rows: list[ScoreRow] = []
            for i, text in enumerate(texts):
                ids = self._tokenize(tokens, text, f"texts[{i}]")
                if len(ids) < 2:
                    raise Unprocessable(f"texts[{i}] has fewer than 2 tokens: nothing to score")
                if len(ids) > tokens.max_positions:
                    raise PayloadTooLarge(
                        f"texts[{i}] is longer than the model's {tokens.max_positions} positions"
                    )
                rows.append(ScoreRow(ids, adapter))
            outs, info, global_version = await self._submit(
                "score",
                runtime,
                adapter,
                rows,
                version=version,
                base_only=base_only,
                mark=mark,
                tenant=tenant,
            )
        self.metrics.scored_tokens.labels(federation=fed).inc(sum(o.tokens for o in outs))
        served = Served(
            global_version, None if adapter is None else adapter.version, self._finish(timing, info, started)
        )
        return ScoreResult(outs, served)

    async def generate(
        self,
        fed: str,
        user: str | None,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        version: int | None = None,
        use_personal: bool = True,
        base_only: bool = False,
        tenant: str | None = None,
    ) -> GenerateResult:
        """Continue ``prompt`` with base + global (+ the user's personal adapter)."""
        started = time.perf_counter()
        if max_new_tokens > self.serve.max_new_tokens:
            raise Unprocessable(
                f"max_new_tokens={max_new_tokens} exceeds the cap of {self.serve.max_new_tokens}"
            )
        admission = self._admit(tenant)
        tenant = tenant if tenant is not None else (user or "")
        with admission, self.batcher.incoming() as mark:
            runtime, adapter, timing = await self._prepare(fed, user, use_personal and not base_only)
            tokens = runtime.base_only().tokens
            ids = self._tokenize(tokens, prompt, "prompt")
            if not ids:
                raise Unprocessable("the prompt encodes to no tokens")
            if len(ids) + max_new_tokens > tokens.max_positions:
                raise Unprocessable(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                    f"{tokens.max_positions} positions"
                )
            row = GenRow(ids, adapter, max_new_tokens, temperature, top_p, seed)
            outs, info, global_version = await self._submit(
                "generate",
                runtime,
                adapter,
                [row],
                version=version,
                base_only=base_only,
                mark=mark,
                tenant=tenant,
            )
        out: GenOut = outs[0]
        self.metrics.tokens_generated.labels(federation=fed).inc(len(out.tokens))
        self.metrics.prompt_tokens.labels(federation=fed).inc(len(ids))
        served = Served(
            global_version, None if adapter is None else adapter.version, self._finish(timing, info, started)
        )
        return GenerateResult(tokens.decode(out.tokens), out.tokens, len(ids), out.finish_reason, served)

    # -- metadata -----------------------------------------------------------------------------------
    async def federation_view(self, fed: str) -> dict[str, Any]:
        info = await self.info(fed)
        latest = await self.store.latest(fed)
        meta: VersionMeta | None = None if latest is None else await self.store.get_meta(fed, latest)
        runtime = self._runtimes.get(fed)
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


def _digest(stack: ModelStack) -> str | None:
    return None if stack.meta is None else stack.meta.digest


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
