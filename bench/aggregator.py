"""``pfi bench aggregator``: aggregator throughput vs a raw Kafka consumer, and our fold vs Flower's FedAvg.

Per update size (default 64 KiB, 4 MiB and 32 MiB of fp32 LoRA tensors, see
:mod:`bench.aggregator_data`; 4 and 32 MiB travel chunked with the default 1 MiB ``chunk_bytes``), on
the real local Kafka and Redis, with this run's own topics (``bench-agg-<hex>-<size>.*``, one
partition) and federation (``bench-agg-<hex>-<size>``), all removed afterwards:

1. M signed updates are produced through the ingest's producer
   (:class:`services.ingest.producer.UpdateProducer`) into the size's updates topic: a backlog, so that
   production is not timed.
2. **raw consumer**: a plain ``AIOKafkaConsumer`` with the aggregator's client limits
   (``consumer_limits``, ``max_poll_records``, ``poll_timeout_ms``) reads the same messages and only
   counts their bytes. Time: from the moment its partition is positioned to the last message.
3. **aggregator**: the real :class:`services.aggregator.service.Aggregator`, **in process** (its own
   event loop task and worker threads, as ``pfi aggregator`` runs it), consumes the backlog: frame
   decoding, reassembly and checksums, signature, decoding, validation, FedBuff buffering (K = 10, see
   below), the fold, the version blob and the exactly-once Redis commit. Time: from its partition assignment
   (seek to the Redis watermarks) to the commit of the version holding the last update. Then the
   federation's status must show every produced update aggregated exactly once (count, distinct ids,
   no rejection).

``vs_raw_consumer_<size>`` = aggregator updates/s ÷ raw consumer updates/s (same messages; goal >= 0.8).
**``vs_raw_consumer`` is the minimum over the sizes** (the worst case; the goal must hold at every size).

**``vs_flower``** compares the aggregation itself, "fold only" (see :mod:`bench.aggregator_fold`): our
FedBuff fold on decoded tensors vs ``flwr.server.strategy.aggregate.aggregate`` on the same arrays,
Flower time ÷ our time, **minimum over the sizes** (goal >= 3). Why fold-only is the headline: the issue
asks about Flower's aggregation *function*, and that is the only step both systems define the same way;
the path from wire bytes is already measured end to end by ``vs_raw_consumer``, and Flower's wire format
(``np.save`` per array) is not ours. The from-wire comparison (our decode + fold vs Flower's
``parameters_to_ndarrays`` + aggregate) is reported as ``vs_flower_from_wire`` (also the minimum over
sizes), and our full validation + fold against the same Flower figure as ``vs_flower_validated``.

**K = 10** (``--buffer-size``) is FedBuff's default (Nguyen et al., 2022: K = 10 of 1000 concurrent
clients). Per version the aggregator folds, encodes the zstd blob, runs the Lua commit and announces the
version: about 3 ms at 64 KiB on 2 busy cores, against about 0.5 ms of per-update work. With K = 4
that commit was over half of the 64 KiB figure, which then measured the commit cadence of a small
buffer more than the update path; K = 10 charges it as a real FedBuff deployment would. M is a
multiple of K, and the federation's ``max_staleness`` is raised to M/K when larger (every bench update
is based on v0: none may be refused as too stale). ``--buffer-size 4`` reproduces the earlier runs.

A per-stage breakdown of one update of each size (and, with ``--profile``, a cProfile of the CPU path)
shows where the aggregator's time goes. ``--quick`` uses small M (the whole run takes well under a
minute on 2 cores). Results: ``bench/results/aggregator.json`` (``--out``), with a ``ratios`` object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from bench.aggregator_data import ENCODING, SizePoint, parse_size, random_delta, size_point
from bench.common import MIB, BenchError, ratio_lines, result_path, say, write_result
from clients.updates import build_update, update_messages
from schemas.events import AdapterUpdate, Envelope, FederationSpec
from schemas.signing import StaticKeyStore, derive_client_key
from services.aggregator.runtime import FederationRuntime, Position
from services.aggregator.service import Aggregator, cpu_pool
from services.federation.admin import commit_state, federation_status
from services.identity import ClientRegistry
from services.ingest.producer import UpdateProducer
from services.settings import AggregatorSettings, PFISettings
from services.stack.topics import consumer_limits, delete_topics, ensure_topics
from services.store import keys as store_keys
from services.store.versions import VersionStore
from services.transport import kafka_kwargs

NAME = "aggregator"
GOALS = {"vs_raw_consumer": ">= 0.8", "vs_flower": ">= 3"}
DEFAULT_SIZES = "64K,4M,32M"
DEFAULT_UPDATES = "160,40,20"
QUICK_UPDATES = "40,10,10"
CLIENTS = 8
BUFFER_SIZE = 10  # FedBuff's default K (see the module docstring)


class _TimedAggregator(Aggregator):
    """The service, unchanged, plus two timestamps: partition assignment and the last version commit."""

    assigned_at: float | None = None
    last_flush_at: float | None = None

    async def seek_to_watermarks(self, assigned: list[TopicPartition]) -> None:
        # Stamped before the seek's awaits: on a fresh broker the poll task can fetch and handle the
        # whole (small) backlog while they run (a CI run measured the last commit before the stamp).
        if assigned and self.assigned_at is None:
            self.assigned_at = time.perf_counter()
        await super().seek_to_watermarks(assigned)

    async def flush(self, runtime: FederationRuntime, handled: Position | None = None) -> None:
        await super().flush(runtime, handled)
        self.last_flush_at = time.perf_counter()


def _settings(base: PFISettings, point: SizePoint, chunk_bytes: int | None) -> PFISettings:
    frame_cap = max(base.max_update_bytes, 2 * point.payload_bytes)  # room for the frame header
    update: dict[str, Any] = {
        "topic_prefix": point.federation,
        "update_partitions": 1,
        "max_update_bytes": frame_cap,
        "max_decoded_bytes": max(base.max_decoded_bytes, 2 * frame_cap),
        "max_inflight_chunk_bytes": max(base.max_inflight_chunk_bytes, 4 * frame_cap),
    }
    if chunk_bytes is not None:
        update["chunk_bytes"] = chunk_bytes
    return base.model_copy(update=update)


async def _setup(settings: PFISettings, point: SizePoint, spec: FederationSpec, master: bytes) -> None:
    from modeling.lora import StateDict
    from services.aggregator.runtime import empty_like

    await ensure_topics(settings)
    redis = Redis.from_url(settings.redis())
    try:
        store = VersionStore(redis)
        if not await store.put_spec(spec):
            raise BenchError(f"federation {spec.name!r} exists already")
        zeros: StateDict = empty_like(random_delta(point.shapes, 0, 0.0))
        await commit_state(store, spec, zeros)  # v0: a zero adapter of the point's shapes
        fleet = {f"bench-c{i}": derive_client_key(master, f"bench-c{i}") for i in range(CLIENTS)}
        await ClientRegistry(redis).register_many(spec.name, fleet, via="bench")  # as an operator would
    finally:
        await redis.aclose()


async def _teardown(settings: PFISettings, point: SizePoint) -> None:
    redis = Redis.from_url(settings.redis())
    try:
        doomed = [key async for key in redis.scan_iter(match=store_keys.prefix(point.federation) + "*")]
        await redis.delete(*doomed)
        await redis.srem(store_keys.FEDERATIONS, point.federation)
    finally:
        await redis.aclose()
    await delete_topics(settings, [settings.updates_topic, settings.dlq_topic, settings.versions_topic])


async def _produce(
    settings: PFISettings, point: SizePoint, spec: FederationSpec, master: bytes, keep: int
) -> tuple[list[str], list[Envelope[AdapterUpdate]], list[bytes], int]:
    """Produce ``point.updates`` signed updates; returns their ids, the first ``keep`` envelopes, the
    messages of the first one, and the message count."""
    ids: list[str] = []
    kept: list[Envelope[AdapterUpdate]] = []
    first: list[bytes] = []
    count = 0

    def build(i: int) -> tuple[Envelope[AdapterUpdate], list[bytes]]:
        client = f"bench-c{i % CLIENTS}"
        envelope = build_update(
            federation=point.federation,
            client_id=client,
            spec_fingerprint=spec.fingerprint(),
            base_version=0,
            num_samples=8 + i % 5,
            delta=random_delta(point.shapes, seed=i + 1),
            key=derive_client_key(master, client),
            encoding=ENCODING,
            update_id=f"{point.federation}-u{i:05d}",
        )
        return envelope, update_messages(envelope, settings, key=derive_client_key(master, client))

    async with UpdateProducer(settings, client_id=f"{point.federation}-producer") as producer:
        pending = asyncio.create_task(asyncio.to_thread(build, 0))
        for i in range(point.updates):
            envelope, messages = await pending
            if i + 1 < point.updates:  # build the next update while this one is being sent
                pending = asyncio.create_task(asyncio.to_thread(build, i + 1))
            count += await producer.send_raw(point.federation, messages)
            ids.append(envelope.data.update_id)
            if i < keep:
                kept.append(envelope)
            if i == 0:
                first = messages
    return ids, kept, first, count


async def _raw_consume(settings: PFISettings, agg: AggregatorSettings, expect: int) -> dict[str, Any]:
    tp = TopicPartition(settings.updates_topic, 0)
    consumer = AIOKafkaConsumer(
        **kafka_kwargs(settings, "admin"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=agg.max_poll_records,
        **consumer_limits(settings),
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        if end < expect:
            raise BenchError(f"{settings.updates_topic} holds {end} messages, {expect} produced")
        messages = nbytes = 0
        started = time.perf_counter()
        while messages < end:
            batch = await consumer.getmany(tp, timeout_ms=agg.poll_timeout_ms)
            for record in batch.get(tp, []):
                messages += 1
                nbytes += len(record.value or b"")
        seconds = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {"seconds": seconds, "messages": messages, "bytes": nbytes}


async def _aggregate(
    settings: PFISettings, agg: AggregatorSettings, point: SizePoint, ids: list[str], timeout_s: float
) -> dict[str, Any]:
    aggregator = _TimedAggregator(settings, agg, CollectorRegistry())
    task = asyncio.create_task(aggregator.run())
    status: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            await asyncio.sleep(0.05)
            if task.done():
                task.result()  # raises what stopped it
                raise BenchError("the aggregator stopped early")
            stats = await aggregator.store.get_stats(point.federation)
            if stats.get("aggregated_total", 0) >= len(ids) or stats.get("rejected_total", 0) > 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{point.label}: not every update aggregated within {timeout_s:.0f}s ({stats})"
                )
        status = await federation_status(aggregator.store, point.federation)
    finally:
        aggregator.stopping.set()
        await asyncio.wait_for(task, 120)
    if aggregator.assigned_at is None or aggregator.last_flush_at is None:
        raise BenchError(f"{point.label}: the aggregator never got its partition or never committed")
    seconds = aggregator.last_flush_at - aggregator.assigned_at
    if seconds <= 0:
        raise BenchError(f"{point.label}: the last version was committed before the partition was assigned")
    aggregated = [u for v in status["versions"] for u in v["update_ids"]]
    checks = {
        "aggregated_total": status["updates_aggregated_total"],
        "rejected_total": status["updates_rejected_total"].get("total", 0),
        "versions": status["head"],
        "distinct_ids": len(set(aggregated)),
        "exactly_once": status["updates_aggregated_total"] == len(ids)
        and sorted(aggregated) == sorted(ids)
        and status["updates_rejected_total"].get("total", 0) == 0,
    }
    return {"seconds": seconds, **checks}


async def _run_point(
    base: PFISettings, point: SizePoint, args: argparse.Namespace, pool: ThreadPoolExecutor
) -> dict[str, Any]:
    from bench.aggregator_fold import flower_comparison, stage_times

    master = secrets.token_bytes(32)
    settings = _settings(base, point, args.chunk_bytes)
    spec = point.spec(args.buffer_size)
    agg = AggregatorSettings(group_id=f"pfi-aggregator-{point.federation}", port=0)
    keys = StaticKeyStore({f"bench-c{i}": derive_client_key(master, f"bench-c{i}") for i in range(CLIENTS)})
    row: dict[str, Any] = {
        "size": point.label,
        "size_bytes": point.payload_bytes,
        "updates": point.updates,
        "federation": point.federation,
    }
    await _setup(settings, point, spec, master)
    try:
        say(f"aggregator bench: {point.label}: producing {point.updates} updates ...")
        keep = min(point.updates, args.fold_updates)
        ids, kept, first, count = await _produce(settings, point, spec, master, keep)
        row["messages"] = count
        row["messages_per_update"] = count / point.updates
        say(f"aggregator bench: {point.label}: raw consumer over {count} messages ...")
        raw = await _raw_consume(settings, agg, count)
        say(f"aggregator bench: {point.label}: aggregator ...")
        ours = await _aggregate(settings, agg, point, ids, args.timeout)
        row["raw"] = {**raw, "updates_per_s": point.updates / raw["seconds"]}
        row["aggregator"] = {**ours, "updates_per_s": point.updates / ours["seconds"]}
        for side in ("raw", "aggregator"):
            row[side]["mib_per_s"] = row[side]["updates_per_s"] * point.payload_bytes / MIB
        row["vs_raw_consumer"] = row["aggregator"]["updates_per_s"] / row["raw"]["updates_per_s"]
        say(f"aggregator bench: {point.label}: fold vs Flower on {len(kept)} updates ...")
        row["flower"] = await asyncio.to_thread(
            flower_comparison, point, spec, kept, keys, settings, pool, args.repeats
        )
        row["stages"] = await asyncio.to_thread(
            stage_times, point, spec, kept[0], first, keys, settings, pool, args.repeats,
            args.buffer_size, args.profile,
        )  # fmt: skip
    finally:
        await _teardown(settings, point)
    return row


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    base = PFISettings()
    tag = uuid.uuid4().hex[:6]
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in (args.updates or (QUICK_UPDATES if args.quick else DEFAULT_UPDATES)).split(",")]
    if len(counts) == 1:
        counts *= len(sizes)
    if len(counts) != len(sizes):
        raise BenchError(f"--updates gives {len(counts)} counts for {len(sizes)} sizes")
    if any(n < 1 or n % args.buffer_size for n in counts):
        raise BenchError(
            f"update counts {counts} must be positive multiples of --buffer-size {args.buffer_size}"
        )
    points = [size_point(size, n, tag) for size, n in zip(sizes, counts, strict=True)]
    pool = _cpu_pool()
    try:
        rows = [await _run_point(base, point, args, pool) for point in points]
    finally:
        pool.shutdown()
    ratios: dict[str, float] = {
        "vs_raw_consumer": min(r["vs_raw_consumer"] for r in rows),
        "vs_flower": min(r["flower"]["vs_flower_fold"] for r in rows),
        "vs_flower_from_wire": min(r["flower"]["vs_flower_wire"] for r in rows),
        "vs_flower_validated": min(r["flower"]["vs_flower_validated"] for r in rows),
    }
    for r in rows:
        ratios[f"vs_raw_consumer_{r['size']}"] = r["vs_raw_consumer"]
        ratios[f"vs_flower_{r['size']}"] = r["flower"]["vs_flower_fold"]
        ratios[f"vs_flower_from_wire_{r['size']}"] = r["flower"]["vs_flower_wire"]
    return {
        "benchmark": NAME,
        "definitions": {
            "vs_raw_consumer": "min over sizes of aggregator updates/s / raw aiokafka consumer updates/s",
            "vs_flower": "min over sizes of flwr aggregate() time / our FedBuff fold time (decoded tensors)",
            "vs_flower_from_wire": "min over sizes of (flwr parameters_to_ndarrays + aggregate) / "
            "(our decode_tensors + fold)",
            "vs_flower_validated": "as from_wire, ours with full validate_update (signature, checks)",
        },
        "config": {
            "mode": "in-process Aggregator",
            "quick": args.quick,
            "buffer_size": args.buffer_size,
            "fold_updates": args.fold_updates,
            "repeats": args.repeats,
            "chunk_bytes": args.chunk_bytes or base.chunk_bytes,
            "encoding": ENCODING.model_dump(),
            "clients": CLIENTS,
            "cpus": os.cpu_count(),
        },
        "sizes": rows,
        "ratios": ratios,
    }


def _cpu_pool() -> ThreadPoolExecutor:
    """One worker thread made like the aggregator's (same torch settings): in-process timings run there."""
    return cpu_pool(AggregatorSettings(worker_threads=1))


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'size':>5} {'M':>4} {'msg/upd':>7} {'raw upd/s':>9} {'agg upd/s':>9} {'agg MiB/s':>9} "
        f"{'vs_raw':>6} {'once':>4} | {'N':>2} {'fold ms':>8} {'flwr ms':>8} {'x':>5} "
        f"{'wire ms':>8} {'flwr ms':>8} {'x':>5}"
    ]
    for r in result["sizes"]:
        f = r["flower"]
        lines.append(
            f"{r['size']:>5} {r['updates']:>4} {r['messages_per_update']:>7.1f} "
            f"{r['raw']['updates_per_s']:>9.1f} {r['aggregator']['updates_per_s']:>9.1f} "
            f"{r['aggregator']['mib_per_s']:>9.1f} {r['vs_raw_consumer']:>6.2f} "
            f"{'yes' if r['aggregator']['exactly_once'] else 'NO':>4} | {f['updates']:>2} "
            f"{f['ours_fold_s'] * 1e3:>8.1f} {f['flower_fold_s'] * 1e3:>8.1f} {f['vs_flower_fold']:>5.2f} "
            f"{f['ours_wire_s'] * 1e3:>8.1f} {f['flower_wire_s'] * 1e3:>8.1f} {f['vs_flower_wire']:>5.2f}"
        )
    lines.append("")
    lines.append("stages per update (ms): " + " | ".join(r["size"] for r in result["sizes"]))
    longest: dict[str, float] = max((r["stages"]["stages"] for r in result["sizes"]), key=len, default={})
    for name in longest:
        cells = [r["stages"]["stages"].get(name) for r in result["sizes"]]
        lines.append(f"  {name:<40} " + " ".join("-" if c is None else f"{c * 1e3:8.2f}" for c in cells))
    for r in result["sizes"]:
        for line in r["stages"].get("profile_top", []):
            lines.append(f"  [{r['size']}] {line}")
    lines.append("")
    lines += ratio_lines(result["ratios"], GOALS)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help=f"small M ({QUICK_UPDATES}): well under a minute"
    )
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"update sizes (fp32 tensor bytes), {DEFAULT_SIZES}"
    )
    parser.add_argument(
        "--updates",
        default=None,
        help=f"M per size, or one M for all (default {DEFAULT_UPDATES}; quick {QUICK_UPDATES})",
    )
    parser.add_argument("--buffer-size", type=int, default=BUFFER_SIZE, help="FedBuff K of the federations")
    parser.add_argument("--fold-updates", type=int, default=8, help="updates in the Flower comparison (<= M)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per in-process timing (median)")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="override PFI_CHUNK_BYTES")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the aggregator gets per size")
    parser.add_argument("--profile", action="store_true", help="cProfile the aggregator's CPU path per size")
    parser.add_argument("--out", default=None, help=f"result JSON (default bench/results/{NAME}.json)")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick and args.repeats == 3:
        args.repeats = 2
    if args.quick and args.fold_updates == 8:
        args.fold_updates = 4
    started = time.perf_counter()
    result = asyncio.run(_run(args))
    result["wall_s"] = time.perf_counter() - started
    path = write_result(NAME, result, args.out)
    say(f"aggregator bench: wrote {path} ({result['wall_s']:.1f}s)")
    return result


def command(args: argparse.Namespace) -> int:
    result = run(args)
    print(json.dumps(result, indent=2, default=str) if args.json else table(result))
    return 0 if all(r["aggregator"]["exactly_once"] for r in result["sizes"]) else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME, help="aggregator throughput vs a raw Kafka consumer; FedBuff fold vs Flower's FedAvg"
    )
    add_arguments(parser)
    parser.set_defaults(func=command)


__all__ = ["add_arguments", "command", "register", "result_path", "run", "table"]

if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m bench.aggregator")
    add_arguments(cli)
    raise SystemExit(command(cli.parse_args()))
