"""``kill -9`` of the ``pfi aggregator`` process at random points while updates stream in.

Exactly-once (ARCHITECTURE.md, "Aggregation") says a crash replays the disposable buffer and never
double-counts it. Here a real process is SIGKILLed over and over (seeded delays after it got its
partitions: mid-replay, mid-buffer, mid-commit...) while several clients send signed updates (some of
them chunked, chunks of different uploads interleaving on one partition shared by two federations).
At the end one last process drains the topic and the Redis state is audited: every sent update in
exactly one version, counts equal, no rejection, no dead letter, intact blobs, an unbroken parent chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest
from redis.asyncio import Redis

from clients.updates import update_messages
from schemas.events import TensorEncoding
from services.federation.admin import create_federation
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.store.keys import hwm_field
from services.store.versions import VersionStore
from tests.support.federations import global_state, new_client, random_delta, tiny_spec
from tests.support.processes import (
    ENCODINGS,
    Audit,
    Timeline,
    UpdateStream,
    aggregator_fleet,
    audit_federation,
    dead_letter_records,
    names_on_partitions,
    wait_aggregated,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEED = 20261124
TRIALS = 6
CHUNK_BYTES = 4096  # the tiny adapter then travels as 1 to 3 messages depending on its encoding
CLIENTS_PER_FEDERATION = 3
UPDATES_PER_CLIENT = 10
GAP_S = (1.5, 6.0)  # between two updates of one client: the stream lasts about as long as the kills


async def test_kill9_at_random_points_never_loses_or_double_counts(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    settings = pfi_settings.model_copy(update={"chunk_bytes": CHUNK_BYTES})
    store = VersionStore(redis_client)
    shared = rng.randrange(settings.update_partitions)
    specs = [
        tiny_spec(name, buffer_size=3, flush_timeout_s=1.0, max_staleness=64, keep_versions=1000)
        for name in names_on_partitions([shared, shared], settings.update_partitions)
    ]
    for spec in specs:
        await create_federation(store, spec)
    clients = [await new_client(redis_client, spec) for spec in specs for _ in range(CLIENTS_PER_FEDERATION)]
    shapes = {k: tuple(v.shape) for k, v in (await global_state(store, specs[0].name)).items()}
    note = Timeline()
    audits: list[Audit] = []
    async with (
        aggregator_fleet(settings, tmp_path / "logs", max_poll_interval_ms=60_000) as fleet,
        UpdateProducer(settings) as producer,
    ):
        stream = UpdateStream(store, producer, clients, shapes, seed=SEED)
        producing = asyncio.create_task(stream.run(UPDATES_PER_CLIENT, GAP_S))
        try:
            for trial in range(TRIALS):
                process = fleet.start(f"crash-{trial}")
                assigned = await process.wait_assigned(timeout=60)
                delay = rng.uniform(0.5, 3.0)
                note(f"{process.name} pid {process.pid} got {assigned}; kill -9 in {delay:.2f}s")
                await asyncio.sleep(delay)
                process.kill9()
                note(f"{process.name} killed ({stream.total} update(s) sent so far)")
            await asyncio.wait_for(producing, 120)
            note(f"stream done: {stream.total} updates in {stream.messages} messages")

            final = fleet.start("final")
            note(f"final pid {final.pid} got {await final.wait_assigned(timeout=60)}")
            drained = await wait_aggregated(store, stream.sent, timeout=90)
            await asyncio.sleep(1.5)  # a few more progress intervals: nothing else may appear
            metrics = final.metrics()
            note(f"drained={drained}; final exits with {await final.terminate()}")
            audits = [await audit_federation(store, s.name, stream.sent.get(s.name, [])) for s in specs]
            dead = await dead_letter_records(settings)
        finally:
            if not producing.done():
                producing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producing
            print(note)
            for audit in audits:
                print(f"{audit.name}: v{audit.versions}, problems: {audit.problems or 'none'}")

    print("final metrics:", {k: v for k, v in metrics.items() if "assigned" in k or "replayed" in k})
    assert stream.total == len(clients) * UPDATES_PER_CLIENT
    assert stream.multi_chunk >= stream.total // 3, "the stream should include chunked updates"
    assert all(process.exit_signal == "SIGKILL" for process in fleet.processes[:TRIALS])
    assert [a.problems for a in audits] == [[] for _ in audits]
    assert all(a.versions >= 2 for a in audits)
    assert dead == [], f"{len(dead)} dead letter(s) for valid updates: {dead[:5]}"
    assert metrics["pfi_aggregator_assigned_partitions"] == settings.update_partitions


async def test_kill9_replays_interleaved_chunked_uploads_exactly_once(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    """Two crash points chosen on purpose, with chunked uploads interleaved on one partition:

    1. a chunked update X is buffered (its chunks at offsets 0..2) and a progress commit happened: the
       stored ``safe`` offset and the partition watermark must stay at X's *first* chunk, else the
       restarted process re-reads only X's last chunk and X is lost (and its stub expires to the DLQ);
    2. a chunked update P is aggregated while another upload Q is still incomplete (``safe`` stays at
       Q's first chunk, between P's chunks): on replay P's later chunks must be recognized as already
       aggregated, else they sit in the reassembler and expire to the DLQ as CHUNK_EXPIRED.
    """
    ttl = 5.0
    settings = pfi_settings.model_copy(update={"chunk_bytes": CHUNK_BYTES, "chunk_ttl_s": ttl})
    store = VersionStore(redis_client)
    spec = tiny_spec(buffer_size=2, flush_timeout_s=8.0, keep_versions=100)
    await create_federation(store, spec)
    fed = spec.name
    client = await new_client(redis_client, spec)
    shapes = {k: tuple(v.shape) for k, v in (await global_state(store, fed)).items()}
    big, small = ENCODINGS[0], ENCODINGS[3]

    def update(seed: int, encoding: TensorEncoding) -> tuple[str, list[bytes]]:
        envelope = client.update(random_delta(shapes, seed), base_version=0, encoding=encoding)
        messages = update_messages(envelope, settings, key=client.key)
        assert len(messages) == (3 if encoding is big else 1)
        return envelope.data.update_id, messages

    x, y, p, q, r, s = (update(seed, enc) for seed, enc in enumerate([big, small, big, big, small, small]))
    note = Timeline()
    audit: Audit | None = None
    partition: int | None = None

    async def marks() -> dict[str, int]:
        return await _marks(store, fed, settings.updates_topic)

    async def hwm_at_least(offset: int, within: float = 20.0) -> None:
        assert partition is not None
        field = hwm_field(settings.updates_topic, partition)
        deadline = asyncio.get_running_loop().time() + within
        while (await store.get_offsets(fed)).get(field, -1) < offset:
            assert asyncio.get_running_loop().time() < deadline, f"stored hwm never reached {offset}"
            await asyncio.sleep(0.1)

    async def head_at_least(version: int, within: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while ((await store.head(fed)) or 0) < version:
            assert asyncio.get_running_loop().time() < deadline, f"v{version} was never committed"
            await asyncio.sleep(0.1)

    async with (
        aggregator_fleet(settings, tmp_path / "logs", max_poll_interval_ms=60_000) as fleet,
        UpdateProducer(settings) as producer,
    ):

        async def send(message: bytes) -> int:
            nonlocal partition
            meta = await (await producer.producer.send(settings.updates_topic, message, key=fed.encode()))
            assert partition in (None, meta.partition)
            partition = meta.partition
            return int(meta.offset)

        try:
            first = fleet.start("first")
            await first.wait_assigned(timeout=60)
            offsets = [await send(m) for m in x[1]]  # X: 0, 1, 2 -> buffered, not flushed
            await hwm_at_least(offsets[-1] + 1)  # a progress commit has seen X buffered
            await asyncio.sleep(0.5)  # ... and raised the partition watermark (right after it)
            note(f"X at {offsets} buffered and committed as progress; watermarks {await marks()}")
            first.kill9()

            second = fleet.start("second")
            note(f"second got {await second.wait_assigned(timeout=60)}")
            await send(y[1][0])  # Y: fills the buffer with a replayed X
            await head_at_least(1)
            note("v1 committed")
            for message in (p[1][0], q[1][0], p[1][1], p[1][2], r[1][0]):  # P, Q interleaved; P + R: v2
                await send(message)
            await head_at_least(2)
            await hwm_at_least(offsets[-1] + 7)
            note(f"v2 committed with Q's first chunk pending; offsets {await marks()}")
            second.kill9()

            third = fleet.start("third")
            note(f"third got {await third.wait_assigned(timeout=60)}")
            for message in (q[1][1], q[1][2], s[1][0]):  # complete Q (replayed first chunk) + S: v3
                await send(message)
            await head_at_least(3)
            await asyncio.sleep(ttl + 1.5)  # a stub of P would expire by now
            note(f"v3 committed; offsets {await marks()}")
            assert await third.terminate() == 0
            audit = await audit_federation(store, fed, [x[0], y[0], p[0], r[0], q[0], s[0]])
            dead = await dead_letter_records(settings)
        finally:
            print(note)
            if audit is not None:
                print(f"{fed}: v{audit.versions}, problems: {audit.problems or 'none'}")

    assert audit is not None
    assert audit.problems == []
    contents = [set(v["update_ids"]) for v in audit.status["versions"]]
    assert contents == [set(), {x[0], y[0]}, {p[0], r[0]}, {q[0], s[0]}]
    assert dead == [], f"{len(dead)} dead letter(s) for valid updates: {dead}"


async def _marks(store: VersionStore, fed: str, topic: str) -> dict[str, int]:
    """The federation's stored offsets (``safe``/``hwm`` per partition) and the partition watermarks."""
    offsets = {k.removeprefix(f"{topic}:"): v for k, v in (await store.get_offsets(fed)).items()}
    return offsets | {f"W{p}": o for p, o in (await store.get_watermarks(topic)).items()}
