"""Partitions (and with them federations) move between ``pfi aggregator`` processes of one consumer group.

While clients stream updates to four federations spread over the three partitions of the updates topic:
A runs alone; B joins (A's partitions are revoked mid-stream, A keeps some, B takes the rest); A is
stopped with SIGTERM (its partitions move to B); C joins B; B is stopped. Every move drops in-memory
buffers that the new owner must replay from Redis offsets. At the end every federation advanced, every
update is in exactly one version, counts match, nothing was rejected or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.federation.admin import create_federation
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.store.versions import VersionStore
from tests.support.federations import global_state, new_client, tiny_spec
from tests.support.processes import (
    AggregatorProcess,
    Audit,
    Timeline,
    UpdateStream,
    aggregator_fleet,
    audit_federation,
    dead_letter_records,
    names_on_partitions,
    partition_of,
    wait_aggregated,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEED = 7
CHUNK_BYTES = 4096
CLIENTS_PER_FEDERATION = 2
UPDATES_PER_CLIENT = 8
GAP_S = (1.0, 5.0)
ASSIGNED = "pfi_aggregator_assigned_partitions"


def owned(processes: list[AggregatorProcess]) -> dict[str, list[int]]:
    return {p.name: p.assignments()[-1] if p.assignments() else [] for p in processes}


async def test_rebalances_move_federations_without_loss_or_double_counting(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    settings = pfi_settings.model_copy(update={"chunk_bytes": CHUNK_BYTES})
    partitions = settings.update_partitions
    assert partitions >= 3
    store = VersionStore(redis_client)
    # One federation per partition, and a second one on partition 0 (two federations move together).
    names = names_on_partitions([*range(partitions), 0], partitions)
    assert {partition_of(n, partitions) for n in names} == set(range(partitions))
    specs = [tiny_spec(n, buffer_size=3, flush_timeout_s=1.0, max_staleness=64) for n in names]
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
        producing: asyncio.Task[None] | None = None
        try:
            a = fleet.start("A")
            note(f"A owns {await a.wait_partitions(partitions)}")
            producing = asyncio.create_task(stream.run(UPDATES_PER_CLIENT, GAP_S))
            await asyncio.sleep(3)

            b = fleet.start("B")  # A's partitions are revoked mid-stream and split between A and B
            await b.wait_assigned(timeout=60)
            await a.wait_assigned(timeout=60, after=1)
            split = owned([a, b])
            note(f"B joined ({stream.total} sent): {split}")
            assert sorted(split["A"] + split["B"]) == list(range(partitions)), split
            assert split["A"], split
            assert split["B"], split
            metrics = {p.name: p.metrics()[ASSIGNED] for p in (a, b)}
            assert metrics == {"A": len(split["A"]), "B": len(split["B"])}
            await asyncio.sleep(4)

            assert await a.terminate() == 0  # SIGTERM: A commits its progress and leaves the group
            note(f"A stopped ({stream.total} sent); B owns {await b.wait_partitions(partitions)}")
            assert b.metrics()[ASSIGNED] == partitions
            await asyncio.sleep(3)

            c = fleet.start("C")
            await c.wait_assigned(timeout=60)
            await b.wait_partitions(partitions - len(c.assignments()[-1]))
            note(f"C joined ({stream.total} sent): {owned([b, c])}")
            await asyncio.sleep(3)

            assert await b.terminate() == 0
            note(f"B stopped ({stream.total} sent); C owns {await c.wait_partitions(partitions)}")

            await asyncio.wait_for(producing, 120)
            note(f"stream done: {stream.total} updates in {stream.messages} messages")
            drained = await wait_aggregated(store, stream.sent, timeout=90)
            await asyncio.sleep(1.5)  # a few more progress intervals: nothing else may appear
            final_metrics = c.metrics()
            note(f"drained={drained}; C exits with {await c.terminate()}")
            audits = [await audit_federation(store, s.name, stream.sent.get(s.name, [])) for s in specs]
            dead = await dead_letter_records(settings)
        finally:
            if producing is not None and not producing.done():
                producing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producing
            print(note)
            for audit in audits:
                print(
                    f"{audit.name} (partition {partition_of(audit.name, partitions)}): v{audit.versions}, "
                    f"problems: {audit.problems or 'none'}"
                )

    assert stream.total == len(clients) * UPDATES_PER_CLIENT
    assert stream.multi_chunk > 0
    assert [a.problems for a in audits] == [[] for _ in audits]
    assert all(a.versions >= 2 for a in audits), [a.versions for a in audits]
    assert dead == [], f"{len(dead)} dead letter(s) for valid updates: {dead[:5]}"
    assert final_metrics[ASSIGNED] == partitions
    # Each process aggregated something while it owned partitions (the moves happened mid-stream).
    for process in fleet.processes:
        assert " <- " in process.log_text(), f"{process.name} committed no version"
