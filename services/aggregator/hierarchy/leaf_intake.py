"""Message handling of a leaf (:mod:`.leaf`): one record of its partition set into a partial.

A record keyed ``federation/client`` of a hierarchical federation is decoded (the poll batch's decode, one
worker-thread hop), its chunks authenticated and reassembled, the update deduplicated (the updates this
partition's owner emitted, its open and closed partials, ``seen`` in Redis), validated exactly as the
single aggregator does and folded into the federation's :class:`~.partial.PartialBuilder`. A record keyed
otherwise (a single federation's, which a single aggregator owns) is skipped and counted. In the replay
zone (``replay``) an update that completes was in a committed partial: remembered for the dedupe, never
folded or dead-lettered again.
"""

from __future__ import annotations

from typing import Any

from aiokafka.structs import ConsumerRecord

from schemas.chunking import Reassembler
from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame
from schemas.signing import KeyStore
from services.aggregator.batch import add_chunk, check_and_validate
from services.aggregator.hierarchy.leaf_core import LeafCore
from services.aggregator.hierarchy.partial import PartialBuilder
from services.aggregator.hierarchy.partitions import PartitionState, has_update, split_key
from services.aggregator.runtime import FederationRuntime, Position
from services.aggregator.state_loader import FederationUnavailable
from services.aggregator.validation import FederationView


