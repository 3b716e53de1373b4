"""Private retrieval benchmark (``pfi bench retrieval``; ``python -m bench.retrieval``).

Measured in one run, against the real Redis of the local stack (or ``PFI_REDIS_URL``):

(i)   the in-memory index alone (:func:`bench.retrieval_index.measure_index`): query embedding and
      dense / lexical / hybrid search p50/p99 over ``chunks`` chunks;
(ii)  the service's store path (:class:`services.personalization.user_documents.UserDocuments`) for one
      user with ``chunks`` chunks in Redis: a search = generation check (one Redis round trip) + the
      cached index + query embedding + search; p50/p99 per mode, and the cold path (load every chunk
      from Redis and build the index) on a cache miss;
(iii) serving overhead: ``score`` and ``generate`` through the HTTP app (``--model``: tiny by default,
      ``small`` or ``smollm2`` as in ``pfi bench serving``; the same user)
      with ``retrieval: {"k": 4}`` vs none, requests interleaved so drift hits both alike; ratios of
      the p50 latencies (the retrieved context also makes the forward longer: that is part of the cost).

Chunk texts are 64-word windows of Tiny Shakespeare (a synthetic text when absent); chunk embeddings
are random unit vectors written straight to the store (embedding 10k chunks takes minutes on 2 cores
and the search cost does not depend on their values; (i) reports what embedding a history costs).
Prints a table ending with the ratios and writes ``bench/results/retrieval.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

from bench.common import BenchError, result_path, say, write_result
from bench.retrieval_index import WINDOW_WORDS, _percentiles, _windows, _words, measure_index
from bench.serving_setup import MODELS, create, drop, load_model, loader_of
from modeling.base import TINY_LLAMA
from modeling.retrieval import SearchMode
from schemas.events import FederationSpec, LoraSpec
from services.personalization.documents import DocumentRecord, NewDocument, stored_bytes
from services.personalization.harness import Harness, serving
from services.personalization.user_documents import UserDocuments
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore

NAME = "retrieval"
MODES: tuple[SearchMode, ...] = ("dense", "lexical", "hybrid")
CHUNKS_PER_DOC = 100
USER = "bench-user"


@dataclass(frozen=True)
class Sizes:
    chunks: int = 10_000
    queries: int = 200  # per mode, store path and index alone
    cold_builds: int = 3
    rounds: int = 60  # serving: requests of each kind with and without retrieval
    new_tokens: int = 16
    k: int = 4
    model: str = TINY_LLAMA  # the served model of (iii)


QUICK: dict[str, Any] = {"chunks": 2_000, "queries": 50, "cold_builds": 2, "rounds": 20}
TINY_SIZES: dict[str, Any] = {"chunks": 150, "queries": 6, "cold_builds": 1, "rounds": 3, "new_tokens": 4}


def _documents(texts: list[str], dim: int, rng: np.random.Generator) -> list[NewDocument]:
    vectors = rng.standard_normal((len(texts), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    docs = []
    for first in range(0, len(texts), CHUNKS_PER_DOC):
        chunk_texts = texts[first : first + CHUNKS_PER_DOC]
        rows = vectors[first : first + len(chunk_texts)]
        record = DocumentRecord(
            id=f"doc-{first // CHUNKS_PER_DOC:05d}",
            chunks=len(chunk_texts),
            chars=sum(len(t) + 1 for t in chunk_texts),
            bytes=stored_bytes(chunk_texts, rows),
            created_at=datetime.now(UTC),
        )
        docs.append(NewDocument(record, chunk_texts, rows))
    return docs


async def _fill(documents: UserDocuments, fed: str, texts: list[str], rng: np.random.Generator) -> None:
    dim = (await asyncio.to_thread(documents.embedder)).dim
    docs = _documents(texts, dim, rng)
    for first in range(0, len(docs), 10):
        await documents.store.add(fed, USER, docs[first : first + 10])


async def _store_path(documents: UserDocuments, fed: str, sizes: Sizes, queries: list[str]) -> dict[str, Any]:
    cold = []
    for _ in range(sizes.cold_builds):
        documents.cache.invalidate(fed, USER)
        began = time.perf_counter()
        await documents.index(fed, USER)
        cold.append(time.perf_counter() - began)
    await documents.search(fed, USER, queries[0], sizes.k, "hybrid")  # warm-up
    timings: dict[str, Any] = {}
    for mode in MODES:
        samples = []
        for query in queries:
            began = time.perf_counter()
            await documents.search(fed, USER, query, sizes.k, mode)
            samples.append(time.perf_counter() - began)
        timings[mode] = _percentiles(samples)
    began = time.perf_counter()
    for _ in range(len(queries)):
        await documents.store.generation(fed, USER)
    round_trip_ms = (time.perf_counter() - began) * 1000 / len(queries)
    return {
        "search": timings,
        "cold_index_build": _percentiles(cold),
        "generation_check_ms": round(round_trip_ms, 3),
        "cached_index_bytes": documents.cache.nbytes,
    }


async def _timed_post(h: Harness, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    response = await h.client.post(path, json=body, headers=h.auth(USER))
    elapsed = time.perf_counter() - began
    if response.status_code != 200:
        raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
    out: dict[str, Any] = response.json()
    return elapsed, out


async def _serving(h: Harness, fed: str, sizes: Sizes, queries: list[str]) -> dict[str, Any]:
    retrieval = {"k": sizes.k}
    paths = {"score": f"/v1/federations/{fed}/score", "generate": f"/v1/federations/{fed}/generate"}

    def body(kind: str, text: str) -> dict[str, Any]:
        if kind == "score":
            return {"texts": [text]}
        return {"prompt": text, "max_new_tokens": sizes.new_tokens}

    out: dict[str, Any] = {}
    for kind, path in paths.items():
        await _timed_post(h, path, {**body(kind, queries[0]), "retrieval": retrieval})  # warm-up
        plain: list[float] = []
        augmented: list[float] = []
        context_tokens: list[int] = []
        retrieval_ms: list[float] = []
        for i in range(sizes.rounds):
            text = queries[i % len(queries)]
            first, second = (plain, augmented) if i % 2 == 0 else (augmented, plain)
            for samples in (first, second):
                extra = {"retrieval": retrieval} if samples is augmented else {}
                elapsed, result = await _timed_post(h, path, {**body(kind, text), **extra})
                samples.append(elapsed)
                if samples is augmented:
                    info = result["results"][0]["retrieval"] if kind == "score" else result["retrieval"]
                    context_tokens.append(info["context_tokens"])
                    retrieval_ms.append(float(result["timing"].get("retrieval_ms", 0.0)))
        out[kind] = {
            "none": _percentiles(plain),
            "retrieval": _percentiles(augmented),
            "retrieval_stage_ms_p50": round(float(np.percentile(retrieval_ms, 50)), 3),
            "context_tokens_mean": round(float(np.mean(context_tokens)), 1),
            "n": sizes.rounds,
        }
    return out


async def _run(sizes: Sizes) -> dict[str, Any]:
    load_start = round(os.getloadavg()[0], 2)
    say(f"[retrieval] in-memory index: {sizes.chunks} chunks, {sizes.queries} queries")
    index = await asyncio.to_thread(measure_index, sizes.chunks, sizes.queries, k=sizes.k)
    rng = np.random.default_rng(1)
    words = _words(1)
    texts = _windows(words, sizes.chunks, WINDOW_WORDS, rng)
    queries = _windows(words, sizes.queries, 12, rng)
    settings = PFISettings()
    redis = Redis.from_url(settings.redis())
    spec = FederationSpec(
        name=f"bench-rag-{uuid.uuid4().hex[:8]}",
        base_model=sizes.model,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
    )
    base = await asyncio.to_thread(load_model, sizes.model)
    try:
        await create(VersionStore(redis), spec, base)
        async with serving(
            settings, ServeSettings(), federation=spec.name, model_loader=loader_of(base)
        ) as h:
            documents = h.service.engine.documents
            say(f"[retrieval] store: writing {sizes.chunks} chunks for one user")
            began = time.perf_counter()
            await _fill(documents, spec.name, texts, rng)
            fill_s = time.perf_counter() - began
            say("[retrieval] store path: cold builds and searches")
            store = await _store_path(documents, spec.name, sizes, queries)
            store["write_s"] = round(fill_s, 3)
            say(
                f"[retrieval] serving: {sizes.rounds} rounds of score and generate, "
                "with and without retrieval"
            )
            overhead = await _serving(h, spec.name, sizes, queries)
            await documents.delete_all(spec.name, USER)
    finally:
        await drop(redis, spec.name)
        await redis.aclose()
    searched = store["search"]
    ratios = {
        "store_hybrid_p50_ms": searched["hybrid"]["p50_ms"],
        "store_hybrid_p99_ms": searched["hybrid"]["p99_ms"],
        "store_lexical_p50_ms": searched["lexical"]["p50_ms"],
        "store_vs_index_lexical_p50": round(
            searched["lexical"]["p50_ms"] / index["search"]["lexical"]["p50_ms"], 3
        ),
        "score_p50_retrieval_vs_none": round(
            overhead["score"]["retrieval"]["p50_ms"] / overhead["score"]["none"]["p50_ms"], 3
        ),
        "generate_p50_retrieval_vs_none": round(
            overhead["generate"]["retrieval"]["p50_ms"] / overhead["generate"]["none"]["p50_ms"], 3
        ),
    }
    return {
        "benchmark": NAME,
        "sizes": dataclasses.asdict(sizes),
        "load_avg_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "cpus": os.cpu_count(),
        "model": sizes.model,
        "chunk_embeddings": "random unit vectors written to the store; queries embedded by all-MiniLM-L6-v2",
        "index": index,
        "store": store,
        "serving": overhead,
        "ratios": ratios,
    }


def table(result: dict[str, Any]) -> str:
    sizes, index, store, serving_ = result["sizes"], result["index"], result["store"], result["serving"]
    lines = [
        f"private retrieval: one user with {sizes['chunks']} chunks, k={sizes['k']}, model {result['model']}",
        "",
    ]
    lines.append(f"{'path':<42}{'p50 ms':>10}{'p99 ms':>10}")
    embed = index["embed_query"]
    lines.append(f"{'embed one query (MiniLM)':<42}{embed['p50_ms']:>10}{embed['p99_ms']:>10}")
    for mode in MODES:
        row = index["search"][mode]
        lines.append(f"{'index alone: ' + mode:<42}{row['p50_ms']:>10}{row['p99_ms']:>10}")
    for mode in MODES:
        row = store["search"][mode]
        lines.append(f"{'store path: ' + mode:<42}{row['p50_ms']:>10}{row['p99_ms']:>10}")
    cold = store["cold_index_build"]
    lines.append(f"{'store cold: load + build index':<42}{cold['p50_ms']:>10}{cold['p99_ms']:>10}")
    for kind in ("score", "generate"):
        for variant in ("none", "retrieval"):
            row = serving_[kind][variant]
            lines.append(f"{kind + ' ' + variant:<42}{row['p50_ms']:>10}{row['p99_ms']:>10}")
    lines.append("")
    load = result["load_avg_1m"]
    lines.append(
        "store path = generation check in Redis + cached index + query embedding (not lexical) + search"
    )
    lines.append(f"machine: {result['cpus']} CPUs, load average {load['start']} -> {load['end']}")
    lines.append(
        f"generation check {store['generation_check_ms']} ms; embedding a history: "
        f"{index['embed_chunks_per_s']} chunks/s; context tokens (mean): score "
        f"{serving_['score']['context_tokens_mean']}, generate {serving_['generate']['context_tokens_mean']}"
    )
    lines.append("ratios:")
    for name, value in result["ratios"].items():
        lines.append(f"  {name} = {value}")
    return "\n".join(lines)


def run_retrieval_bench(
    json_out: bool = False,
    *,
    quick: bool = False,
    model: str = "tiny",
    out: str | Path | None = None,
    sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (i)-(iii), print the table (or JSON), write ``bench/results/retrieval[-<model>].json``."""
    if model not in MODELS:
        raise BenchError(f"unknown model {model!r}; one of {sorted(MODELS)}")
    chosen = dataclasses.replace(Sizes(), **QUICK) if quick else Sizes()
    chosen = dataclasses.replace(chosen, model=MODELS[model])
    if sizes:
        chosen = dataclasses.replace(chosen, **sizes)
    result = asyncio.run(_run(chosen))
    target = out or (None if model == "tiny" else result_path(f"{NAME}-{model}"))
    result["written_to"] = str(write_result(NAME, result, target))
    print(json.dumps(result, indent=2, default=str) if json_out else table(result))
    return result


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    parser.add_argument("--quick", action="store_true", help="2k chunks, fewer queries and rounds")
    parser.add_argument("--chunks", type=int, default=None, help="chunks of the user (default 10000)")
    parser.add_argument(
        "--model", choices=tuple(MODELS), default="tiny", help="served model of the overhead part"
    )
    parser.add_argument("--out", default=None, help="result file (default bench/results/retrieval.json)")


def _cli(args: argparse.Namespace) -> int:
    sizes = {"chunks": args.chunks} if args.chunks else None
    run_retrieval_bench(args.json, quick=args.quick, model=args.model, out=args.out, sizes=sizes)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "retrieval", help="private retrieval: search p50/p99 for a 10k-chunk user, score/generate overhead"
    )
    _add_arguments(parser)
    parser.set_defaults(func=_cli)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(
        prog="python -m bench.retrieval", description=(__doc__ or "").split("\n\n")[0]
    )
    _add_arguments(cli)
    raise SystemExit(_cli(cli.parse_args()))
