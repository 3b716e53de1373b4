"""The PFI topics, created explicitly (the broker never auto-creates), and the client size limits.

One source for every message-size knob, all derived from ``settings.kafka_max_message_bytes`` (M):

* topic ``max.message.bytes`` = M (the effective limit: one record batch, after compression);
* broker ``message.max.bytes`` / ``replica.fetch.max.bytes`` = M + :data:`BROKER_OVERHEAD_BYTES`, so the
  topic setting is what bites (see :func:`broker_message_max_bytes`);
* producer ``max_request_size`` = M: aiokafka compares it with the *uncompressed* size of a batch holding
  just that record (batch header, key, value and headers included), so whatever the producer accepts
  fits into the topic;
* consumer ``max_partition_fetch_bytes`` >= the broker limit, so a partition fetch always holds a whole
  batch, and ``fetch_max_bytes`` >= that.

Use :func:`producer_limits` / :func:`consumer_limits` (or :func:`kafka_client_limits`) as keyword
arguments of ``AIOKafkaProducer`` / ``AIOKafkaConsumer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from schemas.errors import StackError
from services.settings import PFISettings
from services.stack import acls
from services.transport import kafka_kwargs

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DAY_MS = 24 * 60 * 60 * 1000

#: Broker-wide limits sit this far above the topic limit (room for batch/record framing).
BROKER_OVERHEAD_BYTES = 64 * 1024
#: aiokafka's default ``fetch_max_bytes``; we never go below it.
DEFAULT_FETCH_MAX_BYTES = 50 * MIB

DLQ_PARTITIONS = 3
VERSIONS_PARTITIONS = 1

# Kafka error codes that ``ensure_topics`` / ``delete_topics`` treat as success.
_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC_OR_PARTITION = 3
# Retriable while the controller settles right after start-up.
_RETRIABLE_CODES = frozenset({5, 6, 7, 41, 51})  # leader n/a, not leader, timeout, not controller, conc.


def broker_message_max_bytes(settings: PFISettings) -> int:
    """``message.max.bytes`` (and ``replica.fetch.max.bytes``) of the local broker."""
    return settings.kafka_max_message_bytes + BROKER_OVERHEAD_BYTES


def producer_limits(settings: PFISettings) -> dict[str, int]:
    """Keyword arguments for ``AIOKafkaProducer``: ``{"max_request_size": M}``."""
    return {"max_request_size": settings.kafka_max_message_bytes}


def consumer_limits(settings: PFISettings) -> dict[str, int]:
    """Keyword arguments for ``AIOKafkaConsumer``: ``max_partition_fetch_bytes`` and ``fetch_max_bytes``."""
    per_partition = broker_message_max_bytes(settings)
    return {
        "max_partition_fetch_bytes": per_partition,
        "fetch_max_bytes": max(DEFAULT_FETCH_MAX_BYTES, per_partition),
    }


def kafka_client_limits(settings: PFISettings) -> dict[str, int]:
    """All size limits in one mapping (producer and consumer keys; split them with the two helpers above)."""
    return {**producer_limits(settings), **consumer_limits(settings)}


def client_limits(settings: PFISettings) -> dict[str, int]:
    """Alias of :func:`kafka_client_limits`."""
    return kafka_client_limits(settings)


@dataclass(frozen=True)
class TopicSpec:
    """One topic: name, partitions and topic-level configs (all strings, as Kafka wants them)."""

    name: str
    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)
    replication_factor: int = 1


def topic_specs(settings: PFISettings, *, partitions: int | None = None) -> list[TopicSpec]:
    """The PFI topics. ``partitions`` overrides ``settings.update_partitions`` (updates and partials topics).

    * updates: 7 days, segments of 64 MiB so retention can drop old data in small steps;
    * DLQ: 14 days (kept longer than updates, for forensics);
    * versions: kept forever (small records, the history of global adapter versions).
    """
    max_bytes = str(settings.kafka_max_message_bytes)
    common = {"max.message.bytes": max_bytes, "cleanup.policy": "delete", "min.insync.replicas": "1"}
    return [
        TopicSpec(
            settings.updates_topic,
            partitions if partitions is not None else settings.update_partitions,
            {**common, "retention.ms": str(7 * DAY_MS), "segment.bytes": str(64 * MIB)},
        ),
        TopicSpec(
            settings.dlq_topic,
            DLQ_PARTITIONS,
            {**common, "retention.ms": str(14 * DAY_MS), "segment.bytes": str(64 * MIB)},
        ),
        TopicSpec(settings.versions_topic, VERSIONS_PARTITIONS, {**common, "retention.ms": "-1"}),
        # Issue 15: partial aggregates of hierarchical federations, keyed by federation (one root owns a
        # federation through its partition); as many partitions as the updates topic (roots scale by
        # federation). Kept like updates: a root down for days still finds what the leaves committed.
        TopicSpec(
            settings.partials_topic,
            partitions if partitions is not None else settings.update_partitions,
            {**common, "retention.ms": str(7 * DAY_MS), "segment.bytes": str(64 * MIB)},
        ),
    ]


async def _admin(settings: PFISettings, timeout_s: float) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        **kafka_kwargs(settings, "admin"),
        client_id="pfi-stack-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        await admin.start()
    except KafkaError as err:
        await admin.close()
        raise StackError(f"cannot reach Kafka at {settings.kafka_bootstrap()}: {err}") from err
    return admin


def _error_rows(response: Any, key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = response.to_object()[key]
    return rows


async def ensure_topics(
    settings: PFISettings, *, partitions: int | None = None, timeout_s: float = 60.0
) -> None:
    """Create the updates, DLQ and versions topics if missing, then wait until every partition has a leader.

    Idempotent: existing topics are fine. When an existing topic's configs differ from the spec (for
    example after raising ``kafka_max_message_bytes``), they are altered to match. An existing topic with
    fewer partitions than asked is only logged (adding partitions would remap keys).
    """
    await create_topics(settings, topic_specs(settings, partitions=partitions), timeout_s=timeout_s)


async def create_topics(
    settings: PFISettings, specs: Iterable[TopicSpec], *, timeout_s: float = 60.0
) -> None:
    """Create ``specs`` idempotently (see :func:`ensure_topics`).

    With authentication on, the service principals' ACLs on those of ``specs`` that are ``settings``'
    updates / DLQ / versions topics (and the consumer-group ACLs) are created too, when missing, and
    waited for: a client may use the topics as soon as this returns (:mod:`services.stack.acls`)."""
    wanted = {spec.name: spec for spec in specs}
    if not wanted:
        return
    deadline = time.monotonic() + timeout_s
    admin = await _admin(settings, min(timeout_s, 30.0))
    try:
        pending = dict(wanted)
        existing: set[str] = set()
        while pending:
            response = await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.configs))
                    for s in pending.values()
                ],
                timeout_ms=int(min(timeout_s, 30.0) * 1000),
            )
            retry: dict[str, TopicSpec] = {}
            for row in _error_rows(response, "topic_errors"):
                name, code = row["topic"], row["error_code"]
                if code == 0:
                    log.info("created topic %s (partitions: %d)", name, pending[name].partitions)
                elif code == _TOPIC_ALREADY_EXISTS:
                    existing.add(name)
                elif code in _RETRIABLE_CODES and time.monotonic() < deadline:
                    retry[name] = pending[name]
                else:
                    message = row.get("error_message") or f"error code {code}"
                    raise StackError(f"cannot create topic {name!r}: {message}")
            pending = retry
            if pending:
                await asyncio.sleep(0.5)
        if existing:
            await _reconcile_existing(admin, [wanted[name] for name in sorted(existing)])
        if acls.acls_enabled(settings):
            rules = acls.group_acls() + acls.topic_acls(settings, wanted)
            created = await acls.ensure_acls(admin, rules, timeout_s=max(1.0, deadline - time.monotonic()))
            if created:
                log.info("created %d Kafka ACLs for topics %s", created, sorted(wanted))
        await _wait_for_leaders(admin, wanted, deadline)
    finally:
        await admin.close()


async def _reconcile_existing(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    resources = [ConfigResource(ConfigResourceType.TOPIC, s.name, dict(s.configs)) for s in specs]
    responses = await admin.describe_configs(resources)
    current: dict[str, dict[str, str | None]] = {}
    for response in responses:
        for res in _error_rows(response, "resources"):
            current[res["resource_name"]] = {
                e["config_names"]: e["config_value"] for e in res["config_entries"]
            }
    stale = [s for s in specs if any(current.get(s.name, {}).get(k) != v for k, v in s.configs.items())]
    if stale:
        # Non-incremental AlterConfigs: the spec is the complete set of this topic's overrides.
        for s in stale:
            log.warning(
                "topic %s: configs differ from the spec, altering them to %s", s.name, dict(s.configs)
            )
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name, dict(s.configs)) for s in stale]
        )
        for response in responses:
            for res in _error_rows(response, "resources"):
                if res["error_code"] != 0:
                    raise StackError(
                        f"cannot alter configs of topic {res['resource_name']!r}: {res['error_message']}"
                    )
    described = await admin.describe_topics([s.name for s in specs])
    counts = {t["topic"]: len(t["partitions"]) for t in described}
    for s in specs:
        if counts.get(s.name, s.partitions) < s.partitions:
            log.warning(
                "topic %s exists with %d partitions (< %d wanted); left as is",
                s.name,
                counts[s.name],
                s.partitions,
            )


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, wanted: Mapping[str, TopicSpec], deadline: float
) -> None:
    """Until the broker's metadata lists every partition with a leader, so producing right away works."""
    names = sorted(wanted)
    while True:
        topics = await admin.describe_topics(names)
        ready = {
            t["topic"]
            for t in topics
            if t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
        }
        if ready.issuperset(names):
            return
        if time.monotonic() > deadline:
            raise StackError(f"topics without leaders after creation: {sorted(set(names) - ready)}")
        await asyncio.sleep(0.2)


