"""Kafka is authenticated (SASL/SCRAM-SHA-512) and authorized (ACLs per service principal).

Against the local stack (``pfi stack up``): no anonymous access, wrong passwords refused, and each principal
can do exactly its job on a test's topics (``pfi_settings`` creates them, and their ACLs, as ``admin``).
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupAuthorizationFailedError, KafkaError, TopicAuthorizationFailedError

from schemas.errors import StackError
from services.settings import PFISettings
from services.stack import acls, broker, manager
from services.stack.topics import delete_topics, ensure_topics
from services.transport import Principal, kafka_kwargs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FAST = {"request_timeout_ms": 5000, "retry_backoff_ms": 50}


async def _produce(connection: dict[str, Any], topic: str) -> int:
    producer = AIOKafkaProducer(**connection, **FAST)
    try:
        await producer.start()
        meta = await producer.send_and_wait(topic, b"probe", key=b"k")
        return int(meta.offset)
    finally:
        await producer.stop()


async def _read(connection: dict[str, Any], topic: str, group_id: str | None = None) -> int:
    """Records read from partition 0 of ``topic`` (from the beginning, for up to 2 s)."""
    consumer = AIOKafkaConsumer(**connection, group_id=group_id, enable_auto_commit=False, **FAST)
    try:
        await consumer.start()
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(tp, timeout_ms=2000)
        if group_id is not None:
            await consumer.commit({tp: 0})
        return len(batch.get(tp, []))
    finally:
        await consumer.stop()


async def _read_refused(connection: dict[str, Any], topic: str) -> bool:
    """Reading a topic that holds a record is refused: by the fetch (no READ, but DESCRIBE), or already by
    the metadata request (not even DESCRIBE: aiokafka then logs the error and never fetches)."""
    try:
        return await _read(connection, topic) == 0
    except TopicAuthorizationFailedError:
        return True


def _as(settings: PFISettings, principal: Principal) -> dict[str, Any]:
    return kafka_kwargs(settings, principal)


async def test_an_unauthenticated_producer_cannot_write(pfi_settings: PFISettings) -> None:
    plaintext = {"bootstrap_servers": pfi_settings.kafka_bootstrap(), "security_protocol": "PLAINTEXT"}
    with pytest.raises(KafkaError):
        await _produce(plaintext, pfi_settings.updates_topic)


@pytest.mark.parametrize("user", ["ingest", "nobody"])
async def test_a_wrong_password_or_unknown_user_is_refused(pfi_settings: PFISettings, user: str) -> None:
    connection = {**_as(pfi_settings, "ingest"), "sasl_plain_username": user, "sasl_plain_password": "wrong"}
    with pytest.raises(KafkaError):
        await _produce(connection, pfi_settings.updates_topic)


async def test_ingest_writes_updates_but_cannot_read_them_nor_write_versions(
    pfi_settings: PFISettings,
) -> None:
    ingest = _as(pfi_settings, "ingest")
    assert await _produce({**ingest, "partitioner": lambda *_: 0}, pfi_settings.updates_topic) == 0
    assert await _read_refused(ingest, pfi_settings.updates_topic)
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(ingest, pfi_settings.versions_topic)
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(ingest, pfi_settings.dlq_topic)


async def test_aggregator_reads_updates_in_its_groups_and_cannot_produce_updates(
    pfi_settings: PFISettings,
) -> None:
    aggregator = _as(pfi_settings, "aggregator")
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(aggregator, pfi_settings.updates_topic)
    await _read(
        aggregator, pfi_settings.updates_topic, group_id=f"pfi-aggregator-{pfi_settings.topic_prefix}"
    )
    assert await _produce(aggregator, pfi_settings.versions_topic) >= 0
    assert await _produce(aggregator, pfi_settings.dlq_topic) >= 0
    with pytest.raises(GroupAuthorizationFailedError):
        await _read(aggregator, pfi_settings.updates_topic, group_id=f"other-{pfi_settings.topic_prefix}")


async def test_serving_reads_versions_only(pfi_settings: PFISettings) -> None:
    admin, serving = _as(pfi_settings, "admin"), _as(pfi_settings, "serving")
    for topic in (pfi_settings.updates_topic, pfi_settings.versions_topic):
        await _produce({**admin, "partitioner": lambda *_: 0}, topic)
    assert await _read(serving, pfi_settings.versions_topic) == 1
    assert await _read_refused(serving, pfi_settings.updates_topic)
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(serving, pfi_settings.versions_topic)
    assert await broker.settings_health(pfi_settings, "serving", timeout_s=5.0) is None


async def test_topic_acls_are_literal_and_go_with_their_topics(pfi_settings: PFISettings) -> None:
    settings = pfi_settings.model_copy(update={"topic_prefix": f"t-acl-{uuid.uuid4().hex[:8]}"})
    names = [settings.updates_topic, settings.dlq_topic, settings.versions_topic, settings.partials_topic]
    await ensure_topics(settings, partitions=1)
    admin = AIOKafkaAdminClient(**kafka_kwargs(settings, "admin"))
    await admin.start()
    try:
        mine = {a for a in await acls.describe_acls(admin) if a.resource_name in names}
        assert mine == set(acls.topic_acls(settings))
        assert all(a.pattern_type == acls.PATTERN_LITERAL for a in mine)
        await delete_topics(settings, names)
        deadline = time.monotonic() + 10
        while {a for a in await acls.describe_acls(admin) if a.resource_name in names}:
            assert time.monotonic() < deadline, "ACLs of deleted topics are still there"
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


def test_local_credentials_and_broker_config_are_private(stack: manager.StackStatus) -> None:
    if stack.kafka.external:
        pytest.skip("external Kafka")
    settings = PFISettings()
    for path in (settings.kafka_credentials_path, broker.kafka_paths(settings).config):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert broker.auth_outdated(settings) is None


async def test_an_external_kafka_without_credentials_fails_fast(
    stack: manager.StackStatus, tmp_path: Path
) -> None:
    settings = PFISettings(
        home=tmp_path / "ext", kafka_bootstrap_servers=stack.kafka.address, redis_url=stack.redis.address
    )
    with pytest.raises(StackError, match="no Kafka credentials for principal 'admin'"):
        await manager.up_async(settings, echo=lambda _line: None, topics=False)
