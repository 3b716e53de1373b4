"""The edge outbox: no update lost or aggregated twice across a broker outage or an agent restart.

Agents upload through the personalization app's ingest route (in-process), which produces to Kafka.
The broker-restart test runs a SECOND local stack (own PFI_HOME under tmp_path, free ports, the jar
cache shared with the main stack) so the shared stack other tests use is never stopped: while its
broker is down the ingest answers 503 and the updates wait in the device's outbox.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from clients.agent import AgentOptions, EdgeAgent, RoundResult
from clients.data import UserData
from clients.enrollment import DeviceIdentity
from clients.http_source import HttpGlobalSource
from clients.outbox import MAGIC, Outbox, OutboxFull, OutboxPublisher
from clients.settings import EdgeSettings
from clients.training import AdapterTrainer, TrainConfig
from clients.uploader import HttpUpdateSender
from modeling.base import TINY_LLAMA, load_base_model
from schemas.frame import decode_frame
from services.federation.admin import federation_status
from services.personalization.harness import BASE_URL, Harness, serving
from services.settings import PFISettings, ServeSettings
from services.stack import manager
from services.stack.processes import free_ports, pid_alive
from services.stack.topics import consumer_limits
from services.store.versions import VersionStore
from services.transport import kafka_kwargs
from tests.support.edge import Devices
from tests.support.federations import new_federation, running_aggregator, tiny_spec, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

CFG = TrainConfig(steps=1, batch_size=2, seq_len=32, seed=0)
FAST_RETRY = EdgeSettings(send_timeout_s=2.0, retry_initial_s=0.2, retry_max_s=1.0)


def user_data(user: str) -> UserData:
    text = "\n\n".join(
        f"{user} says line {i}: the quick brown fox jumps over the lazy dog." for i in range(30)
    )
    return UserData.from_text(user, text)


@pytest.fixture(scope="module")
def trainer() -> AdapterTrainer:
    return AdapterTrainer(load_base_model(TINY_LLAMA), tiny_spec())


async def device(
    h: Harness, trainer: AdapterTrainer, federation: str, user: str, state_dir: Path
) -> DeviceIdentity:
    """An enrolled device of ``federation`` (its credential under ``state_dir``)."""
    return await Devices(h, trainer, state_dir).identity(federation, user, state_dir)


def make_agent(
    h: Harness,
    identity: DeviceIdentity,
    trainer: AdapterTrainer,
    state_dir: Path,
    sender: Any,
    outbox: Outbox | None = None,
    publisher: OutboxPublisher | None = None,
) -> EdgeAgent:
    user = identity.client_id
    return EdgeAgent(
        identity.federation,
        user,
        identity.key,
        HttpGlobalSource(BASE_URL, identity.token, client=h.client),
        trainer,
        outbox if outbox is not None else Outbox(state_dir / user / "outbox"),
        sender,
        state_dir,
        AgentOptions(),
        edge_settings=FAST_RETRY,
        publisher=publisher,
    )


def online_sender(h: Harness, identity: DeviceIdentity) -> HttpUpdateSender:
    return HttpUpdateSender(BASE_URL, identity.token, refresh=identity.refresh, client=h.client)


def offline_sender(identity: DeviceIdentity) -> HttpUpdateSender:
    """A sender whose service does not answer (a closed port): every send fails, retryably."""
    (port,) = free_ports(1)
    return HttpUpdateSender(f"http://127.0.0.1:{port}", identity.token, timeout_s=2.0)


async def updates_on_topic(settings: PFISettings, expect: int, timeout_s: float = 30.0) -> Counter[str]:
    """How often each update id is on the updates topic (whole frames; these updates are small)."""
    consumer = AIOKafkaConsumer(
        settings.updates_topic,
        **kafka_kwargs(settings, "admin"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **consumer_limits(settings),
    )
    await consumer.start()
    seen: Counter[str] = Counter()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        settle: float | None = None
        while loop.time() < (settle if settle is not None else deadline):
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    seen[decode_frame(record.value, max_frame_bytes=1 << 24).data.update_id] += 1
            if settle is None and sum(seen.values()) >= expect:
                settle = loop.time() + 1.0  # read a little longer: copies would show up here
    finally:
        await consumer.stop()
    return seen


# ------------------------------------------------------------------------------ broker restart


@pytest.fixture
async def second_stack(tmp_path: Path) -> AsyncIterator[PFISettings]:
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
        topic_prefix="edge-outbox",
    )
    shared = PFISettings().cache_dir  # reuse the jar cache: no second download
    settings.home.mkdir(parents=True)
    if shared.is_dir():
        settings.cache_dir.symlink_to(shared, target_is_directory=True)
    lines: list[str] = []
    try:
        status = await manager.up_async(settings, echo=lines.append)
        assert status.up, (status.to_dict(), lines)
        yield settings
    finally:
        await manager.down_async(settings, echo=lines.append)


async def kill_broker(settings: PFISettings) -> None:
    status = await manager.status_async(settings, timeout_s=2.0)
    pid = status.kafka.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # a crash, not a clean shutdown (the broker runs in its own session)

    async def gone() -> bool:
        return not pid_alive(pid)

    await wait_for(gone, timeout=20, interval=0.1)


async def test_outbox_survives_a_broker_restart_during_publishing(
    second_stack: PFISettings, trainer: AdapterTrainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = second_stack
    redis = Redis.from_url(settings.redis())
    monkeypatch.setenv("PFI_INGEST_PRODUCE_TIMEOUT_S", "1.5")
    h_context = serving(settings, ServeSettings())
    h = await h_context.__aenter__()
    try:
        store = VersionStore(redis)
        spec = await new_federation(store, buffer_size=3, flush_timeout_s=1.0)
        users = ["amy", "ben"]
        state_dir = tmp_path / "edge"
        outbox = Outbox(state_dir / "outbox")
        identities = {user: await device(h, trainer, spec.name, user, state_dir) for user in users}
        # Two agents, one outbox: one shared publisher serializes the drains (one sender per device
        # would be the real thing; the ingest only checks that each message is its token's client's).
        senders = {user: online_sender(h, identities[user]) for user in users}

        class PerClient:
            async def send_raw(self, federation: str, messages: list[bytes]) -> int:
                head = decode_frame(messages[0], max_frame_bytes=1 << 24).data
                return await senders[head.client_id].send_raw(federation, messages)

        publisher = OutboxPublisher(
            outbox, PerClient(), send_timeout_s=4.0, retry_initial_s=0.2, retry_max_s=1.0
        )
        agents = {
            user: make_agent(h, identities[user], trainer, state_dir, PerClient(), outbox, publisher)
            for user in users
        }

        published_before_outage = asyncio.Event()
        broker_back = asyncio.Event()
        results: list[RoundResult] = []

        async def publish_loop() -> None:
            # Rounds go on through the outage and until a few rounds after the broker is back.
            after_restart = 0
            while after_restart < 4 and len(results) < 60:
                user = users[len(results) % len(users)]
                results.append(await agents[user].run_round(user_data(user), CFG))
                if len(results) == 3:
                    published_before_outage.set()
                if broker_back.is_set():
                    after_restart += 1
                await asyncio.sleep(0.2)

        async def outage() -> None:
            await published_before_outage.wait()
            await kill_broker(settings)
            await asyncio.sleep(3.0)  # several rounds are produced into the void meanwhile
            status = await manager.up_async(settings, echo=lambda _line: None, topics=False)
            assert status.kafka.up
            broker_back.set()

        await asyncio.gather(publish_loop(), outage())
        rounds = len(results)
        assert all(r.published for r in results[:3])
        assert any(not r.published for r in results), "no round saw the outage"
        assert results[-1].published, "the rounds after the restart did not drain the outbox"
        assert results[-1].queued == 0
        leftover = await publisher.flush(60)
        assert leftover.remaining == 0, leftover
        assert len(outbox) == 0
        ids = [r.update_id for r in results]
        assert len(set(ids)) == rounds

        on_topic = await updates_on_topic(settings, rounds)
        assert set(on_topic) == set(ids)  # nothing lost (copies, if any, are the aggregator's to drop)

        async with running_aggregator(settings):

            async def all_aggregated() -> bool:
                status = await federation_status(store, spec.name)
                return int(status["updates_aggregated_total"]) >= rounds

            await wait_for(all_aggregated, timeout=60)
            await asyncio.sleep(1.5)  # a duplicate would be aggregated by now
            status = await federation_status(store, spec.name)
        aggregated = [uid for version in status["versions"] for uid in version["update_ids"]]
        for version in status["versions"]:
            assert len(version["update_ids"]) == len(set(version["update_ids"]))
        assert sorted(aggregated) == sorted(ids)  # every update exactly once
        assert status["updates_aggregated_total"] == rounds
        rejected = status["updates_rejected_total"]
        assert rejected["total"] == rejected.get("duplicate", 0), rejected
    finally:
        await h_context.__aexit__(None, None, None)
        await redis.aclose()


# ------------------------------------------------------------------------------ agent restart


@pytest.fixture
async def h(pfi_settings: PFISettings) -> AsyncIterator[Harness]:
    async with serving(pfi_settings, ServeSettings()) as harness:
        yield harness


async def test_agent_restart_with_a_non_empty_outbox_sends_the_leftovers_once(
    pfi_settings: PFISettings, redis_client: Redis, h: Harness, trainer: AdapterTrainer, tmp_path: Path
) -> None:
    spec = await new_federation(VersionStore(redis_client))
    state_dir = tmp_path / "edge"
    identity = await device(h, trainer, spec.name, "fay", state_dir)
    offline = offline_sender(identity)
    agent = make_agent(h, identity, trainer, state_dir, offline)
    try:
        queued = [await agent.run_round(user_data("fay"), CFG) for _ in range(3)]
    finally:
        await offline.close()
    assert [r.published for r in queued] == [False, False, False]
    assert queued[-1].queued == 3
    assert queued[0].send_error is not None

    # "Restart": new identity from the stored credential, new sender, new Outbox on the same directory.
    identity = await device(h, trainer, spec.name, "fay", state_dir)
    restarted = make_agent(h, identity, trainer, state_dir, online_sender(h, identity))
    assert len(restarted.outbox) == 3
    fresh = await restarted.run_round(user_data("fay"), CFG)  # drains the leftovers first, in order
    assert fresh.published
    assert fresh.queued == 0
    again = await restarted.flush(5)
    assert (again.sent, again.remaining) == (0, 0)
    on_topic = await updates_on_topic(pfi_settings, 4)
    assert on_topic == Counter({r.update_id: 1 for r in [*queued, fresh]})


async def test_a_bounded_outbox_raises_outbox_full(
    redis_client: Redis, h: Harness, trainer: AdapterTrainer, tmp_path: Path
) -> None:
    spec = await new_federation(VersionStore(redis_client))
    state_dir = tmp_path / "edge"
    identity = await device(h, trainer, spec.name, "gus", state_dir)
    offline = offline_sender(identity)
    outbox = Outbox(state_dir / "gus" / "outbox", max_items=2)
    agent = make_agent(h, identity, trainer, state_dir, offline, outbox)
    try:
        for _ in range(2):
            assert not (await agent.run_round(user_data("gus"), CFG)).published
        with pytest.raises(OutboxFull, match=r"outbox .* is full"):
            await agent.run_round(user_data("gus"), CFG)
    finally:
        await offline.close()
    assert len(outbox) == 2
    small = Outbox(tmp_path / "small", max_bytes=len(MAGIC) + 64)
    with pytest.raises(OutboxFull):
        small.put("u-1", spec.name, [b"x" * 100])


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []

    async def send_raw(self, federation: str, messages: list[bytes]) -> int:
        self.sent.append((federation, messages))
        return len(messages)


async def test_corrupt_outbox_files_are_moved_aside(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    outbox = Outbox(directory)
    good = outbox.put("u-good", "fed", [b"frame-1", b"frame-2"])
    truncated = outbox.put("u-cut", "fed", [b"x" * 1000])
    truncated.path.write_bytes(truncated.path.read_bytes()[:-10])  # valid header, body cut short
    (directory / "00000000000000000000-garbage.obx").write_bytes(b"not an outbox file at all")
    (directory / "half-written.tmp").write_bytes(MAGIC)  # a crash mid-write: never renamed

    reopened = Outbox(directory)  # an agent restart
    assert not (directory / "half-written.tmp").exists()
    pending = reopened.pending()
    assert [p.update_id for p in pending] == ["u-good", "u-cut"]
    assert (directory / "corrupt" / "00000000000000000000-garbage.obx").exists()

    sender = RecordingSender()
    result = await OutboxPublisher(reopened, sender).drain()
    assert (result.sent, result.remaining, result.error) == (1, 0, None)
    assert sender.sent == [("fed", [b"frame-1", b"frame-2"])]
    assert not good.path.exists()
    assert (directory / "corrupt" / truncated.path.name).exists()
    assert len(reopened) == 0


def test_files_sent_while_listing_are_skipped_not_errors(tmp_path: Path) -> None:
    """put() and pending() run beside a drain that removes sent files: a file listed by glob may be gone
    by the time it is opened or stat'ed (one spurious FileNotFoundError in 1000 rounds of a fleet)."""
    outbox = Outbox(tmp_path / "outbox")
    kept = outbox.put("u-kept", "fed", [b"frame"])
    ghost = tmp_path / "outbox" / "00000000000000000001-u-ghost.obx"  # listed, then removed

    class Listing:
        def __init__(self, real: Path) -> None:
            self.real = real

        def glob(self, pattern: str) -> list[Path]:
            return [ghost, *self.real.glob(pattern)]

        def __truediv__(self, other: str) -> Path:
            return self.real / other

        def __fspath__(self) -> str:
            return str(self.real)

    outbox.directory = Listing(outbox.directory)  # type: ignore[assignment]
    assert outbox.size_bytes() == kept.size
    assert [item.update_id for item in outbox.pending()] == ["u-kept"]
    assert not (tmp_path / "outbox" / "corrupt" / ghost.name).exists()  # not mistaken for corrupt
    outbox.put("u-next", "fed", [b"frame"])  # the bound check stat()s every listed file