async def delete_topics(settings: PFISettings, names: Iterable[str], *, timeout_s: float = 30.0) -> None:
    """Delete topics and the ACLs on them; unknown ones are fine."""
    topics = sorted(set(names))
    if not topics:
        return
    admin = await _admin(settings, timeout_s)
    try:
        response = await admin.delete_topics(topics, timeout_ms=int(timeout_s * 1000))
        for row in _error_rows(response, "topic_error_codes"):
            if row["error_code"] not in (0, _UNKNOWN_TOPIC_OR_PARTITION):
                raise StackError(f"cannot delete topic {row['topic']!r}: error code {row['error_code']}")
        if acls.acls_enabled(settings):
            await acls.delete_topic_acls(admin, topics)
    finally:
        await admin.close()


async def describe_topics(settings: PFISettings, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"partitions": int, "configs": {key: value}}}`` for existing topics among ``names``."""
    topics = sorted(set(names))
    admin = await _admin(settings, 30.0)
    try:
        described = await admin.describe_topics(topics)
        found = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
        result: dict[str, dict[str, Any]] = {n: {"partitions": c, "configs": {}} for n, c in found.items()}
        if found:
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, n, None) for n in sorted(found)]
            )
            for response in responses:
                for res in _error_rows(response, "resources"):
                    if res["resource_name"] in result:
                        result[res["resource_name"]]["configs"] = {
                            e["config_names"]: e["config_value"] for e in res["config_entries"]
                        }
        return result
    finally:
        await admin.close()