class LeafIntake(LeafCore):
    """Handles each record: decode, authenticate, reassemble, deduplicate, validate, fold."""

    async def _prefetch_seen(
        self, decoded: list[tuple[Any, Exception | None]]
    ) -> dict[tuple[str, str, str], bool]:
        """``seen`` of the batch's whole updates, in one pipelined round trip (a hint: an update can only
        enter ``seen`` through a partial this partition's owner emitted, which the dedupe catches first)."""
        triples = list(
            dict.fromkeys(
                (env.data.federation, env.data.client_id, env.data.update_id)
                for env, err in decoded
                if err is None and env is not None and isinstance(env.data, AdapterUpdate)
            )
        )
        answers = await self.store.are_seen(triples)
        return dict(zip(triples, answers, strict=True))

    async def handle(
        self,
        partition: int,
        state: PartitionState,
        record: ConsumerRecord[Any, Any],
        ready: tuple[Any, Exception | None] | None = None,
    ) -> None:
        replay = record.offset < state.hwm
        named = split_key(record.key)
        if named is None:
            self.metrics.foreign_skipped.inc()
            return
        federation, key_client = named
        envelope: Envelope[Any] | None = None
        try:
            runtime = await self.loader.runtime(self.runtimes, federation)
            if runtime is None:
                raise RejectedInput(
                    f"unknown federation {federation!r}", reason=RejectReason.UNKNOWN_FEDERATION
                )
            if runtime.spec.aggregation.topology != "hierarchical":
                raise RejectedInput(
                    f"federation {federation!r} is not hierarchical: its updates are keyed by federation",
                    reason=RejectReason.SCHEMA_INVALID,
                )
            if ready is None:
                envelope = await self.run_cpu(
                    decode_frame,
                    record.value or b"",
                    max_frame_bytes=self.settings.max_update_bytes,
                    verify_digest=False,
                )
            elif ready[1] is not None:
                raise ready[1]  # the batch's decode failed on it: what decoding it here raises
            else:
                envelope = ready[0]
            data = envelope.data
            if not isinstance(data, AdapterUpdate | AdapterUpdateChunk):
                raise RejectedInput(
                    f"{envelope.type!r} is not an update", reason=RejectReason.UNKNOWN_EVENT_TYPE
                )
            if data.federation != federation or data.client_id != key_client:
                raise RejectedInput(
                    "message key does not match the update", reason=RejectReason.SCHEMA_INVALID
                )
            if isinstance(data, AdapterUpdateChunk):
                envelope = await self.on_chunk(runtime, state, envelope, (partition, record.offset), replay)
                if envelope is None:
                    return
            await self.on_update(runtime, state, envelope, replay)
        except FederationUnavailable as err:
            if not replay:
                await self.reject(federation, err, envelope, partition, record.offset)
        except RejectedInput as err:
            if not replay:
                await self.reject(federation, err, envelope, partition, record.offset)

    async def on_chunk(
        self,
        runtime: FederationRuntime,
        state: PartitionState,
        envelope: Envelope[AdapterUpdateChunk],
        pos: Position,
        replay: bool,
    ) -> Envelope[Any] | None:
        chunk = envelope.data
        reassembler = state.reassemblers.get(runtime.name)
        if reassembler is None:
            reassembler = state.reassemblers[runtime.name] = Reassembler(
                max_total_bytes=self.settings.max_inflight_chunk_bytes,
                ttl_s=self.settings.chunk_ttl_s,
                max_update_bytes=self.settings.max_update_bytes,
                budget=self.budget,
                max_uploads_per_client=self.settings.chunk_uploads_per_client,
                max_client_bytes=self.settings.chunk_client_bytes,
            )
        if replay and chunk.index != 0 and reassembler.first_position_of(chunk) is None:
            return None  # its upload began below ``safe``: it completed into a committed partial
        await self.keys.ensure(self.redis, runtime.name, chunk.client_id)
        whole: Envelope[Any] | None = await self.run_cpu(
            add_chunk,
            reassembler,
            envelope,
            self.keys.view(runtime.name),
            pos,
            self.settings.max_update_bytes,
        )
        return whole

    async def on_update(
        self, runtime: FederationRuntime, state: PartitionState, envelope: Envelope[Any], replay: bool
    ) -> None:
        update: AdapterUpdate = envelope.data
        member = (runtime.name, update.client_id, update.update_id)
        if replay:
            state.remember(member)  # in a committed partial already
            return
        builder = state.builders.get(runtime.name)
        if (
            member in state.emitted
            or (builder is not None and builder.has(update.update_id))
            or any(p.federation == runtime.name and has_update(p, update.update_id) for p in state.closed)
            or self._seen_hint.get(member, None) is True
            or (
                member not in self._seen_hint
                and await self.store.is_seen(runtime.name, update.client_id, update.update_id)
            )
        ):
            raise RejectedInput(
                f"update {update.update_id!r} was already received", reason=RejectReason.DUPLICATE
            )
        await self.keys.ensure(self.redis, runtime.name, update.client_id)
        agg = runtime.spec.aggregation
        if builder is not None and (
            builder.client_count(update.client_id) >= agg.max_client_updates
            or len(builder) >= self.agg.partial_max_updates
        ):
            self.close(runtime.name, state)
            builder = None
        if builder is None:
            shapes = {k: tuple(v.shape) for k, v in runtime.global_state.items()}
            builder = state.builders[runtime.name] = PartialBuilder(agg, shapes)
            state.fingerprints[runtime.name] = runtime.fingerprint
        await self.run_cpu(  # one worker-thread hop: validation (as the single aggregator's), then the fold
            validate_and_fold,
            builder,
            envelope,
            runtime.view(),
            self.keys.view(runtime.name),
            self.settings.max_decoded_bytes,
        )
        state.remember(member)
        self.metrics.leaf_updates.labels(runtime.name).inc()
        if len(builder) >= self.agg.partial_max_updates:
            self.close(runtime.name, state)


def validate_and_fold(
    builder: PartialBuilder,
    envelope: Envelope[Any],
    view: FederationView,
    keys: KeyStore,
    max_decoded_bytes: int,
) -> None:
    """Validate an update exactly as the single aggregator does and fold it into ``builder`` (worker
    thread): ``RejectedInput`` for a refusal, nothing folded then."""
    valid = check_and_validate(envelope, view, keys, max_decoded_bytes=max_decoded_bytes)
    update = valid.update
    try:
        builder.add(update.update_id, update.client_id, update.base_version, update.num_samples, valid.delta)
    except ValueError as err:
        raise RejectedInput(str(err), reason=RejectReason.NON_FINITE) from None
