"""``pfi bench hierarchy-chaos``: ``kill -9`` of leaves and roots of a hierarchical federation (issue 15).

On the real local Kafka and Redis, with this run's own topics (``bench-hchaos-<hex>.*``) and federation
(``topology="hierarchical"``, K = 3, a small synthetic LoRA adapter; both removed afterwards): one root and
two leaves run as ``pfi aggregator --role root|leaf`` processes while clients (``--clients-per-partition``
on every partition, keys ``federation/client``) stream signed updates of three encodings (chunked and
whole); ``--kills`` times a leaf is SIGKILLed (a new one started), then the root. Then the federation is
drained and audited (:mod:`bench.chaos.hierarchy`): **per level** (update -> committed partial, partial ->
version) the updates lost, double-counted and unknown, all of which must be 0, and the single-aggregator
audit (every update in exactly one version, counts, parent chain, blob digests).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from pathlib import Path
from typing import Any

import torch
from redis.asyncio import Redis

from bench.aggregator_data import lora_shapes
from bench.chaos.hierarchy import kill_leaves_and_roots, spread_clients
from bench.chaos.processes import aggregator_fleet
from bench.common import drop_federation, ratio_lines, register_benchmark, say, write_result
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.federation.admin import create_with_state
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.stack.topics import delete_topics, ensure_topics
from services.store.versions import VersionStore

GOALS = {"lost_total": "<= 0", "double_counted_total": "<= 0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=3, help="rounds of (kill -9 a leaf, kill -9 the root)")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--clients-per-partition", type=int, default=2)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the topics and federation (forensics)")
    parser.add_argument(
        "--out", default=None, help="result JSON (default bench/results/hierarchy-chaos.json)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(_run(args))
    write_result("hierarchy-chaos", result, args.out)
    return result


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    base = PFISettings()
    settings = base.model_copy(
        update={
            "topic_prefix": f"bench-hchaos-{tag}",
            "update_partitions": args.partitions,
            "chunk_bytes": 4096,
        }
    )
    shapes = lora_shapes(16 * 1024)
    rank = next(iter(shapes.values()))[0]
    spec = FederationSpec(
        name=f"bench-hchaos-{tag}",
        base_model="bench/synthetic-lora",
        lora=LoraSpec(rank=rank, alpha=2.0 * rank, target_modules=("q_proj", "v_proj")),
        aggregation=AggregationSpec(
            buffer_size=3,
            flush_timeout_s=1.0,
            max_staleness=1000,
            keep_versions=1000,
            topology="hierarchical",
        ),
    )
    redis = Redis.from_url(settings.redis())
    await ensure_topics(settings)
    try:
        store = VersionStore(redis)
        await create_with_state(store, spec, {k: torch.zeros(v) for k, v in shapes.items()})
        clients = await spread_clients(redis, spec, args.clients_per_partition, args.partitions)
        log_dir = Path(base.log_dir) / f"bench-hierarchy-chaos-{tag}"
        async with aggregator_fleet(settings, log_dir) as fleet, UpdateProducer(settings) as producer:
            outcome = await kill_leaves_and_roots(
                settings, store, fleet, producer, clients, shapes, kills=args.kills, seed=args.seed
            )
        say(outcome.timeline)
    finally:
        if not args.keep:
            names = [settings.updates_topic, settings.dlq_topic, settings.versions_topic]
            await delete_topics(settings, [*names, settings.partials_topic])
            await drop_federation(redis, spec.name)
        await redis.aclose()
    levels = outcome.levels
    return {
        "benchmark": "hierarchy-chaos",
        "kills": {"leaf": args.kills, "root": args.kills},
        "sent": outcome.sender.total,
        "drained": outcome.drained,
        "levels": levels,
        "audit_problems": outcome.audit.problems,
        "ratios": {
            "lost_total": sum(level["lost"] for level in levels.values()),
            "double_counted_total": sum(level["double"] for level in levels.values()),
        },
        "goals": GOALS,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"hierarchical federation: {result['sent']} updates, {result['kills']['leaf']} leaf and "
        f"{result['kills']['root']} root kill -9; drained: {result['drained']}"
    ]
    for level, counts in result["levels"].items():
        lines.append(f"  {level:20s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    lines.append(f"  single-aggregator audit problems: {result['audit_problems'] or 'none'}")
    return "\n".join(lines + ratio_lines(result["ratios"], GOALS))


def register(subparsers: Any) -> None:
    register_benchmark(
        subparsers,
        "hierarchy-chaos",
        "kill -9 of leaves and roots: updates lost / double-counted per level (all 0)",
        add_arguments,
        run,
        table,
    )
