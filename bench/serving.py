"""Serving benchmark of the personalization service (``python -m bench.serving`` or ``pfi bench serving``).

Measured in one run, against the real Redis (and Kafka for readiness) of the local stack or of
``PFI_REDIS_URL`` / ``PFI_KAFKA_BOOTSTRAP_SERVERS``:

(i)   latency p50/p99 of ``score`` and ``generate`` for base + global + personal vs the base model
      alone (same engine path: tokenization, model thread, batcher), requests interleaved so drift
      hits both alike. Goal: ratio <= 1.15 at p50.
(ii)  throughput with 1000 distinct users, each with a personal adapter in Redis, concurrent
      clients: the service (byte-bounded LRU of decoded adapters + PEFT slots + mixed-adapter
      micro-batches) vs loading each user's adapter per request (Redis read, decode, PEFT
      ``add_adapter`` + ``set_peft_model_state_dict``, forward, ``delete_adapter``). Also the
      service with its cache disabled (``cache_bytes=0``), for reference. Goal: >= 10x.
(iii) freshness: a new global version is committed (as the aggregator does) while clients keep
      requesting; freshness = first response served on it - its ``created_at``. Goal: p99 <= 2 s.

Prints a table and writes ``bench/results/serving.json`` (``ratios`` holds the headline numbers).
``--model small`` uses a larger randomly initialized LLaMA (hidden 512, 8 layers) instead of the
tiny test model, where per-layer PEFT overhead weighs less against the model's own compute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from redis.asyncio import Redis

from schemas.codec import decode_tensors, encode_tensors
from schemas.events import FederationSpec, LoraSpec
from schemas.records import VersionMeta
from services.federation.admin import commit_state
from services.models.base import TINY_CONFIG, TINY_LLAMA, BaseModel, ByteTokenizer, load_base_model
from services.models.lora import init_adapter, peft_config
from services.personalization.harness import Harness, serving
from services.personalization.stacks import build_merged_stack
from services.settings import MIB, PFISettings, ServeSettings
from services.store import keys
from services.store.versions import VersionStore
from services.versions_codec import BLOB_ENCODING

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
SMALL = "bench/llama-small"
SMALL_CONFIG = {
    **TINY_CONFIG,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do "
    "shake the darling buds of May."
)
SHORT = "Good morrow, cousin."
PROMPT = "ROMEO: But, soft! what light through yonder window breaks?"


class BenchError(Exception):
    pass


def load_model(model_id: str) -> BaseModel:
    """``load_base_model`` plus the benchmark's larger synthetic LLaMA."""
    if model_id != SMALL:
        return load_base_model(model_id)
    from transformers import LlamaConfig, LlamaForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(4321)
        model: Any = LlamaForCausalLM(LlamaConfig(**SMALL_CONFIG))
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(model_id=SMALL, model=model, tokenizer=ByteTokenizer())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 50) * 1000, 3),
        "p99_ms": round(pct(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
        "n": len(values),
    }


# -- federation setup --------------------------------------------------------------------------------


async def commit(store: VersionStore, spec: FederationSpec, state: dict[str, torch.Tensor]) -> VersionMeta:
    """Commit the next global version with its announcement, as the aggregator's commit does."""
    return await commit_state(store, spec, state, source="pfi://bench")


async def create(store: VersionStore, spec: FederationSpec, base: BaseModel) -> dict[str, torch.Tensor]:
    if not await store.put_spec(spec):
        raise BenchError(f"federation {spec.name} exists")
    state = await asyncio.to_thread(init_adapter, spec, base.model)
    # A trained-looking global adapter (B != 0), so that merging it changes the model.
    gen = torch.Generator().manual_seed(7)
    state = {
        k: v + 0.02 * torch.randn(v.shape, generator=gen) if ".lora_B." in k else v for k, v in state.items()
    }
    await commit(store, spec, state)
    return state


async def drop(redis: Redis, fed: str) -> None:
    async for key in redis.scan_iter(match=keys.prefix(fed) + "*"):
        await redis.delete(key)
    await redis.srem(keys.FEDERATIONS, fed)


def personal(template: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in template.items()}


# -- (i) latency ----------------------------------------------------------------------------------------


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
    headers = h.auth("lat-user")
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


# -- (ii) throughput ------------------------------------------------------------------------------------


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
    """The baseline: every request reads its user's adapter from Redis, decodes it, loads it into the
    (merged base + global) PEFT model with ``add_adapter`` + ``set_peft_model_state_dict``, runs alone
    and deletes the adapter again. Model work on one thread, as in any single-model server."""

    redis: Redis
    fed: str
    model: Any
    tokenizer: Any
    config: Any
    template: dict[str, tuple[int, ...]]
    pool: ThreadPoolExecutor
    counter: int = 0

    def _work(self, blob: bytes, ids: list[int]) -> float:
        from peft import set_peft_model_state_dict

        state = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
        self.counter += 1
        name = f"req{self.counter}"
        self.model.add_adapter(name, self.config)
        try:
            set_peft_model_state_dict(self.model, state, adapter_name=name)
            x = torch.tensor([ids])
            with torch.inference_mode():
                logits = self.model(input_ids=x, adapter_names=[name]).logits[:, :-1]
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            return float(nll)
        finally:
            self.model.delete_adapter(name)

    async def score(self, user: str, text: str) -> float:
        blob = await self.redis.hget(keys.user_adapter(self.fed, user), "blob")
        if blob is None:
            raise BenchError(f"no adapter for {user}")
        ids = self.tokenizer.encode(text)
        loop = asyncio.get_running_loop()
        data = blob if isinstance(blob, bytes) else str(blob).encode()
        return await loop.run_in_executor(self.pool, self._work, data, ids)


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
        settings, serve.model_copy(update={"cache_bytes": 0}), model_loader=load_model
    ) as cold:
        engine = cold.service.engine
        started = time.perf_counter()
        for i, user in enumerate(users):
            blob = encode_tensors(personal(template, 1000 + i), BLOB_ENCODING)
            await engine.upload(fed, user, blob, trained_against=0)
        out["upload_seconds"] = round(time.perf_counter() - started, 2)

        async def cold_one(user: str) -> None:
            await engine.score(fed, user, [TEXT])

        await drive(users, 50, concurrency, cold_one)
        out["service_cache_off_rps"] = round(await drive(users, baseline_requests, concurrency, cold_one), 1)

    budget = max(serve.cache_bytes, 2 * n_users * adapter_bytes)
    rounds = 3
    async with serving(
        settings, serve.model_copy(update={"cache_bytes": budget}), model_loader=load_model
    ) as warm:
        engine = warm.service.engine
        for user in users:  # fill the cache: every user once
            await engine.score(fed, user, [TEXT])
        hits0, misses0 = engine.cache.hits, engine.cache.misses
        stack = await asyncio.to_thread(build_merged_stack, base, spec, 0, global_state, slots=1)
        redis = Redis.from_url(settings.redis())
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model") as pool:
                config = peft_config(spec.lora)
                loader = PerRequestLoader(redis, fed, stack.model, base.tokenizer, config, template, pool)
                await drive(users, 20, concurrency, lambda u: loader.score(u, TEXT))
                # Alternate service and baseline so that load from elsewhere on the box hits both alike.
                for label, text in (("", TEXT), ("_short", SHORT)):
                    service: list[float] = []
                    baseline: list[float] = []
                    for _ in range(rounds):

                        async def served(user: str, text: str = text) -> None:
                            await engine.score(fed, user, [text])

                        async def loaded(user: str, text: str = text) -> None:
                            await loader.score(user, text)

                        service.append(await drive(users, requests // rounds, concurrency, served))
                        baseline.append(await drive(users, baseline_requests // rounds, concurrency, loaded))
                    out[f"service_rps{label}"] = round(statistics.median(service), 1)
                    out[f"per_request_load_rps{label}"] = round(statistics.median(baseline), 1)
                    out[f"ratio_vs_per_request_load{label}"] = round(
                        statistics.median(service) / statistics.median(baseline), 2
                    )
        finally:
            await redis.aclose()
        out["text_tokens"] = len(base.tokenizer.encode(TEXT))
        out["short_text_tokens"] = len(base.tokenizer.encode(SHORT))
        out["service_cache_hit_rate"] = round(
            (engine.cache.hits - hits0) / max(1, engine.cache.hits - hits0 + engine.cache.misses - misses0), 4
        )
        out["service_cache_bytes"] = engine.cache.bytes
        out["service_mean_batch_requests"] = round(
            warm.sample("pfi_serve_batch_requests_sum", kind="score")
            / max(1.0, warm.sample("pfi_serve_batch_requests_count", kind="score")),
            2,
        )
        headers = {u: warm.auth(u) for u in users}

        async def http_one(user: str) -> None:
            response = await warm.client.post(
                f"/v1/federations/{fed}/score", json={"texts": [TEXT]}, headers=headers[user]
            )
            if response.status_code != 200:
                raise BenchError(response.text)

        out["service_http_rps"] = round(await drive(users, max(200, requests // 4), concurrency, http_one), 1)
    out["ratio_vs_cache_off"] = round(out["service_rps"] / out["service_cache_off_rps"], 2)
    return out


# -- (iii) freshness ------------------------------------------------------------------------------------


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


# -- driver -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    model: str = TINY_LLAMA
    rank: int = 8
    latency_rounds: int = 200
    new_tokens: int = 16
    users: int = 1000
    requests: int = 3000
    baseline_requests: int = 600
    concurrency: int = 32
    versions: int = 20
    gap_s: float = 0.3


async def _run(sizes: Sizes) -> dict[str, Any]:
    settings = PFISettings()
    redis = Redis.from_url(settings.redis())
    try:
        await redis.ping()
    except Exception as err:
        raise BenchError(
            f"Redis at {settings.redis()} is not reachable ({err}); run `pfi stack up`"
        ) from None
    store = VersionStore(redis)
    spec = FederationSpec(
        name=f"bench-serve-{uuid.uuid4().hex[:8]}",
        base_model=sizes.model,
        lora=LoraSpec(rank=sizes.rank, alpha=2.0 * sizes.rank, target_modules=("q_proj", "v_proj")),
    )
    base = await asyncio.to_thread(load_model, sizes.model)
    serve = ServeSettings(cache_bytes=256 * MIB, max_new_tokens=max(64, sizes.new_tokens))
    result: dict[str, Any] = {
        "model": sizes.model,
        "lora": spec.lora.model_dump(mode="json"),
        "torch_threads_serving": serve.torch_threads or "auto",
        "sizes": sizes.__dict__,
    }
    try:
        global_state = await create(store, spec, base)
        template = {k: tuple(v.shape) for k, v in global_state.items()}
        async with serving(settings, serve, model_loader=load_model) as h:
            blob = encode_tensors(personal(template, 1), BLOB_ENCODING)
            await h.service.engine.upload(spec.name, "lat-user", blob, trained_against=0)
            print("serving bench: (i) latency ...", file=sys.stderr, flush=True)
            result["latency"] = await latency(h, spec.name, sizes.latency_rounds, sizes.new_tokens)
            print("serving bench: (iii) freshness ...", file=sys.stderr, flush=True)
            result["freshness"] = await freshness(h, store, spec, sizes.versions, sizes.gap_s, clients=4)
        print("serving bench: (ii) throughput ...", file=sys.stderr, flush=True)
        current = decode_tensors(
            await store.get_blob(spec.name, await store.latest(spec.name) or 0) or b"",
            BLOB_ENCODING,
            max_decoded_bytes=1 << 30,
        )
        result["throughput"] = await throughput(
            settings,
            serve,
            spec,
            base,
            current,
            sizes.users,
            sizes.requests,
            sizes.baseline_requests,
            sizes.concurrency,
        )
    finally:
        await drop(redis, spec.name)
        await redis.aclose()
    result["ratios"] = {
        "score_p50_vs_base": result["latency"]["score"]["p50_vs_base"],
        "generate_p50_vs_base": result["latency"]["generate"]["p50_vs_base"],
        "throughput_vs_per_request_load": result["throughput"]["ratio_vs_per_request_load"],
        "throughput_vs_per_request_load_short": result["throughput"]["ratio_vs_per_request_load_short"],
        "throughput_vs_cache_off": result["throughput"]["ratio_vs_cache_off"],
        "freshness_p99_s": result["freshness"]["p99_s"],
    }
    result["goals"] = {
        "p50_vs_base_le_1.15": max(
            result["ratios"]["score_p50_vs_base"], result["ratios"]["generate_p50_vs_base"]
        )
        <= 1.15,
        "throughput_vs_per_request_load_ge_10": result["ratios"]["throughput_vs_per_request_load"] >= 10,
        "freshness_p99_le_2s": result["ratios"]["freshness_p99_s"] <= 2.0,
    }
    return result


def table(result: dict[str, Any]) -> str:
    lat, thr, fresh = result["latency"], result["throughput"], result["freshness"]
    lines = [f"serving benchmark ({result['model']}, LoRA r={result['lora']['rank']})", ""]
    lines.append(f"{'(i) latency':<34}{'base':>10}{'global':>10}{'personal':>10}{'ratio':>8}")
    for kind in ("score", "generate"):
        for q in ("p50_ms", "p99_ms"):
            row = lat[kind]
            ratio = row["p50_vs_base"] if q == "p50_ms" else row["p99_vs_base"]
            lines.append(
                f"  {kind} {q:<26}{row['base'][q]:>10.2f}{row['global'][q]:>10.2f}{row['personal'][q]:>10.2f}"
                f"{ratio:>8.2f}"
            )
    lines.append(f"  score over HTTP (personal) p50 ms  {lat['score_http_personal']['p50_ms']:.2f}")
    lines.append("")
    lines.append(
        f"(ii) throughput, {thr['users']} users, {thr['concurrency']} concurrent, req/s"
        f"{thr['text_tokens']:>6} tok{thr['short_text_tokens']:>8} tok"
    )
    lines.append(
        f"  service (cache + PEFT slots + micro-batches)  {thr['service_rps']:>10.1f}"
        f"{thr['service_rps_short']:>12.1f}"
    )
    lines.append(
        f"  per-request adapter load (baseline)           {thr['per_request_load_rps']:>10.1f}"
        f"{thr['per_request_load_rps_short']:>12.1f}"
    )
    lines.append(
        f"  ratio vs per-request load                     {thr['ratio_vs_per_request_load']:>10.2f}"
        f"{thr['ratio_vs_per_request_load_short']:>12.2f}"
    )
    lines.append(f"  service, cache disabled                       {thr['service_cache_off_rps']:>10.1f}")
    lines.append(f"  service over HTTP (in-process ASGI)           {thr['service_http_rps']:>10.1f}")
    batch, hits = thr["service_mean_batch_requests"], thr["service_cache_hit_rate"]
    lines.append(f"  mean requests per batch {batch}, cache hit rate {hits}")
    lines.append("")
    lines.append(
        f"(iii) freshness over {fresh['versions']} versions: p50 {fresh['p50_s']}s  p99 {fresh['p99_s']}s  "
        f"max {fresh['max_s']}s  (merge + swap {fresh['swap_seconds_mean']}s)"
    )
    lines.append("")
    lines.append("ratios: " + json.dumps(result["ratios"]))
    lines.append("goals:  " + json.dumps(result["goals"]))
    return "\n".join(lines)


def run_serving_bench(json_out: bool = False, *, quick: bool = False, model: str = "tiny") -> dict[str, Any]:
    """Run the three measurements, print a table (or JSON) and write ``bench/results/serving.json``."""
    sizes = Sizes(model=SMALL if model == "small" else TINY_LLAMA)
    if quick:
        sizes = Sizes(
            model=sizes.model, latency_rounds=40, users=200, requests=600, baseline_requests=150, versions=5
        )
    result = asyncio.run(_run(sizes))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    target = RESULTS if model == "tiny" else RESULTS.with_name(f"serving-{model}.json")
    target.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str) if json_out else table(result))
    return result


def _cli(args: argparse.Namespace) -> int:
    run_serving_bench(args.json, quick=args.quick, model=args.model)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serving", help="personalization service: latency vs base, throughput vs per-request loads, freshness"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.set_defaults(func=_cli)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    cli.add_argument("--json", action="store_true")
    cli.add_argument("--quick", action="store_true")
    cli.add_argument("--model", choices=("tiny", "small"), default="tiny")
    raise SystemExit(_cli(cli.parse_args()))
