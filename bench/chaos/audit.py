"""Exactly-once audits over Redis, and reading the DLQ (moved here from ``tests/support/processes.py``).

* :func:`audit_federation`: a strict audit of one federation against the update ids sent to it (tests);
* :func:`audit_ledger`: the chaos audit of a producer-side :class:`~bench.chaos.ledger.Ledger` against
  federation status: ``lost`` (acked, in no version), ``double_counted`` (in several versions, counted
  twice, or never sent), ``corrupt_versions`` (missing/bad blob, bad digest, non-finite, broken chain);
* :func:`dead_letter_records`: the whole DLQ topic; :func:`wait_aggregated`: wait for a drained stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.chaos.processes import ChaosError
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.errors import RejectReason
from schemas.frame import decode_frame
from services.federation.admin import federation_status
from services.settings import PFISettings
from services.stack.topics import DLQ_PARTITIONS
from services.store.versions import VersionStore
from services.transport import kafka_kwargs


@dataclass
class Audit:
    """What :func:`audit_federation` found; ``problems`` is empty when exactly-once held."""

    name: str
    status: dict[str, Any]
    problems: list[str]

    @property
    def versions(self) -> int:
        return int(self.status["version"] or 0)


async def audit_federation(store: VersionStore, name: str, sent: Iterable[str]) -> Audit:
    """Check a federation against the update ids that were sent to it (all valid):

    every id in exactly one version and no other ids; Σ num_updates == aggregated == accepted == sent;
    nothing rejected or buffered; versions v0..head form a parent chain; every retained blob decodes
    and its SHA-256 is the digest in its metadata."""
    sent_ids = list(sent)
    status = await federation_status(store, name)
    problems: list[str] = []
    if len(set(sent_ids)) != len(sent_ids):
        problems.append("the test sent an update id twice")
    where: dict[str, list[int]] = {}
    for v in status["versions"]:
        for uid in v["update_ids"]:
            where.setdefault(uid, []).append(v["version"])
    missing = sorted(set(sent_ids) - set(where))
    twice = {uid: vs for uid, vs in where.items() if len(vs) > 1}
    unknown = sorted(set(where) - set(sent_ids))
    if missing:
        problems.append(f"{len(missing)} sent update(s) in no version: {missing[:10]}")
    if twice:
        problems.append(f"{len(twice)} update(s) in several versions: {dict(list(twice.items())[:10])}")
    if unknown:
        problems.append(f"{len(unknown)} version update id(s) never sent: {unknown[:10]}")
    total = sum(v["num_updates"] for v in status["versions"])
    n = len(sent_ids)
    for label, value in (
        ("sum of num_updates", total),
        ("updates_aggregated_total", status["updates_aggregated_total"]),
        ("updates_accepted_total", status["updates_accepted_total"]),
    ):
        if value != n:
            problems.append(f"{label} is {value}, sent {n}")
    if status["updates_rejected_total"].get("total", 0) != 0:
        problems.append(f"rejections recorded: {status['updates_rejected_total']}")
    if status["updates_buffered"]:
        problems.append(f"still buffered: {status['updates_buffered']}")
    problems += (await version_problems(store, name, status))[0]
    return Audit(name, status, problems)


async def version_problems(
    store: VersionStore, name: str, status: Mapping[str, Any]
) -> tuple[list[str], set[int]]:
    """Lineage and blob checks of one federation: versions v0..head form a parent chain, latest == head
    (no rollback here), every version past v0 aggregates >= 1 update, and every retained blob decodes,
    is finite, has the digest and size of its metadata and the tensor names/shapes of the others.
    Returns the problems and the numbers of the versions they concern (``-1``: the lineage itself)."""
    problems: list[str] = []
    bad: set[int] = set()
    numbers = [v["version"] for v in status["versions"]]
    head = status["head"]
    if numbers != list(range(0, (head or 0) + 1)):
        problems.append(f"version metas are not 0..{head}: {numbers}")
        bad.add(-1)
    if status["version"] != head:
        problems.append(f"latest {status['version']} != head {head}")
        bad.add(-1)
    for v in status["versions"]:
        expected_parent = None if v["version"] == 0 else v["version"] - 1
        if v["parent"] != expected_parent:
            problems.append(f"v{v['version']} has parent {v['parent']}, expected {expected_parent}")
            bad.add(v["version"])
        if v["version"] > 0 and (v["kind"] != "aggregate" or v["num_updates"] < 1):
            problems.append(f"v{v['version']} is {v['kind']} with {v['num_updates']} update(s)")
            bad.add(v["version"])
    shapes: dict[str, tuple[int, ...]] | None = None
    for version in status["retained_versions"]:
        meta = next((v for v in status["versions"] if v["version"] == version), None)
        blob = await store.get_blob(name, version)
        if meta is None or blob is None:
            problems.append(f"retained v{version}: meta {meta is not None}, blob {blob is not None}")
            bad.add(version)
            continue
        digest = hashlib.sha256(blob).hexdigest()
        if digest != meta["digest"] or len(blob) != meta["size_bytes"]:
            problems.append(
                f"v{version}: blob sha256 {digest[:12]}/{len(blob)} B != meta {meta['digest'][:12]}"
            )
            bad.add(version)
            continue
        try:
            state = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
        except Exception as err:
            problems.append(f"v{version}: blob does not decode: {err!r}")
            bad.add(version)
            continue
        got = {k: tuple(t.shape) for k, t in state.items()}
        if shapes is None:
            shapes = got
        elif got != shapes:
            problems.append(f"v{version}: tensor names/shapes differ from the other versions")
            bad.add(version)
        if not all(bool(t.isfinite().all()) for t in state.values()):
            problems.append(f"v{version}: non-finite values")
            bad.add(version)
    if head and head not in status["retained_versions"]:
        problems.append(f"the latest blob v{head} is not retained")
        bad.add(head)
    return problems, bad


async def dead_letter_records(settings: PFISettings, *, timeout: float = 30.0) -> list[Any]:  # noqa: ASYNC109
    """Every record of the DLQ topic (decoded ``UpdateRejected``), read up to its end offsets."""
    consumer = AIOKafkaConsumer(**kafka_kwargs(settings, "admin"), enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [TopicPartition(settings.dlq_topic, p) for p in range(DLQ_PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: Mapping[TopicPartition, int] = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise ChaosError("could not read the DLQ topic to its end")
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out += [decode_frame(r.value, max_frame_bytes=1 << 24).data for r in records]
    finally:
        await consumer.stop()
    return out


async def wait_aggregated(
    store: VersionStore,
    sent: Mapping[str, list[str]],
    timeout: float = 90.0,  # noqa: ASYNC109
) -> bool:
    """Wait until every federation's ``aggregated_total`` reached the number of updates sent to it."""

    async def done() -> bool:
        for name, ids in sent.items():
            stats = await store.get_stats(name)
            if stats.get("aggregated_total", 0) < len(ids):
                return False
        return True

    deadline = time.monotonic() + timeout
    while True:
        if await done():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.25)


