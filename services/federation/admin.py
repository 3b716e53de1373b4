"""Federation administration over the Redis layout (used by the CLI and by tests)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import torch

from modeling.base import load_base_model
from modeling.blobs import BLOB_ENCODING
from modeling.lora import init_adapter
from schemas.codec import encode_tensors, sha256_hex
from schemas.errors import ConfigError
from schemas.events import Envelope, FederationSpec, GlobalVersionPublished, make_envelope, utcnow
from schemas.records import VersionMeta
from services.aggregator.math.strategies import check_spec
from services.store.versions import StoreError, UnknownFederation, VersionCommit, VersionStore

SOURCE = "pfi://admin"


async def create_federation(store: VersionStore, spec: FederationSpec) -> VersionMeta:
    """Store the spec and the seeded v0 adapter (PEFT initialization) in one atomic step: the base model
    is loaded and v0 computed before anything is written, so a failure leaves nothing behind. Refuses
    an existing name (:class:`ConfigError`)."""
    _check_strategies(spec)  # fail fast, before loading the model
    if await store.get_spec(spec.name) is not None and await store.latest(spec.name) is not None:
        raise ConfigError(f"federation {spec.name!r} already exists")  # fail fast, before loading the model
    base = await asyncio.to_thread(load_base_model, spec.base_model)
    state = await asyncio.to_thread(init_adapter, spec, base.model)
    return await create_with_state(store, spec, state)


async def create_with_state(
    store: VersionStore, spec: FederationSpec, state: dict[str, torch.Tensor], *, source: str = SOURCE
) -> VersionMeta:
    """Create a federation whose v0 is ``state`` (spec + v0 atomically; see :func:`create_federation`)."""
    _check_strategies(spec)
    blob = await asyncio.to_thread(encode_tensors, state, BLOB_ENCODING)
    meta, envelope = _version_records(spec, 0, None, blob, source)
    try:
        await store.create_federation(spec, blob, meta, envelope.model_dump_json())
    except StoreError as err:
        raise ConfigError(f"federation {spec.name!r}: {err}") from None
    return meta


def _check_strategies(spec: FederationSpec) -> None:
    """:class:`ConfigError` unless the aggregator's strategy registry has and accepts the spec's combiner
    and server optimizer (``services.aggregator.math.strategies.check_spec``)."""
    try:
        check_spec(spec.aggregation)
    except ValueError as err:
        raise ConfigError(f"federation {spec.name!r}: {err}") from None


def _version_records(
    spec: FederationSpec, version: int, parent: int | None, blob: bytes, source: str
) -> tuple[VersionMeta, Envelope[GlobalVersionPublished]]:
    """The metadata and the announcement (with the blob's digest) of a version made outside the aggregator."""
    meta = VersionMeta(
        federation=spec.name,
        version=version,
        parent=parent,
        kind="init" if version == 0 else "aggregate",
        created_at=utcnow(),
        digest=sha256_hex(blob),
        size_bytes=len(blob),
        spec_fingerprint=spec.fingerprint(),
        lora_mode=spec.aggregation.lora_mode,
    )
    event = GlobalVersionPublished(
        federation=spec.name,
        version=version,
        parent=parent,
        digest=meta.digest,
        num_updates=0,
        size_bytes=len(blob),
        created_at=meta.created_at,
    )
    envelope = make_envelope(event, source=source, subject=spec.name, event_id=f"{spec.name}-v{version}")
    return meta, envelope


async def commit_state(
    store: VersionStore, spec: FederationSpec, state: dict[str, torch.Tensor], *, source: str = SOURCE
) -> VersionMeta:
    """Commit ``state`` as the federation's next version (v0 when it has none) with its announcement,
    outside the aggregator: federation creation, benchmarks and tests of the serving path."""
    latest, head = await store.pointers(spec.name)
    version = 0 if head is None else head + 1
    blob = await asyncio.to_thread(encode_tensors, state, BLOB_ENCODING)
    meta, envelope = _version_records(spec, version, latest, blob, source)
    await store.commit_version(
        VersionCommit(
            federation=spec.name,
            expected_latest=latest,
            expected_head=head,
            version=version,
            blob=blob,
            meta=meta,
            keep_versions=spec.aggregation.keep_versions,
            event_json=envelope.model_dump_json(),
        )
    )
    return meta


async def federation_status(store: VersionStore, name: str) -> dict[str, Any]:
    """Everything an operator (or an outside audit of exactly-once) needs about a federation."""
    spec = await store.require_spec(name)
    latest, head = await store.pointers(name)
    stats = await store.get_stats(name)
    live = await store.get_live(name)
    retained = set(await store.retained_versions(name))
    pinned = await store.pinned_versions(name)
    versions: list[dict[str, Any]] = []
    for version in range(0, (head or 0) + 1):
        meta = await store.get_meta(name, version)
        if meta is None:
            continue
        versions.append(
            {
                "version": meta.version,
                "parent": meta.parent,
                "kind": meta.kind,
                "created_at": meta.created_at.isoformat(),
                "num_updates": len(meta.updates),
                "update_ids": meta.update_ids,
                "retained": version in retained,
                "digest": meta.digest,
                "size_bytes": meta.size_bytes,
                "dp_epsilon": meta.dp_epsilon,
                "mean_staleness": (sum(u.staleness for u in meta.updates) / len(meta.updates))
                if meta.updates
                else None,
            }
        )
    rejected = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("rejected:")}
    buffered = int(live.get("buffered", 0))
    last = next((v for v in reversed(versions) if v["version"] == latest), None)
    return {
        "name": name,
        "spec": spec.model_dump(mode="json"),
        "fingerprint": spec.fingerprint(),
        "version": latest,
        "head": head,
        "last_version_at": last["created_at"] if last else None,
        "updates_accepted_total": stats.get("accepted_total", 0) + buffered,
        "updates_aggregated_total": stats.get("aggregated_total", 0),
        "updates_buffered": buffered,
        "updates_rejected_total": {"total": stats.get("rejected_total", 0), **rejected},
        "retained_versions": sorted(retained),
        "pinned_versions": pinned,
        "versions": versions,
    }


async def rollback_federation(store: VersionStore, name: str, to: int) -> int | None:
    """Move ``latest`` to retained version ``to``; returns the previous latest."""
    await store.require_spec(name)
    meta = await store.get_meta(name, to)
    if meta is None:
        raise StoreError(f"federation {name!r} has no version {to}")
    event = GlobalVersionPublished(
        federation=name,
        version=to,
        parent=meta.parent,
        digest=meta.digest,
        num_updates=len(meta.updates),
        size_bytes=meta.size_bytes,
        created_at=utcnow(),
        rollback=True,
    )
    envelope = make_envelope(event, source=SOURCE, subject=name)
    return await store.rollback(name, to, envelope.model_dump_json())


async def require(store: VersionStore, name: str) -> FederationSpec:
    try:
        return await store.require_spec(name)
    except UnknownFederation:
        raise
    except json.JSONDecodeError as err:  # pragma: no cover - corrupted store
        raise StoreError(f"spec of {name!r} is corrupt: {err}") from None
