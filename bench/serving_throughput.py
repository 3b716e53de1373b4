"""Serving benchmark, part (ii): throughput with many users vs loading each user's adapter per request."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from redis.asyncio import Redis

from bench.common import BenchError
from bench.serving_setup import SHORT, TEXT, loader_of, personal
from modeling.base import BaseModel
from modeling.blobs import BLOB_ENCODING
from modeling.lora import peft_config
from schemas.codec import decode_tensors, encode_tensors
from schemas.events import FederationSpec
from services.personalization.backends.torch_slots.stacks import merge_global
from services.personalization.harness import serving
from services.settings import PFISettings, ServeSettings
from services.store import keys


async def drive(
    users: list[str], requests: int, concurrency: int, one: Callable[[str], Awaitable[Any]]
) -> float:
    """Requests per second of ``concurrency`` workers sending ``requests`` in total (random users)."""
    rng = random.Random(11)
    plan = [rng.choice(users) for _ in range(requests)]
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < len(plan):
            user = plan[position]
            position += 1
            await one(user)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


@dataclass
class PerRequestLoader:
    """The baseline: every request reads its user's adapter from Redis, decodes it, loads it into a
    PEFT model over the merged base + global weights and runs alone; model work on one thread, as in
    any single-model server. ``mode``:

    * ``"add"`` (the baseline of the goal): ``add_adapter`` + ``set_peft_model_state_dict`` +
      ``set_adapter``, forward, ``delete_adapter`` (the cheapest of the add/delete variants measured;
      a forward with ``adapter_names=`` instead of ``set_adapter`` is slower);
    * ``"reuse"`` (a stronger reference): one PEFT adapter stays in the model and each request
      overwrites its weights with ``set_peft_model_state_dict`` (no module is added or removed).
    """

    redis: Redis
    fed: str
    model: Any  # a PeftModel with one idle adapter
    tokenizer: Any
    config: Any
    pool: ThreadPoolExecutor
    mode: str = "add"
    idle: str = "idle"
    counter: int = 0

    @classmethod
    def build(
        cls,
        redis: Redis,
        base: BaseModel,
        spec: FederationSpec,
        global_state: dict[str, torch.Tensor],
        pool: ThreadPoolExecutor,
        mode: str = "add",
    ) -> PerRequestLoader:
        from peft import get_peft_model

        # delete_adapter of the active adapter warns each time that it activates the idle one
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        config = peft_config(spec.lora)
        with torch.inference_mode(False):
            model = get_peft_model(merge_global(base, spec, global_state), config, adapter_name="idle")
        model.eval()
        return cls(redis, spec.name, model, base.tokenizer, config, pool, mode)

    def _work(self, blob: bytes, ids: list[int]) -> float:
        from peft import set_peft_model_state_dict

        state = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
        if self.mode == "reuse":
            set_peft_model_state_dict(self.model, state, adapter_name=self.idle)
            return self._forward(ids)
        self.counter += 1
        name = f"req{self.counter}"
        self.model.add_adapter(name, self.config)
        try:
            set_peft_model_state_dict(self.model, state, adapter_name=name)
            self.model.set_adapter(name)
            return self._forward(ids)
        finally:
            self.model.delete_adapter(name)  # PEFT activates the remaining (idle) adapter

    def _forward(self, ids: list[int]) -> float:
        x = torch.tensor([ids])
        with torch.inference_mode():
            logits = self.model(input_ids=x).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        return float(nll)

    async def score(self, user: str, text: str) -> float:
        blob = await self.redis.hget(keys.user_adapter(self.fed, user), "blob")
        if blob is None:
            raise BenchError(f"no adapter for {user}")
        ids = list(self.tokenizer.encode(text))
        loop = asyncio.get_running_loop()
        data = blob if isinstance(blob, bytes) else str(blob).encode()
        return await loop.run_in_executor(self.pool, self._work, data, ids)


async def _compare(
    engine: Any,
    fed: str,
    users: list[str],
    loaders: dict[str, PerRequestLoader],
    requests: int,
    baseline_requests: int,
    concurrency: int,
) -> dict[str, float]:
    """Service vs each baseline, long and short texts; rounds alternate so that load from elsewhere
    on the box hits all alike; medians of the rounds."""
    rounds = 3 if requests >= 30 else 1
    for loader in loaders.values():  # warm-up
        await drive(users, min(20, baseline_requests), concurrency, partial(loader.score, text=TEXT))
    out: dict[str, float] = {}
    for label, text in (("", TEXT), ("_short", SHORT)):
        rps: dict[str, list[float]] = {"service": [], **{mode: [] for mode in loaders}}
        for _ in range(rounds):

            async def served(user: str, text: str = text) -> None:
                await engine.score(fed, user, [text])

            rps["service"].append(await drive(users, requests // rounds, concurrency, served))
            for mode, loader in loaders.items():
                n = baseline_requests // rounds
                rps[mode].append(await drive(users, n, concurrency, partial(loader.score, text=text)))
        median = {k: statistics.median(v) for k, v in rps.items()}
        out[f"service_rps{label}"] = round(median["service"], 1)
        out[f"per_request_load_rps{label}"] = round(median["add"], 1)
        out[f"ratio_vs_per_request_load{label}"] = round(median["service"] / median["add"], 2)
        out[f"reused_adapter_load_rps{label}"] = round(median["reuse"], 1)
        out[f"ratio_vs_reused_adapter_load{label}"] = round(median["service"] / median["reuse"], 2)
    return out


async def throughput(
    settings: PFISettings,
    serve: ServeSettings,
    spec: FederationSpec,
    base: BaseModel,
    global_state: dict[str, torch.Tensor],
    n_users: int,
    requests: int,
    baseline_requests: int,
    concurrency: int,
) -> dict[str, Any]:
    template = {k: tuple(v.shape) for k, v in global_state.items()}
    fed = spec.name
    users = [f"user-{i:04d}" for i in range(n_users)]
    out: dict[str, Any] = {"users": n_users, "concurrency": concurrency}
    adapter_bytes = sum(4 * math.prod(s) for s in template.values())
    async with serving(
        settings, serve.model_copy(update={"cache_bytes": 0}), model_loader=loader_of(base)
    ) as cold:
        engine = cold.service.engine
        started = time.perf_counter()
        for i, user in enumerate(users):
            blob = encode_tensors(personal(template, 1000 + i), BLOB_ENCODING)
            await engine.upload(fed, user, blob, trained_against=0)
        out["upload_seconds"] = round(time.perf_counter() - started, 2)

        async def cold_one(user: str) -> None:
            await engine.score(fed, user, [TEXT])

        await drive(users, min(50, requests), concurrency, cold_one)
        out["service_cache_off_rps"] = round(await drive(users, baseline_requests, concurrency, cold_one), 1)

    budget = max(serve.cache_bytes, 2 * n_users * adapter_bytes)
    async with serving(
        settings, serve.model_copy(update={"cache_bytes": budget}), model_loader=loader_of(base)
    ) as warm:
        engine = warm.service.engine
        for user in users:  # fill the cache: every user once
            await engine.score(fed, user, [TEXT])
        hits0, misses0 = engine.cache.hits, engine.cache.misses
        redis = Redis.from_url(settings.redis())
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model") as pool:
                loaders = {
                    mode: await asyncio.to_thread(
                        PerRequestLoader.build, redis, base, spec, global_state, pool, mode
                    )
                    for mode in ("add", "reuse")
                }
                batches0 = warm.sample("pfi_serve_batch_requests_count", kind="score")
                requests0 = warm.sample("pfi_serve_batch_requests_sum", kind="score")
                out.update(
                    await _compare(engine, fed, users, loaders, requests, baseline_requests, concurrency)
                )
                out["service_mean_batch_requests"] = round(
                    (warm.sample("pfi_serve_batch_requests_sum", kind="score") - requests0)
                    / max(1.0, warm.sample("pfi_serve_batch_requests_count", kind="score") - batches0),
                    2,
                )
        finally:
            await redis.aclose()
        out["text_tokens"] = len(base.tokenizer.encode(TEXT))
        out["short_text_tokens"] = len(base.tokenizer.encode(SHORT))
        out["service_cache_hit_rate"] = round(
            (engine.cache.hits - hits0) / max(1, engine.cache.hits - hits0 + engine.cache.misses - misses0), 4
        )
        out["service_cache_bytes"] = engine.cache.bytes
        headers = {u: warm.auth(u, federation=fed) for u in users}

        async def http_one(user: str) -> None:
            response = await warm.client.post(
                f"/v1/federations/{fed}/score", json={"texts": [TEXT]}, headers=headers[user]
            )
            if response.status_code != 200:
                raise BenchError(response.text)

        out["service_http_rps"] = round(await drive(users, max(20, requests // 4), concurrency, http_one), 1)
    out["ratio_vs_cache_off"] = round(out["service_rps"] / out["service_cache_off_rps"], 2)
    return out
