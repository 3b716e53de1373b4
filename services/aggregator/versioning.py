"""Turning a full (or timed-out) buffer into a committed, announced global version.

**Poison-proof flush** (issue 12). The fold cannot fail on data that passed validation: validation and the
fold use the same float64 norm (:func:`services.aggregator.math.robust.l2_norm`), clipping multiplies in
float64, ``max_update_norm`` is bounded. Should the fold still raise for a reason that is not
infrastructure (``ValueError``/``ArithmeticError``, see :data:`DATA_ERRORS`), :meth:`VersionWriter.flush`
isolates the update(s) that cause it (:func:`isolate_poisoned`), puts the others back into the buffer,
queues the culprits in ``runtime.refused`` (reason ``fold_failed``) and raises :class:`PoisonedUpdates`;
the service dead-letters them and flushes again, so the federation moves on. Anything else (Redis,
Kafka, memory) keeps the resync-and-replay path. After a commit, parked updates enter the new buffer
(``runtime.admit_parked``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modeling.blobs import BLOB_ENCODING
from modeling.lora import StateDict
from schemas.codec import encode_tensors, sha256_hex
from schemas.errors import PFIError, RejectedInput, RejectReason
from schemas.events import AggregationSpec, GlobalVersionPublished, utcnow
from schemas.records import UpdateContribution, VersionMeta
from services.aggregator.math.fedbuff import AggregationResult, BufferedUpdate, aggregate
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.math.strategies.gaussian_dp import account
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.publisher import Publisher
from services.aggregator.runtime import BufferedInfo, FederationRuntime
from services.store.keys import seen_member
from services.store.versions import NotReplicated, VersionCommit, VersionStore

log = logging.getLogger("pfi.aggregator")
RunCpu = Callable[..., Awaitable[Any]]
DATA_ERRORS: tuple[type[Exception], ...] = (ValueError, ArithmeticError)
"""What the fold raises for its data (shapes, non-finite values, overflow): a deterministic failure that
replaying the same buffer would meet again. Not MemoryError or torch's RuntimeError (out of memory)."""


class PoisonedUpdates(PFIError):
    """The fold failed because of these buffered updates: they are queued in ``runtime.refused``
    (``fold_failed``) and the rest is back in the buffer. The caller dead-letters and flushes again."""

    def __init__(self, update_ids: list[str], detail: str) -> None:
        super().__init__(f"fold failed because of update(s) {update_ids}: {detail}")
        self.update_ids = update_ids
        self.detail = detail