COUNTS = ("acked", "lost", "rejected_valid", "double_counted", "unknown", "corrupt_versions", "versions")


@dataclass
class LedgerAudit:
    """The chaos verdict over every federation of a :class:`Ledger` (all counts 0 when all held)."""

    acked: int = 0
    lost: int = 0  # acknowledged, in no version and not dead-lettered: silently lost
    rejected_valid: int = 0  # acknowledged, in no version, dead-lettered (not as a duplicate)
    double_counted: int = 0  # extra countings: in several versions, or Σ num_updates above distinct ids
    unknown: int = 0  # in a version but never acknowledged to the producer
    corrupt_versions: int = 0
    versions: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count (DUPLICATE is expected)
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not any(getattr(self, n) for n in COUNTS if n not in ("acked", "versions"))

    def merge(self, other: LedgerAudit) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        self.problems += other.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "lost": self.lost,
            "rejected_valid": self.rejected_valid,
            "double_counted": self.double_counted,
            "unknown": self.unknown,
            "corrupt_versions": self.corrupt_versions,
            "versions": self.versions,
            "rejected": dict(self.rejected),
            "problems": self.problems[:20],
        }


async def audit_ledger(
    store: VersionStore, acked: Mapping[str, Iterable[str]], dead: Iterable[Any] = ()
) -> LedgerAudit:
    """Hold each federation's status to the ids its producer got a Kafka ack for (a ledger's ``acked``);
    ``dead``: the DLQ's ``UpdateRejected`` records (to tell a dead-lettered update from a lost one)."""
    dead_letters = {
        r.update_id: str(r.reason) for r in dead if r.update_id and str(r.reason) != RejectReason.DUPLICATE
    }
    total = LedgerAudit()
    for name, ids in acked.items():
        sent = set(ids)
        status = await federation_status(store, name)
        counts = Counter(uid for v in status["versions"] for uid in v["update_ids"])
        one = LedgerAudit(acked=len(sent), versions=int(status["head"] or 0))
        missing = sent - set(counts)
        one.rejected_valid = len(missing & set(dead_letters))
        one.lost = len(missing) - one.rejected_valid
        one.unknown = len(set(counts) - sent)
        one.double_counted = sum(n - 1 for n in counts.values() if n > 1)
        summed = sum(v["num_updates"] for v in status["versions"])
        one.double_counted += max(0, summed - sum(counts.values()))
        one.double_counted += max(0, status["updates_aggregated_total"] - len(counts))
        one.rejected = {k: int(v) for k, v in status["updates_rejected_total"].items() if k != "total"}
        problems, bad = await version_problems(store, name, status)
        one.corrupt_versions = len(bad)
        if one.lost:
            one.problems.append(f"{name}: {one.lost} acked update(s) in no version")
        if one.rejected_valid:
            reasons = Counter(dead_letters[u] for u in missing & set(dead_letters))
            one.problems.append(f"{name}: {one.rejected_valid} acked update(s) dead-lettered: {reasons}")
        if one.double_counted:
            one.problems.append(f"{name}: {one.double_counted} extra counting(s)")
        if one.unknown:
            one.problems.append(f"{name}: {one.unknown} version update id(s) never acked")
        one.problems += [f"{name}: {p}" for p in problems]
        total.merge(one)
    return total
