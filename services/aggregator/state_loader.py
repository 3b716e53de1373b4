"""Builds a :class:`FederationRuntime` from Redis: spec, latest global, optimizer state, lineage, marks.

A federation that exists but cannot be loaded (half-created by an older release, a corrupt spec or blob,
any failure other than Redis itself being unreachable) is *unavailable*: :meth:`StateLoader.runtime`
raises :class:`FederationUnavailable` (a rejection, FEDERATION_UNAVAILABLE) for its messages, remembered
for ``UNAVAILABLE_RETRY_S`` before the next try, so that one broken federation never stops the
aggregator (nor costs a reload per message). ``RedisError`` propagates: the service waits and replays.

Every runtime's :class:`~schemas.chunking.Reassembler` draws on the loader's one
:class:`~schemas.chunking.ReassemblyBudget`, so the reassembly bound holds for the whole process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from modeling.blobs import BLOB_ENCODING
from schemas.chunking import Reassembler, ReassemblyBudget
from schemas.codec import decode_tensors
from schemas.errors import RejectedInput, RejectReason
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.math.strategies import check_spec
from services.aggregator.runtime import FederationRuntime, PartitionMarks, Position, build_lineage
from services.settings import PFISettings
from services.store.keys import hwm_field, offset_field
from services.store.versions import StoreError, VersionStore

RunCpu = Callable[..., Awaitable[Any]]
log = logging.getLogger("pfi.aggregator")
UNAVAILABLE_RETRY_S = 10.0


class FederationUnavailable(RejectedInput):
    """The federation exists but could not be loaded; its messages are dead-lettered meanwhile."""

    reason = RejectReason.FEDERATION_UNAVAILABLE


class StateLoader:
    def __init__(
        self,
        store: VersionStore,
        settings: PFISettings,
        run_cpu: RunCpu,
        budget: ReassemblyBudget | None = None,
        on_unavailable: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.run_cpu = run_cpu
        self.budget = budget or ReassemblyBudget(settings.max_inflight_chunk_bytes)
        self.on_unavailable = on_unavailable  # called once per failed load (a metric)
        self._unknown: dict[str, float] = {}  # negative cache: name -> when we last looked
        self._unavailable: dict[str, tuple[float, str]] = {}  # name -> (when, why) of the last failed load

    async def runtime(self, runtimes: dict[str, FederationRuntime], name: str) -> FederationRuntime | None:
        """The runtime of ``name``, loading it on first use; None when no such federation exists."""
        if name in runtimes:
            return runtimes[name]
        looked = self._unknown.get(name)
        if looked is not None and time.monotonic() - looked < 2.0:
            return None
        failed = self._unavailable.get(name)
        if failed is not None and time.monotonic() - failed[0] < UNAVAILABLE_RETRY_S:
            raise FederationUnavailable(f"federation {name!r} is unavailable: {failed[1]}")
        try:
            runtime = await self.load(name)
        except RedisError:
            raise  # the store itself: the service waits for it and replays
        except Exception as err:
            why = f"{type(err).__name__}: {err}"[:500]
            log.error("federation %s cannot be loaded (%s); its messages are dead-lettered", name, why)
            if len(self._unavailable) > 10_000:
                self._unavailable.clear()
            self._unavailable[name] = (time.monotonic(), why)
            if self.on_unavailable is not None:
                self.on_unavailable(name)
            raise FederationUnavailable(f"federation {name!r} is unavailable: {why}") from None
        self._unavailable.pop(name, None)
        if runtime is None:
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[name] = time.monotonic()
            return None
        runtimes[name] = runtime
        return runtime

    async def load(self, name: str) -> FederationRuntime | None:
        spec = await self.store.get_spec(name)
        if spec is None:
            return None
        check_spec(spec.aggregation)  # strategies the registry lacks or refuses: unavailable, with why
        latest, head = await self.store.pointers(name)
        if latest is None or head is None:
            raise StoreError(f"federation {name!r} has a spec but no version (half-created?)")
        blob = await self.store.get_blob(name, latest)
        if blob is None:
            raise StoreError(f"federation {name!r}: blob of latest version {latest} is missing")
        state = await self.run_cpu(decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=1 << 40)
        opt_blob = await self.store.get_optimizer(name)
        opt = (
            ServerOptState.from_tensors(
                await self.run_cpu(decode_tensors, opt_blob, BLOB_ENCODING, max_decoded_bytes=1 << 40)
            )
            if opt_blob
            else ServerOptState()
        )
        acc_raw = await self.store.get_accountant(name)
        accountant = RdpAccountant.from_dict(acc_raw) if acc_raw else RdpAccountant()
        max_depth = spec.aggregation.max_staleness
        parents: dict[int, int | None] = {}
        current: int | None = latest
        for _ in range(max_depth + 1):
            if current is None:
                break
            meta = await self.store.get_meta(name, current)
            parents[current] = meta.parent if meta else None
            current = parents[current]
        stored = await self.store.get_offsets(name)
        topic = self.settings.updates_topic
        marks: dict[int, PartitionMarks] = {}
        for field, value in stored.items():
            if field.startswith(f"{topic}:") and not field.endswith((":hwm", ":wm")):
                partition = int(field.rsplit(":", 1)[1])
                assert field == offset_field(topic, partition)
                marks[partition] = PartitionMarks(value, stored.get(hwm_field(topic, partition), value))
        reassembler: Reassembler[Position] = Reassembler(
            max_total_bytes=self.settings.max_inflight_chunk_bytes,
            ttl_s=self.settings.chunk_ttl_s,
            max_update_bytes=self.settings.max_update_bytes,
            budget=self.budget,
            max_uploads_per_client=self.settings.chunk_uploads_per_client,
            max_client_bytes=self.settings.chunk_client_bytes,
        )
        return FederationRuntime(
            spec=spec,
            latest=latest,
            head=head,
            global_state=state,
            opt_state=opt,
            accountant=accountant,
            lineage=build_lineage(latest, parents, max_depth),
            marks=marks,
            reassembler=reassembler,
        )
