"""A federation being served: its merged model stacks and their hot swaps (event-loop confined).

Per federation (:class:`ServedFederation`):

* ``current`` is the stack every unpinned request leases. An announcement (``refresh``) reads the
  ``latest`` pointer and, if it moved, has the serving backend build the new merged stack in a
  background thread while requests keep being served by the old one, then swaps ``current`` in one
  assignment on the event loop. Requests already holding a lease on the old stack finish on it;
  the old stack becomes idle and is dropped when the slot is needed. Announcements that arrive during a
  build coalesce into one more refresh (a rollback is just another move of ``latest``).
* At most ``max_merged_copies`` (2) merged stacks exist or are being built: the current one plus one
  more (the next version during a swap, or a pinned one). A request pinning a retained version leases
  that version's stack, built on demand into the free slot (an idle non-current stack is dropped to
  make room); when both copies are busy it waits up to ``pin_wait_s`` and then gets a 503.
* ``served`` records the first request served on a version: freshness = now - publication time.

What a stack is and how it is built is the backend's business (:mod:`.backends`); this module only
counts leases, bounds copies and checks digests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from modeling.base import BaseModel
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors, sha256_hex
from schemas.events import FederationSpec
from services.personalization.backends.base import ModelStack, ServingBackend
from services.personalization.errors import Gone, NotFound, Unavailable
from services.personalization.metrics import ServeMetrics
from services.settings import ServeSettings
from services.store.versions import VersionStore

log = logging.getLogger("pfi.serve.engine")

Template = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class FederationInfo:
    spec: FederationSpec
    template: Template  # the adapter's tensor names and shapes


class ServedFederation:
    """The model stacks of one federation (event-loop confined)."""

    def __init__(
        self,
        info: FederationInfo,
        base: BaseModel,
        *,
        backend: ServingBackend,
        store: VersionStore,
        serve: ServeSettings,
        metrics: ServeMetrics,
        max_decoded_bytes: int,
        freshness_log: list[tuple[str, int, float]],
    ) -> None:
        self.backend = backend
        self.store = store
        self.serve = serve
        self.metrics = metrics
        self.max_decoded_bytes = max_decoded_bytes
        self.freshness_log = freshness_log  # (federation, version, seconds) of each first use
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
        return self.serve.max_merged_copies

    @property
    def copies(self) -> int:
        return len(self.stacks) + len(self._building)

    def base_only(self) -> ModelStack:
        if self._base_stack is None:
            self._base_stack = self.backend.base_only(self.base, self.name)
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
                self.metrics.swap_failures.labels(federation=self.name).inc()
                log.error("%s: could not refresh the global adapter: %s", self.name, err)
            if not self._refresh_again:
                return

    async def refresh(self) -> ModelStack:
        """Serve the federation's ``latest`` version (build + atomic swap when it moved, or when the
        version's content changed under the same number: its digest differs from the one loaded, as
        after a Redis failover that re-made version N)."""
        async with self._swap_lock:
            store = self.store
            latest = await store.latest(self.name)
            if latest is None:
                raise Unavailable(f"federation {self.name!r} has no global adapter yet")
            meta = await store.get_meta(self.name, latest)
            digest = None if meta is None else meta.digest
            if self.current is not None and self.current.version == latest and self.current.digest == digest:
                return self.current
            started = time.perf_counter()
            for _ in range(3):
                self.forget_stale(latest, digest)
                stack = await self._obtain(latest, wait_s=None)  # the lease becomes current's reference
                if digest is None or stack.digest == digest:
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
            metrics = self.metrics
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
                    self.metrics.merged_copies.labels(federation=self.name).set(len(self.stacks))
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
        if stack is not None and digest is not None and stack.digest != digest:
            del self.stacks[version]
            self.metrics.merged_copies.labels(federation=self.name).set(len(self.stacks))
            self.metrics.stale_global_copies.labels(federation=self.name).inc()
            log.warning(
                "%s: the content of v%d changed (digest %s -> %s): rebuilding its merged copy",
                self.name,
                version,
                stack.digest,
                digest,
            )
            self._notify()

    async def _build(self, version: int) -> ModelStack:
        store = self.store
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
            decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=self.max_decoded_bytes
        )
        return await asyncio.to_thread(
            self.backend.build_merged,
            self.base,
            self.spec,
            version,
            state,
            slots=self.serve.adapter_slots,
            meta=meta,
        )

    def _drop(self, stack: ModelStack) -> None:
        if self.stacks.get(stack.version) is stack:
            del self.stacks[stack.version]
            self.metrics.merged_copies.labels(federation=self.name).set(len(self.stacks))
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
            stack = await self._obtain(version, wait_s=self.serve.pin_wait_s)
        try:
            yield stack
        finally:
            self._release(stack)

    async def _check_pinnable(self, version: int) -> None:
        store = self.store
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
            self.metrics.freshness.labels(federation=self.name).observe(freshness)
            self.metrics.last_freshness.labels(federation=self.name).set(freshness)
            self.freshness_log.append((self.name, stack.version, freshness))

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
