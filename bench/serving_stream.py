"""Serving benchmark, part (iv): time to first token of a streamed OpenAI-compatible completion vs the
native ``generate`` route, both over real HTTP to the same service (uvicorn on a loopback port).

Definitions (the same user, personal adapter, prompt and greedy decoding; requests interleaved in a
random order so that drift hits both alike):

* native: request sent -> whole response of ``POST /v1/federations/{fed}/generate`` with
  ``max_new_tokens=1`` (the earliest the native route can hand a client its first token);
* stream: request sent -> first ``data:`` event of ``POST /v1/completions`` with ``stream: true`` and
  ``max_tokens=new_tokens`` (a real streamed completion; it is read to its end so that every sample
  starts on an idle service).

``ttft_ratio`` = p50 stream / p50 native. Goal: <= 1.1.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
import uvicorn

from bench.common import BenchError
from bench.serving_setup import PROMPT, summary_ms
from services.personalization.harness import Harness
from services.stack.processes import free_port

USER = "lat-user"


async def _native(client: httpx.AsyncClient, fed: str) -> float:
    started = time.perf_counter()
    response = await client.post(
        f"/v1/federations/{fed}/generate", json={"prompt": PROMPT, "max_new_tokens": 1}
    )
    if response.status_code != 200:
        raise BenchError(f"native generate: {response.status_code} {response.text}")
    return time.perf_counter() - started


async def _stream(client: httpx.AsyncClient, fed: str, new_tokens: int) -> float:
    body = {"model": fed, "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    done = False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise BenchError(f"streamed completion: {response.status_code} {(await response.aread())!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter() - started
            if line == "data: [DONE]":
                done = True
            elif "error" in json.loads(line[6:]):
                raise BenchError(f"streamed completion failed: {line}")
    if first is None or not done:
        raise BenchError("the stream ended without events or without [DONE]")
    return first


async def stream_ttft(h: Harness, fed: str, rounds: int, new_tokens: int) -> dict[str, Any]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(h.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                raise BenchError(f"uvicorn did not start on port {port}")
            await asyncio.sleep(0.01)
        headers = h.auth(USER, federation=fed)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
        ) as client:
            samples: dict[str, list[float]] = {"native": [], "stream": []}

            async def once(kind: str) -> float:
                return await (_native(client, fed) if kind == "native" else _stream(client, fed, new_tokens))

            for kind in samples:  # warm-up: connections, caches, allocator
                for _ in range(3):
                    await once(kind)
            order = list(samples)
            for _ in range(rounds):
                random.shuffle(order)
                for kind in order:
                    samples[kind].append(await once(kind))
    finally:
        server.should_exit = True
        await serving
    native, stream = summary_ms(samples["native"]), summary_ms(samples["stream"])
    return {
        "native_generate_1_token": native,
        "stream_first_event": stream,
        "stream_new_tokens": new_tokens,
        "ttft_ratio": round(stream["p50_ms"] / native["p50_ms"], 3),
        "ttft_ratio_p99": round(stream["p99_ms"] / native["p99_ms"], 3),
    }
