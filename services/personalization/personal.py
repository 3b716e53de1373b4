"""Personal adapters: the byte-bounded LRU of decoded adapters shared by all federations, their loads
from Redis, uploads and deletes.

A miss reads the user's hash from Redis and decodes and validates it off the loop (a load overtaken by
an upload or delete on any replica starts over; after ``LOAD_ATTEMPTS`` a 503). Uploads and deletes
invalidate locally at once and announce on Redis for the other replicas (:meth:`PersonalAdapters.
on_user_event` is their end of the stream). An adapter that leaves the cache is flagged ``evicted``;
every model stack lets go of it after its next batch, or at once (``release_everywhere``) when it was
deleted or replaced.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import torch

from schemas.codec import sha256_hex
from schemas.errors import CodecError
from schemas.events import TensorEncoding, utcnow
from services.personalization.adapter_cache import AdapterCache
from services.personalization.errors import NotFound, PayloadTooLarge, ServeError, Unavailable, Unprocessable
from services.personalization.metrics import ServeMetrics
from services.personalization.served_federation import FederationInfo
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
from services.settings import ServeSettings
from services.store.versions import VersionStore

LOAD_ATTEMPTS = 3  # loads of a personal adapter overtaken by a change, before a 503


class PersonalAdapters:
    """The personal adapters of every federation this replica serves (event-loop confined)."""

    def __init__(
        self,
        users: UserAdapterStore,
        store: VersionStore,
        serve: ServeSettings,
        metrics: ServeMetrics,
        *,
        info: Callable[[str], Awaitable[FederationInfo]],
        release_everywhere: Callable[[], None],
        max_decoded_bytes: int,
    ) -> None:
        self.users = users
        self.store = store
        self.serve = serve
        self.metrics = metrics
        self.info = info  # the federation's spec and template (NotFound for unknown federations)
        self._release_everywhere = release_everywhere  # every stack lets go of evicted adapters
        self.max_decoded_bytes = max_decoded_bytes
        self.cache: AdapterCache[CacheValue] = AdapterCache(
            serve.cache_bytes, metrics=metrics, on_evict=self._on_evict, ttl_s=serve.adapter_revalidate_s
        )

    def _on_evict(self, key: str, value: CacheValue, reason: str) -> None:
        if isinstance(value, PersonalAdapter):
            value.evicted = True
            if reason != "capacity":
                # Let go of the tensors on every stack now, not at the next batch of that stack.
                self._release_everywhere()

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

    async def get(self, fed: str, user: str) -> tuple[PersonalAdapter | None, str, float]:
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
                        decode_stored, blob, info.template, self.max_decoded_bytes
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
        gate: float = 1.0,
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
            gate=gate,
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