class VersionWriter:
    def __init__(
        self,
        store: VersionStore,
        publisher: Publisher,
        metrics: AggregatorMetrics,
        run_cpu: RunCpu,
        topic: str,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.run_cpu = run_cpu
        self.topic = topic

    async def flush(self, runtime: FederationRuntime, processed: Mapping[int, int]) -> int | None:
        """Aggregate the buffer and commit it atomically with offsets; returns the new version.

        Raises :class:`~services.store.versions.CommitConflict` when the federation moved under us;
        the caller then drops its state and replays (the taken buffer is not lost: it is replayed)."""
        taken = runtime.take_buffer()
        if not taken:
            return None
        started = time.perf_counter()
        spec = runtime.spec
        agg = spec.aggregation
        generator = torch.Generator().manual_seed(secrets.randbits(62))
        items = [item for item, _ in taken]
        try:
            result, encoded = await self.run_cpu(
                fold_and_encode, runtime.global_state, items, agg, runtime.opt_state, generator
            )
        except DATA_ERRORS as err:
            poisoned = await self.run_cpu(
                isolate_poisoned, runtime.global_state, items, agg, runtime.opt_state
            )
            if not poisoned:  # not reproducible update by update: treat it as an internal failure
                runtime.restore_buffer(taken, {})
                raise
            refuse = {
                uid: RejectedInput(f"the merge failed on this update: {why}", reason=RejectReason.FOLD_FAILED)
                for uid, why in poisoned.items()
            }
            runtime.restore_buffer(taken, refuse)
            log.warning("%s: fold failed (%s); isolated %s", runtime.name, err, sorted(poisoned))
            raise PoisonedUpdates(sorted(poisoned), str(err)) from err
        accountant, epsilon = account(runtime.accountant, agg)  # the DP wrapper's privacy spent
        version = runtime.head + 1
        meta, event = version_records(
            runtime, version, encoded, _contributions(taken, result), result.noise_std, epsilon, started
        )
        envelope = self.publisher.version_envelope(event)
        offsets = runtime.durable_offsets(processed, self.topic)
        stats: Counter[str] = Counter(runtime.pending_stats)
        stats["accepted_total"] += len(taken)
        stats["aggregated_total"] += len(taken)
        commit = VersionCommit(
            federation=runtime.name,
            expected_latest=runtime.latest,
            expected_head=runtime.head,
            version=version,
            blob=encoded.blob,
            meta=meta,
            offsets=offsets,
            seen_members=tuple(seen_member(item.client_id, item.update_id) for item, _ in taken),
            seen_bases=tuple(info.base_version for _, info in taken),
            max_staleness=agg.max_staleness,
            stat_increments=dict(stats),
            optimizer_blob=encoded.opt_blob,
            accountant_json=_accountant_json(accountant, epsilon),
            keep_versions=agg.keep_versions,
            event_json=envelope.model_dump_json(),
        )
        # issue 12 (helper D2): with PFI_REDIS_WAIT_REPLICAS, a version is announced on Kafka only once
        # that many replicas acknowledged it; else it is committed (and used) but not announced.
        replicated = True
        try:
            await self.store.commit_version(commit)
        except NotReplicated as err:
            replicated = False
            self.metrics.unreplicated_versions.labels(runtime.name).inc()
            log.error("%s; not announcing it on Kafka", err)
        runtime.apply(result, version)
        runtime.accountant = accountant
        runtime.mark_durable(offsets, self.topic)
        runtime.admit_parked()  # the next buffer starts with the updates that waited for this one
        elapsed = time.perf_counter() - started
        name = runtime.name
        self.metrics.aggregation_seconds.labels(name).observe(elapsed)
        self.metrics.versions_published.labels(name).inc()
        self.metrics.updates_aggregated.labels(name).inc(len(taken))
        self.metrics.updates_clipped.labels(name).inc(len(result.clipped))
        self.metrics.global_version.labels(name).set(version)
        self.metrics.last_version_ts.labels(name).set_to_current_time()
        if epsilon is not None:
            self.metrics.dp_epsilon.labels(name).set(epsilon)
        log.info("%s v%d <- %d update(s) in %.3fs", name, version, len(taken), elapsed)
        if replicated:
            await self.publisher.announce(envelope)  # after the metrics: they describe the commit itself
        return version


def version_records(
    runtime: FederationRuntime,
    version: int,
    encoded: EncodedVersion,
    updates: tuple[UpdateContribution, ...],
    noise_std: float,
    epsilon: float | None,
    started: float,
) -> tuple[VersionMeta, GlobalVersionPublished]:
    """The metadata of an aggregated version and its announcement (single aggregator and hierarchy
    root alike): ``version`` on top of ``runtime.latest``, made of ``updates``."""
    agg = runtime.spec.aggregation
    meta = VersionMeta(
        federation=runtime.name,
        version=version,
        parent=runtime.latest,
        kind="aggregate",
        created_at=utcnow(),
        digest=encoded.digest,
        size_bytes=len(encoded.blob),
        spec_fingerprint=runtime.fingerprint,
        updates=updates,
        lora_mode=agg.lora_mode,
        robust=agg.robust,
        server_optimizer=agg.server_optimizer,
        noise_std=noise_std,
        dp_epsilon=epsilon,
        dp_delta=agg.dp_delta if epsilon is not None else None,
        aggregation_seconds=time.perf_counter() - started,
    )
    event = GlobalVersionPublished(
        federation=runtime.name,
        version=version,
        parent=runtime.latest,
        digest=meta.digest,
        num_updates=len(updates),
        size_bytes=len(encoded.blob),
        created_at=meta.created_at,
    )
    return meta, event


@dataclass(frozen=True)
class EncodedVersion:
    """A folded version's bytes, made in a worker thread: the blob, the optimizer state's blob and the
    blob's digest (hashing a SmolLM2-sized blob on the event loop would stall the consumer's fetches)."""

    blob: bytes
    opt_blob: bytes
    digest: str


def encode_version(result: AggregationResult) -> EncodedVersion:
    """The blobs and digest of a fold's result (worker thread; single aggregator and hierarchy root)."""
    blob = encode_tensors(result.new_global, BLOB_ENCODING)
    opt_blob = b""
    if result.opt_state.kind != "none":
        # BLOB_ENCODING stores float32 only: the int64 step and uint8 kind tensors are cast
        # (exactly: small integers) and ServerOptState.from_tensors reads them back from float32.
        opt_tensors = {k: v.to(torch.float32) for k, v in result.opt_state.to_tensors().items()}
        opt_blob = encode_tensors(opt_tensors, BLOB_ENCODING)
    return EncodedVersion(blob, opt_blob, sha256_hex(blob))


def fold_and_encode(
    global_state: StateDict,
    items: list[BufferedUpdate],
    agg: AggregationSpec,
    opt_state: ServerOptState,
    generator: torch.Generator,
) -> tuple[AggregationResult, EncodedVersion]:
    """The fold and the bytes of its result, in one worker-thread call."""
    result = aggregate(global_state, items, agg, opt_state, generator=generator)
    return result, encode_version(result)


def isolate_poisoned(
    global_state: StateDict, items: list[BufferedUpdate], agg: AggregationSpec, opt_state: ServerOptState
) -> dict[str, str]:
    """The updates that make the fold fail (worker thread): update id -> why. Greedy, in buffer order:
    an update is kept when the fold of the kept ones plus it succeeds, else it is a culprit. So the
    kept ones always fold together (the retry cannot fail on them), whether a failure comes from one
    update alone or from a combination (then the one that tips it over is refused). K folds at most."""
    kept: list[BufferedUpdate] = []
    bad: dict[str, str] = {}
    for item in items:
        try:
            aggregate(global_state, [*kept, item], agg, opt_state, generator=torch.Generator().manual_seed(0))
        except DATA_ERRORS as err:
            bad[item.update_id] = str(err) or type(err).__name__
        else:
            kept.append(item)
    return bad


def _contributions(
    taken: list[tuple[Any, BufferedInfo]], result: AggregationResult
) -> tuple[UpdateContribution, ...]:
    clipped = set(result.clipped)
    return tuple(
        UpdateContribution(
            update_id=item.update_id,
            client_id=item.client_id,
            base_version=info.base_version,
            staleness=item.staleness,
            staleness_weight=result.staleness_weights[item.update_id],
            weight=result.weights[item.update_id],
            num_samples=item.num_samples,
            norm=result.norms[item.update_id],
            clipped=item.update_id in clipped,
        )
        for item, info in taken
    )


def _accountant_json(accountant: Any, epsilon: float | None) -> str:
    import json

    return json.dumps(accountant.to_dict()) if epsilon is not None else ""
