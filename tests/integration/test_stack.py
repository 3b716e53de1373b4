"""The local stack against the real services: Kafka 3.9 (KRaft) through aiokafka, and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, UnknownTopicOrPartitionError
from redis.asyncio import Redis

from schemas.errors import StackError
from services.settings import MIB, PFISettings
from services.stack import broker, manager
from services.stack.processes import find_pids, free_ports, pid_alive
from services.stack.topics import (
    broker_message_max_bytes,
    consumer_limits,
    describe_topics,
    ensure_topics,
    kafka_client_limits,
    producer_limits,
)
from services.transport import kafka_kwargs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
TEST_UPDATE_PARTITIONS = 3  # what the pfi_settings fixture (tests/conftest.py) creates

T = TypeVar("T")


def run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _consume(settings: PFISettings, topic: str, count: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        **kafka_kwargs(settings, "admin"),
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **consumer_limits(settings),
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


# ------------------------------------------------------------------------------------------- stack


def test_status_json_reports_both_up(stack: manager.StackStatus) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "stack", "status", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    settings = PFISettings()
    assert report["kafka"]["up"] is True
    assert report["kafka"]["bootstrap"] == settings.kafka_bootstrap()
    assert report["redis"]["up"] is True
    assert report["redis"]["url"] == settings.redis()
    for name in ("kafka", "redis"):
        if not report[name]["external"]:
            assert isinstance(report[name]["pid"], int)
            assert Path(report[name]["log"]).is_file()


def test_up_twice_is_a_fast_no_op(stack: manager.StackStatus) -> None:
    lines: list[str] = []
    for _ in range(2):
        start = time.monotonic()
        status = run_in_thread(manager.up_async(PFISettings(), echo=lines.append))
        assert time.monotonic() - start < 10
        assert status.up
        assert status.kafka.pid == stack.kafka.pid
        assert status.redis.pid == stack.redis.pid
    assert not any("started (pid" in line for line in lines), lines


def test_client_limits_are_consistent() -> None:
    settings = PFISettings()
    limits = kafka_client_limits(settings)
    assert limits["max_request_size"] == settings.kafka_max_message_bytes
    assert limits["max_partition_fetch_bytes"] >= broker_message_max_bytes(settings)
    assert limits["fetch_max_bytes"] >= limits["max_partition_fetch_bytes"]
    config = broker.server_properties(settings, {"admin": "secret"})
    props = dict(line.split("=", 1) for line in config.splitlines() if "=" in line)
    assert int(props["message.max.bytes"]) > settings.kafka_max_message_bytes
    assert props["replica.fetch.max.bytes"] == props["message.max.bytes"]
    assert props["auto.create.topics.enable"] == "false"
    assert props["process.roles"] == "broker,controller"
    assert "zookeeper.connect" not in props
    for listener in props["listeners"].split(","):
        assert "//127.0.0.1:" in listener


def test_missing_mvn_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PFISettings(home=tmp_path, kafka_version="0.0.0-missing")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "mvn" else real_which(name))
    with pytest.raises(StackError, match="apt-get install -y maven"):
        broker.ensure_jars(settings, echo=lambda _line: None)


# ------------------------------------------------------------------------------------------- kafka


async def test_producer_consumer_round_trip(pfi_settings: PFISettings) -> None:
    topic = pfi_settings.updates_topic
    producer = AIOKafkaProducer(
        **kafka_kwargs(pfi_settings, "admin"),
        acks="all",
        enable_idempotence=True,
        compression_type="gzip",  # zstd/lz4/snappy need cramjam (aiokafka extras)
        **producer_limits(pfi_settings),
    )
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(
                topic, f"value-{i}".encode(), key=f"k{i % 3}".encode(), headers=[("h", b"%d" % i)]
            )
    finally:
        await producer.stop()
    records = await _consume(pfi_settings, topic, 10)
    assert sorted(r.value for r in records) == sorted(f"value-{i}".encode() for i in range(10))
    assert {r.partition for r in records} <= set(range(TEST_UPDATE_PARTITIONS))
    by_value = {r.value: r for r in records}
    assert by_value[b"value-4"].headers == (("h", b"4"),)
    assert by_value[b"value-4"].key == b"k1"


async def test_one_and_a_half_mib_message_passes_and_oversize_is_refused(pfi_settings: PFISettings) -> None:
    topic = pfi_settings.versions_topic
    payload = os.urandom(3 * MIB // 2)  # incompressible
    producer = AIOKafkaProducer(**kafka_kwargs(pfi_settings, "admin"), **producer_limits(pfi_settings))
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, payload, key=b"big")
        assert meta.offset >= 0
        with pytest.raises(MessageSizeTooLargeError):
            await producer.send_and_wait(topic, os.urandom(pfi_settings.kafka_max_message_bytes + 1))
    finally:
        await producer.stop()
    # A producer that allows more than the topic does is refused by the broker (the topic limit holds).
    loose = AIOKafkaProducer(
        **kafka_kwargs(pfi_settings, "admin"), max_request_size=8 * MIB, request_timeout_ms=10_000
    )
    await loose.start()
    try:
        with pytest.raises(MessageSizeTooLargeError):  # broker error 10, not the client-side check
            await loose.send_and_wait(topic, os.urandom(pfi_settings.kafka_max_message_bytes + 100 * 1024))
    finally:
        await loose.stop()
    records = await _consume(pfi_settings, topic, 1)
    assert len(records) == 1
    assert records[0].value == payload


async def test_topics_have_expected_partitions_and_limits(pfi_settings: PFISettings) -> None:
    found = await describe_topics(
        pfi_settings, [pfi_settings.updates_topic, pfi_settings.dlq_topic, pfi_settings.versions_topic]
    )
    assert found[pfi_settings.updates_topic]["partitions"] == TEST_UPDATE_PARTITIONS
    assert found[pfi_settings.dlq_topic]["partitions"] == 3
    assert found[pfi_settings.versions_topic]["partitions"] == 1
    for info in found.values():
        assert info["configs"]["max.message.bytes"] == str(pfi_settings.kafka_max_message_bytes)
        assert info["configs"]["cleanup.policy"] == "delete"
    assert found[pfi_settings.versions_topic]["configs"]["retention.ms"] == "-1"
    # Idempotent: again, and with configs drifted, brought back in line.
    raised = pfi_settings.model_copy(update={"kafka_max_message_bytes": 3 * MIB})
    await ensure_topics(raised, partitions=TEST_UPDATE_PARTITIONS)
    again = await describe_topics(raised, [raised.updates_topic])
    assert again[raised.updates_topic]["configs"]["max.message.bytes"] == str(3 * MIB)
    assert again[raised.updates_topic]["partitions"] == TEST_UPDATE_PARTITIONS


async def test_auto_topic_creation_is_off(pfi_settings: PFISettings) -> None:
    unknown = f"{pfi_settings.topic_prefix}.does-not-exist"
    producer = AIOKafkaProducer(**kafka_kwargs(pfi_settings, "admin"), request_timeout_ms=2000)
    await producer.start()
    try:
        with pytest.raises((UnknownTopicOrPartitionError, KafkaTimeoutError)):
            await producer.send_and_wait(unknown, b"x")
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(**kafka_kwargs(pfi_settings, "admin"))
    await admin.start()
    try:
        topics = await admin.list_topics()
    finally:
        await admin.close()
    assert unknown not in topics
    assert pfi_settings.updates_topic in topics


# ------------------------------------------------------------------------------------------- redis


async def test_redis_set_get_and_lua(redis_client: Redis) -> None:
    key = f"test:{uuid.uuid4().hex}"
    assert await redis_client.set(key, b"v1", ex=60)
    assert await redis_client.get(key) == b"v1"
    script = """
    local current = redis.call('GET', KEYS[1])
    if current == ARGV[1] then
        redis.call('SET', KEYS[1], ARGV[2])
        return 1
    end
    return 0
    """
    assert await redis_client.eval(script, 1, key, "v1", "v2") == 1
    assert await redis_client.eval(script, 1, key, "v1", "v3") == 0
    assert await redis_client.get(key) == b"v2"


# --------------------------------------------------------------------------------- a second stack


def _second_stack(tmp_path: Path) -> PFISettings:
    kafka_port, controller_port, redis_port = free_ports(3)
    settings = PFISettings(
        home=tmp_path / "pfi",
        kafka_bootstrap_servers=None,
        redis_url=None,
        kafka_port=kafka_port,
        kafka_controller_port=controller_port,
        redis_port=redis_port,
        kafka_heap="256m",
        update_partitions=2,
        stack_start_timeout_s=120,
    )
    # Reuse the shared jar cache: no second download.
    shared = PFISettings().cache_dir
    settings.home.mkdir(parents=True)
    if shared.is_dir():
        settings.cache_dir.symlink_to(shared, target_is_directory=True)
    return settings


async def test_down_and_up_of_a_second_stack(tmp_path: Path) -> None:
    settings = _second_stack(tmp_path)
    lines: list[str] = []
    # A stale pidfile from a "crashed" run is cleaned up.
    stale = broker.kafka_paths(settings).pidfile
    stale.parent.mkdir(parents=True)
    stale.write_text("999999\n")
    # A cluster id left by an earlier version that the storage tool would read as an option is replaced.
    broker.kafka_paths(settings).cluster_id.write_text("-x8hRk0cQe2m4oXn1b3vLw\n")
    try:
        status = await manager.up_async(settings, echo=lines.append)
        assert status.up, status.to_dict()
        assert not status.kafka.external
        assert not status.redis.external
        assert status.kafka.address == f"127.0.0.1:{settings.kafka_port}"
        assert any("stale pidfile" in line for line in lines), lines
        assert not broker.kafka_paths(settings).cluster_id.read_text().startswith("-")
        pids = [status.kafka.pid, status.redis.pid]
        assert all(isinstance(p, int) and pid_alive(p) for p in pids)
        assert stack_topics_exist(await describe_topics(settings, [settings.updates_topic]), settings)

        await manager.down_async(settings, echo=lines.append)
        for pid in pids:
            assert pid is not None
            assert not pid_alive(pid)
        assert not find_pids(["kafka.Kafka", broker.process_marker(settings)])
        down = await manager.status_async(settings, timeout_s=1.0)
        assert (down.kafka.up, down.redis.up) == (False, False)
        assert (down.kafka.pid, down.redis.pid) == (None, None)
        await manager.down_async(settings, echo=lines.append)  # down twice: fine

        again = await manager.up_async(settings, echo=lines.append)
        assert again.up
        assert again.kafka.pid not in pids
        # Data survived the restart: the topic is still there.
        assert stack_topics_exist(await describe_topics(settings, [settings.updates_topic]), settings)
    finally:
        await manager.down_async(settings, echo=lines.append)
    final = await manager.status_async(settings, timeout_s=1.0)
    assert (final.kafka.up, final.redis.up) == (False, False)


def stack_topics_exist(found: dict[str, dict[str, object]], settings: PFISettings) -> bool:
    return found.get(settings.updates_topic, {}).get("partitions") == settings.update_partitions


async def test_external_services_are_only_checked(stack: manager.StackStatus, tmp_path: Path) -> None:
    settings = PFISettings(
        home=tmp_path / "ext",
        kafka_bootstrap_servers=stack.kafka.address,
        redis_url=stack.redis.address,
        kafka_credentials_file=PFISettings().kafka_credentials_path,  # the stack's principals
        topic_prefix=f"t-{uuid.uuid4().hex[:8]}",
        update_partitions=1,
    )
    lines: list[str] = []
    status = await manager.up_async(settings, echo=lines.append, topics=False)
    assert status.up
    assert (status.kafka.external, status.redis.external) == (True, True)
    assert (status.kafka.pid, status.redis.pid) == (None, None)
    assert not any("started (pid" in line for line in lines), lines
    assert not broker.kafka_paths(settings).pidfile.exists()
    await manager.down_async(settings, echo=lines.append)  # leaves external services alone
    assert (await manager.status_async(settings)).up


async def test_unreachable_external_kafka_fails_with_clear_error(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    settings = PFISettings(
        home=tmp_path / "ext",
        kafka_bootstrap_servers=f"127.0.0.1:{port}",
        redis_url=PFISettings().redis(),
        kafka_credentials_file=PFISettings().kafka_credentials_path,
    )
    with pytest.raises(StackError, match=f"kafka not healthy after 2s .*external kafka at 127.0.0.1:{port}"):
        await manager.up_async(settings, echo=lambda _line: None, timeout_s=2)
