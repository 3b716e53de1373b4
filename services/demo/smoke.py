"""End-to-end smoke: a tiny federation, simulated clients sending signed deltas through real Kafka,
the aggregator committing versions to real Redis, and a summary table.

The full demo (real foundation model, per-speaker Shakespeare data, serving, evaluation) replaces
this once the edge agent and personalization service exist; this keeps `make demo` meaningful now.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import torch
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from clients.updates import UpdateProducer, build_update
from schemas.codec import decode_tensors
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.aggregator.service import Aggregator
from services.federation.admin import create_federation, federation_status, register_client
from services.settings import AggregatorSettings, PFISettings
from services.stack.topics import ensure_topics
from services.store.versions import VersionStore
from services.versions_codec import BLOB_ENCODING


def _say(line: str) -> None:
    print(f"[demo] {line}", flush=True)


async def run_smoke(clients: int = 8, updates: int = 24, seed: int = 0) -> dict[str, object]:
    rng = random.Random(seed)
    settings = PFISettings()
    await ensure_topics(settings)
    redis = Redis.from_url(settings.redis())
    store = VersionStore(redis)
    name = f"smoke-{uuid.uuid4().hex[:6]}"
    spec = FederationSpec(
        name=name,
        base_model="pfi/tiny-llama",
        lora=LoraSpec(rank=4, alpha=8),
        aggregation=AggregationSpec(buffer_size=4, flush_timeout_s=2.0),
    )
    _say(f"creating federation {name} on {spec.base_model}")
    await create_federation(store, spec)
    blob = await store.get_blob(name, 0)
    assert blob is not None
    shapes = {
        k: tuple(v.shape) for k, v in decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30).items()
    }
    keys = {f"client-{i}": await register_client(redis, f"client-{i}") for i in range(clients)}
    aggregator = Aggregator(
        settings, AggregatorSettings(port=0, group_id=f"demo-{name}"), CollectorRegistry()
    )
    task = asyncio.create_task(aggregator.run())
    started = time.perf_counter()
    try:
        await asyncio.wait_for(aggregator.started.wait(), 60)
        _say(
            f"aggregator up (metrics on :{aggregator.health.port}); {clients} clients send {updates} updates"
        )
        async with UpdateProducer(settings) as producer:
            for i in range(updates):
                client = f"client-{rng.randrange(clients)}"
                base = await store.latest(name) or 0
                base = max(0, base - rng.choice([0, 0, 1, 2]))  # some clients lag behind: staleness
                gen = torch.Generator().manual_seed(seed * 1000 + i)
                delta = {k: torch.randn(s, generator=gen) * 0.01 for k, s in shapes.items()}
                envelope = build_update(
                    federation=name, client_id=client, spec_fingerprint=spec.fingerprint(),
                    base_version=base, num_samples=rng.randint(5, 50), delta=delta, key=keys[client],
                )  # fmt: skip
                await producer.send(envelope)
                if (i + 1) % 6 == 0:
                    _say(f"sent {i + 1}/{updates}; global version {await store.latest(name)}")
                await asyncio.sleep(rng.uniform(0.0, 0.15))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = await federation_status(store, name)
            if status["updates_aggregated_total"] + status["updates_rejected_total"]["total"] >= updates:
                break
            await asyncio.sleep(0.5)
    finally:
        aggregator.stopping.set()
        await asyncio.wait_for(task, 60)
    status = await federation_status(store, name)
    await redis.aclose()
    status["elapsed_s"] = time.perf_counter() - started
    return status


def print_summary(status: dict[str, object]) -> None:
    versions = status["versions"]
    assert isinstance(versions, list)
    print()
    print(f"{'version':>7}  {'parent':>6}  {'updates':>7}  {'mean staleness':>14}")
    for v in versions:
        staleness = "-" if v["mean_staleness"] is None else f"{v['mean_staleness']:.2f}"
        print(f"{v['version']:>7}  {v['parent']!s:>6}  {v['num_updates']:>7}  {staleness:>14}")
    print()
    rejected = status["updates_rejected_total"]
    assert isinstance(rejected, dict)
    print(
        f"federation {status['name']}: version {status['version']}, "
        f"accepted {status['updates_accepted_total']}, aggregated {status['updates_aggregated_total']}, "
        f"rejected {rejected['total']} in {status['elapsed_s']:.1f}s"
    )
