"""Builds a :class:`FederationRuntime` from Redis: spec, latest global, optimizer state, lineage, marks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from schemas.chunking import Reassembler
from schemas.codec import decode_tensors
from services.aggregator.math.privacy import RdpAccountant
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.runtime import FederationRuntime, PartitionMarks, Position, build_lineage
from services.settings import PFISettings
from services.store.keys import hwm_field, offset_field
from services.store.versions import StoreError, VersionStore
from modeling.blobs import BLOB_ENCODING

RunCpu = Callable[..., Awaitable[Any]]


class StateLoader:
    def __init__(self, store: VersionStore, settings: PFISettings, run_cpu: RunCpu) -> None:
        self.store = store
        self.settings = settings
        self.run_cpu = run_cpu
        self._unknown: dict[str, float] = {}  # negative cache: name -> when we last looked

    async def runtime(self, runtimes: dict[str, FederationRuntime], name: str) -> FederationRuntime | None:
        """The runtime of ``name``, loading it on first use; None when no such federation exists."""
        if name in runtimes:
            return runtimes[name]
        looked = self._unknown.get(name)
        if looked is not None and time.monotonic() - looked < 2.0:
            return None
        runtime = await self.load(name)
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
            if field.startswith(f"{topic}:") and not field.endswith(":hwm"):
                partition = int(field.rsplit(":", 1)[1])
                assert field == offset_field(topic, partition)
                marks[partition] = PartitionMarks(value, stored.get(hwm_field(topic, partition), value))
        reassembler: Reassembler[Position] = Reassembler(
            max_total_bytes=self.settings.max_inflight_chunk_bytes,
            ttl_s=self.settings.chunk_ttl_s,
            max_update_bytes=self.settings.max_update_bytes,
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
