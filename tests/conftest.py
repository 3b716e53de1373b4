"""Shared fixtures: the real local stack (Kafka + Redis) and per-test settings with their own topics.

* ``stack`` (session): ``pfi stack up`` in-process (idempotent; external services when
  ``PFI_KAFKA_BOOTSTRAP_SERVERS`` / ``PFI_REDIS_URL`` are set). Never stopped: reruns stay fast.
* ``kafka_bootstrap`` / ``redis_url`` (session): addresses. Against the local stack, ``redis_url`` is
  database :data:`TEST_REDIS_DB` of the local server, so tests never touch the default database 0.
* ``pfi_settings`` (function): ``PFISettings`` with a unique ``topic_prefix`` (``t-<hex8>``), its three
  topics created (updates: 3 partitions) and deleted after the test, ``redis_url`` = the fixture above.
* ``redis_client`` (function, async): ``redis.asyncio.Redis`` on ``redis_url`` (bytes responses);
  against the local stack the test database is flushed after the test.

Coroutines the fixtures need run on a private thread with their own event loop, so the fixtures work
the same for sync and async tests and never touch pytest-asyncio's loops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from services.settings import PFISettings
from services.stack import manager
from services.stack.topics import delete_topics, ensure_topics

T = TypeVar("T")

#: The local Redis database tests use; ``PFI_TEST_REDIS_DB`` gives parallel sessions separate ones.
TEST_REDIS_DB = int(os.environ.get("PFI_TEST_REDIS_DB", "15"))
TEST_UPDATE_PARTITIONS = 3

log = logging.getLogger("pfi.tests.stack")


def run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh event loop in a worker thread (safe inside running loops)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfi-fixture") as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def stack() -> manager.StackStatus:
    """The stack is up (started if needed, never stopped here)."""
    settings = PFISettings()
    status = run_in_thread(manager.up_async(settings, echo=log.info))
    assert status.up, status.to_dict()
    return status


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: manager.StackStatus) -> str:
    return stack.kafka.address


@pytest.fixture(scope="session")
def redis_url(stack: manager.StackStatus) -> str:
    if stack.redis.external:
        return stack.redis.address
    url = f"redis://127.0.0.1:{PFISettings().redis_port}/{TEST_REDIS_DB}"
    # Emptied once per session, not after each test: tests use unique federation names, client ids and
    # topics, and a per-test FLUSHDB would wipe the keys of another test session running beside this one.
    run_in_thread(_flush(url))
    return url


async def _flush(url: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
def pfi_settings(kafka_bootstrap: str, redis_url: str) -> Iterator[PFISettings]:
    """Settings whose topics (``t-<hex8>.*``) exist for this test only."""
    settings = PFISettings(
        topic_prefix=f"t-{uuid.uuid4().hex[:8]}",
        update_partitions=TEST_UPDATE_PARTITIONS,
        redis_url=redis_url,
    )
    assert settings.kafka_bootstrap() == kafka_bootstrap
    run_in_thread(ensure_topics(settings))
    yield settings
    if not os.environ.get("PFI_TEST_KEEP_TOPICS"):
        names = [settings.updates_topic, settings.dlq_topic, settings.versions_topic, settings.partials_topic]
        try:
            run_in_thread(delete_topics(settings, names))
        except Exception as err:  # cleanup only; never fail a test because of it
            log.warning("could not delete test topics %s: %s", names, err)


@pytest.fixture
async def redis_client(redis_url: str, stack: manager.StackStatus) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
