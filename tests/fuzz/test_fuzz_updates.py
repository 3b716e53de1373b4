"""Fuzz the aggregator with >= 1000 generated bad updates (raw bytes and through the SDK), end to end.

One federation (robust median, ``norm_policy="reject"``, K=4, max_staleness=3) on the real local stack;
an in-process aggregator whose task is watched (an unhandled exception ends it: a crash). The stream of
:mod:`tests.fuzz.cases` interleaves valid updates with every kind of bad input, in order on the
federation's partition (plus a few keyed elsewhere), then this test checks:

* no crash: the aggregator task is still running, ``/healthz`` answers 200 and ``ready()`` is ok;
* every bad raw message that must be refused has exactly one dead letter with the expected reason at its
  partition/offset, every bad SDK update its dead letters (by update id), and there is no other dead
  letter at all (nothing valid refused, nothing refused twice);
* every valid update is in exactly one version, and nothing else is;
* the rejection counters add up, per reason, to the dead letters; accepted == valid;
* every input the SDK refuses before sending raises its typed error.

``PFI_FUZZ_SEED`` picks another stream (default 20240611); ``PFI_FUZZ_SCALE`` multiplies the case counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from schemas.errors import RejectReason
from services.aggregator.service import Aggregator
from services.federation.admin import federation_status
from services.identity import ClientRegistry
from services.ingest.producer import UpdateProducer
from services.settings import AggregatorSettings, PFISettings
from services.store.versions import VersionStore
from tests.fuzz.cases import RAW, RAW_MIX, SDK, SDK_MIX, CaseGenerator, Limits, Party, summary
from tests.support.federations import dead_letters, global_state, new_federation, shapes_of, wait_version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SEED = int(os.environ.get("PFI_FUZZ_SEED", "20240611"))
SCALE = float(os.environ.get("PFI_FUZZ_SCALE", "1"))
K = 4
VALID = 60
REJECTED = "pfi_aggregator_updates_rejected_total"


@contextlib.asynccontextmanager
async def watched_aggregator(settings: PFISettings) -> AsyncIterator[tuple[Aggregator, asyncio.Task[None]]]:
    """An in-process aggregator and its task (a crash ends the task: the test checks it is still running)."""
    agg_settings = AggregatorSettings(
        group_id=f"pfi-aggregator-{settings.topic_prefix}", port=0, progress_interval_s=0.5
    )
    aggregator = Aggregator(settings, agg_settings, CollectorRegistry())
    task = asyncio.create_task(aggregator.run())
    try:
        await asyncio.wait_for(aggregator.started.wait(), 60)
        yield aggregator, task
    finally:
        aggregator.stopping.set()
        await asyncio.wait_for(task, 60)


def metric_by_reason(aggregator: Aggregator, name: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for family in aggregator.registry.collect():
        for s in family.samples:
            if s.name == name:
                out[s.labels["reason"]] += int(s.value)
    return out


async def test_fuzz_bad_updates(pfi_settings: PFISettings, redis_client: Redis) -> None:
    started = time.monotonic()
    settings = pfi_settings.model_copy(
        update={
            "max_update_bytes": 48 * 1024,
            "max_decoded_bytes": 64 * 1024,
            "chunk_ttl_s": 2.0,
            # The fuzz checks each chunk's own reason; quotas have their own tests
            # (tests/integration/test_aggregator_untrusted.py): one client here holds many uploads.
            "chunk_uploads_per_client": 100_000,
            "chunk_client_bytes": 1 << 30,
        }
    )
    sdk_settings = settings.model_copy(update={"chunk_bytes": 4096})
    store = VersionStore(redis_client)
    spec = await new_federation(
        store,
        buffer_size=K,
        flush_timeout_s=3600.0,
        max_staleness=3,
        norm_policy="reject",
        max_update_norm=2.0,
        robust="median",
    )
    client_id = f"fz-client-{spec.name}"
    client = Party(client_id, await ClientRegistry(redis_client).register(spec.name, client_id))
    other_id = f"fz-other-{spec.name}"
    other = Party(other_id, await ClientRegistry(redis_client).register(spec.name, other_id))
    shapes = shapes_of(await global_state(store, spec.name, 0))
    gen = CaseGenerator(spec, client, other, shapes, Limits.of(settings, 4096), seed=SEED)
    raw_mix = {c: max(1, round(n * SCALE)) for c, n in RAW_MIX.items()}
    sdk_mix = {c: max(1, round(n * SCALE)) for c, n in SDK_MIX.items()}
    cases = gen.stream(valid=VALID, raw_mix=raw_mix, sdk_mix=sdk_mix)
    refused = gen.refused()
    bad = [c for c in cases if not c.valid]
    valid = [c for c in cases if c.valid]
    assert len(bad) >= 1000 * min(SCALE, 1.0)
    generated_s = time.monotonic() - started

    # -- send everything, in order -----------------------------------------------------------------
    positions: dict[int, list[tuple[int, int]]] = {}  # case index -> where each raw message landed
    signing_keys = {party.client_id: party.key for party in (client, other)}
    async with watched_aggregator(settings) as (agg, task), UpdateProducer(sdk_settings) as producer:
        pending: list[tuple[int, list[Any]]] = []
        for i, case in enumerate(cases):
            if case.path == RAW:
                futures = [
                    await producer.producer.send(settings.updates_topic, m, key=case.key)
                    for m in case.messages
                ]
                pending.append((i, futures))
            else:
                assert case.envelope is not None
                # The SDK signs its chunks with its own key (an unregistered party's key is unknown).
                await producer.send(case.envelope, key=signing_keys.get(case.envelope.data.client_id))
        for i, futures in pending:
            metas = [await f for f in futures]
            positions[i] = [(m.partition, m.offset) for m in metas]
        sent_s = time.monotonic() - started

        expected_total = sum(len(c.expect) for c in bad)
        records = await dead_letters(settings, expected_total, within=90, settle=1.5)
        await wait_version(store, spec.name, VALID // K, within=30)

        # -- no crash -------------------------------------------------------------------------------
        assert not task.done(), task.exception() if task.done() else None
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{agg.health.port}/healthz")
        assert health.status_code == 200
        ok, checks = await agg.ready()
        assert ok, checks

        # -- every bad case: its dead letters, with the expected reasons ----------------------------
        by_position: dict[tuple[int, int], list[Any]] = defaultdict(list)
        by_update: dict[str, list[Any]] = defaultdict(list)
        for rec in records:
            if rec.source_partition is not None and rec.source_offset is not None:
                by_position[(rec.source_partition, rec.source_offset)].append(rec)
        raw_positions = {p for i in positions for p in positions[i]}
        for rec in records:
            if (rec.source_partition, rec.source_offset) not in raw_positions and rec.update_id:
                by_update[rec.update_id].append(rec)
        problems: list[str] = []
        for i, case in enumerate(cases):
            if case.path == RAW:
                got = {j: [r.reason for r in by_position.get(pos, [])] for j, pos in enumerate(positions[i])}
                want: dict[int, list[RejectReason]] = {j: [] for j in range(len(case.messages))}
                for j, reason in case.expect:
                    want[j].append(reason)
                if got != want:
                    details = [r.detail for pos in positions[i] for r in by_position.get(pos, [])]
                    problems.append(f"{case.label}: want {want}, got {got} {details[:2]}")
            else:
                assert case.update_id is not None
                got_sdk = sorted(r.reason for r in by_update.get(case.update_id, []))
                want_sdk = sorted(reason for _, reason in case.expect)
                if case.valid or case.category == "replayed":
                    # The valid original and its replays share an id: compare once per id, below.
                    continue
                if got_sdk != want_sdk:
                    details = [r.detail for r in by_update.get(case.update_id, [])]
                    problems.append(f"{case.label}: want {want_sdk}, got {got_sdk} {details[:2]}")
        # SDK replays (and SDK-sent valid originals): per update id, one DUPLICATE per SDK replay.
        sdk_ids = Counter(c.update_id for c in cases if c.path == SDK and c.category == "replayed")
        for uid, n in sdk_ids.items():
            got_sdk = sorted(r.reason for r in by_update.get(uid, []))
            if got_sdk != [RejectReason.DUPLICATE] * n:
                problems.append(f"replayed/sdk_resend {uid}: want {n} x duplicate, got {got_sdk}")
        sdk_valid_ids = {c.update_id for c in valid if c.path == SDK} - set(sdk_ids)
        for uid in sdk_valid_ids:
            if by_update.get(uid or ""):
                problems.append(f"valid SDK update {uid} was dead-lettered: {by_update[uid or '']}")
        assert len(records) == expected_total, (len(records), expected_total, problems[:20])
        assert not problems, f"{len(problems)} mismatches:\n" + "\n".join(problems[:40])

        # -- valid updates: each aggregated exactly once, nothing else ------------------------------
        status = await federation_status(store, spec.name)
        ids = [u for v in status["versions"] for u in v["update_ids"]]
        assert Counter(ids) == Counter(c.update_id for c in valid)
        assert status["updates_aggregated_total"] == VALID
        assert agg.registry.get_sample_value(
            "pfi_aggregator_updates_accepted_total", {"federation": spec.name}
        ) == float(VALID)

        # -- counters add up -------------------------------------------------------------------------
        assert metric_by_reason(agg, REJECTED) == Counter(str(r.reason.value) for r in records)
        assert not task.done()

    # -- the SDK refuses some bad input itself, with a typed error, before anything is sent --------
    for r in refused:
        with pytest.raises(r.error):
            r.call()

    stats = summary(cases)
    total = time.monotonic() - started
    print(
        f"\nfuzz seed={SEED}: {len(bad)} bad cases ({dict(stats['path'])} incl. {len(valid)} valid), "
        f"{len(refused)} refused by the SDK, {len(records)} dead letters; generate {generated_s:.1f}s, "
        f"send {sent_s - generated_s:.1f}s, total {total:.1f}s"
    )
    print("per category:", dict(sorted(stats["category"].items())))
    print("per reason:", dict(sorted(Counter(r.reason.value for r in records).items())))
