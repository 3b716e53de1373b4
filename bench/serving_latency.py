"""Serving benchmark, parts (i) latency vs the base model and (iii) freshness of global versions."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable
from typing import Any

import torch

from bench.common import BenchError
from bench.serving_setup import PROMPT, TEXT, commit, pct, summary_ms
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.events import FederationSpec
from services.personalization.harness import Harness
from services.store.versions import VersionStore


async def latency(h: Harness, fed: str, rounds: int, new_tokens: int) -> dict[str, Any]:
    engine = h.service.engine
    out: dict[str, Any] = {}
    for kind in ("score", "generate"):
        samples: dict[str, list[float]] = {"base": [], "global": [], "personal": []}

        def call(mode: str, kind: str = kind) -> Awaitable[Any]:
            base_only = mode == "base"
            user = "lat-user" if mode == "personal" else None
            if kind == "score":
                return engine.score(fed, user, [TEXT], base_only=base_only)
            return engine.generate(fed, user, PROMPT, max_new_tokens=new_tokens, base_only=base_only)

        for mode in samples:  # warm-up (cache, slots, allocator)
            for _ in range(5):
                await call(mode)
        order = list(samples)
        for _ in range(rounds):
            random.shuffle(order)
            for mode in order:
                started = time.perf_counter()
                await call(mode)
                samples[mode].append(time.perf_counter() - started)
        out[kind] = {mode: summary_ms(values) for mode, values in samples.items()}
        out[kind]["p50_vs_base"] = round(out[kind]["personal"]["p50_ms"] / out[kind]["base"]["p50_ms"], 3)
        out[kind]["p99_vs_base"] = round(out[kind]["personal"]["p99_ms"] / out[kind]["base"]["p99_ms"], 3)
    # The same through HTTP (in-process ASGI), for the served stack only.
    http: list[float] = []
    headers = h.auth("lat-user", federation=fed)
    for _ in range(rounds):
        started = time.perf_counter()
        response = await h.client.post(
            f"/v1/federations/{fed}/score", json={"texts": [TEXT]}, headers=headers
        )
        if response.status_code != 200:
            raise BenchError(f"score over HTTP: {response.status_code} {response.text}")
        http.append(time.perf_counter() - started)
    out["score_http_personal"] = summary_ms(http)
    return out


async def freshness(
    h: Harness, store: VersionStore, spec: FederationSpec, versions: int, gap_s: float, clients: int
) -> dict[str, Any]:
    fed = spec.name
    engine = h.service.engine
    first: dict[int, float] = {}
    waiting: dict[int, asyncio.Event] = {}
    stop = asyncio.Event()
    errors = 0

    async def client(i: int) -> None:
        nonlocal errors
        while not stop.is_set():
            try:
                result = await engine.score(fed, f"fresh-{i}", [TEXT])
            except Exception:
                errors += 1
                continue
            version = result.served.global_version
            if version is not None and version not in first:
                first[version] = time.time()
                if version in waiting:
                    waiting[version].set()
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    published: dict[int, float] = {}
    gen = torch.Generator().manual_seed(99)
    try:
        await asyncio.sleep(0.5)
        for _ in range(versions):
            state = decode_tensors(
                await store.get_blob(fed, await store.latest(fed) or 0) or b"",
                BLOB_ENCODING,
                max_decoded_bytes=1 << 30,
            )
            state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
            meta = await commit(store, spec, state)
            published[meta.version] = meta.created_at.timestamp()
            arrived = asyncio.Event()
            waiting[meta.version] = arrived
            if meta.version in first:
                arrived.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), 30)
            await asyncio.sleep(gap_s)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    delays = [first[v] - t for v, t in published.items() if v in first]
    missing = [v for v in published if v not in first]
    return {
        "versions": versions,
        "clients": clients,
        "p50_s": round(pct(delays, 50), 3),
        "p99_s": round(pct(delays, 99), 3),
        "max_s": round(max(delays), 3) if delays else None,
        "never_served": missing,
        "request_errors": errors,
        "service_metric_p50_s": round(pct([d for _, _, d in engine.freshness_log], 50), 3),
        "swap_seconds_mean": round(
            h.sample("pfi_serve_global_swap_duration_seconds_sum", federation=fed)
            / max(1.0, h.sample("pfi_serve_global_swap_duration_seconds_count", federation=fed)),
            3,
        ),
    }
