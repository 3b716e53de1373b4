"""Retrieval latency for one user with many chunks: query embedding, dense, lexical and hybrid search.

``measure_index`` builds a :class:`~modeling.retrieval.HybridIndex` over ``chunks`` 64-word windows
of real text (Tiny Shakespeare when present, else a seeded synthetic Zipf text), then times
``queries`` searches of each kind. Query embeddings come from the real all-MiniLM-L6-v2; the chunk
embeddings are random unit vectors (embedding 10k chunks would take minutes on 2 cores and the
search cost does not depend on their values); what embedding a history costs is reported separately
as chunks/s on a batch of real chunks. Single-query embedding latency is timed on the first 50
queries (or as many as fit in 15 s; the searches use all of them), to keep the run short on a busy
machine.
``pfi bench retrieval`` calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from bench.common import SHAKESPEARE
from modeling.retrieval import HybridIndex, SearchMode, load_embedder

WINDOW_WORDS = 64
QUERY_WORDS = 12
EMBED_SAMPLE = 32  # real chunks embedded in one call: the history-embedding throughput
EMBED_QUERY_SAMPLES = 50  # single-query embedding latencies timed (the rest are embedded in batches)
EMBED_QUERY_BUDGET_S = 15.0  # ... or fewer (at least 5) when a loaded machine makes them slow


def _words(seed: int) -> list[str]:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8").split()
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    ranks = np.minimum(rng.zipf(1.3, size=200_000), len(vocab)) - 1
    return [vocab[int(r)] for r in ranks]


def _windows(words: list[str], count: int, size: int, rng: np.random.Generator) -> list[str]:
    starts = rng.integers(0, max(1, len(words) - size), size=count)
    return [" ".join(words[int(s) : int(s) + size]) for s in starts]


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def _timed(
    calls: Sequence[Callable[[], object]], budget_s: float | None = None, minimum: int = 5
) -> tuple[list[float], list[float]]:
    """Wall-clock and calling-thread CPU seconds of each call (CPU time does not grow when other
    processes take the cores: on a loaded machine it is the cost, the wall clock the latency)."""
    wall: list[float] = []
    cpu: list[float] = []
    for call in calls:
        start, start_cpu = time.perf_counter(), time.thread_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
        if budget_s is not None and len(wall) >= minimum and sum(wall) > budget_s:
            break
    return wall, cpu


def _with_cpu(timed: tuple[list[float], list[float]]) -> dict[str, float]:
    wall, cpu = timed
    return {**_percentiles(wall), "cpu_p50_ms": round(float(np.percentile(cpu, 50)) * 1000.0, 3)}


def measure_index(
    chunks: int = 10_000, queries: int = 200, *, k: int = 4, seed: int = 0, torch_threads: int | None = None
) -> dict[str, Any]:
    """p50/p99 latency (ms) of embedding a query and of dense, lexical and hybrid search over ``chunks``.

    ``torch_threads``: torch's intra-op threads during the run (restored after); None leaves them as
    they are. On a loaded machine 1 thread embeds far faster than 2 (threads spin on busy cores)."""
    previous = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        return _measure(chunks, queries, k, seed)
    finally:
        torch.set_num_threads(previous)


def _measure(chunks: int, queries: int, k: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    words = _words(seed)
    texts = _windows(words, chunks, WINDOW_WORDS, rng)
    query_texts = _windows(words, queries, QUERY_WORDS, rng)
    embedder = load_embedder()
    embedder.embed(query_texts[:2])  # warm-up: model load and first-call allocations are not query latency

    vectors = rng.standard_normal((chunks, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    start = time.perf_counter()
    index = HybridIndex(texts, vectors)
    build_s = time.perf_counter() - start

    sample = texts[:EMBED_SAMPLE]
    start = time.perf_counter()
    embedder.embed(sample)
    embed_chunks_s = time.perf_counter() - start

    singles = [partial(embedder.embed, [q]) for q in query_texts[:EMBED_QUERY_SAMPLES]]
    embed_timed = _timed(singles, budget_s=EMBED_QUERY_BUDGET_S)
    pairs = list(zip(query_texts, embedder.embed(query_texts), strict=True))

    def searches(mode: SearchMode) -> list[Callable[[], object]]:
        return [partial(index.search, q, v, k, mode) for q, v in pairs]

    searches("hybrid")[0]()  # warm-up
    modes: tuple[SearchMode, ...] = ("dense", "lexical", "hybrid")
    timings = {mode: _with_cpu(_timed(searches(mode))) for mode in modes}
    # with one torch thread the whole embedding runs on this thread, so its CPU time is the cost
    embed_query = _with_cpu(embed_timed) if torch.get_num_threads() == 1 else _percentiles(embed_timed[0])
    return {
        "benchmark": "retrieval_index",
        "chunks": chunks,
        "queries": queries,
        "k": k,
        "embedder": embedder.name,
        "corpus": "tinyshakespeare windows" if SHAKESPEARE.is_file() else "synthetic zipf",
        "chunk_embeddings": "random unit vectors (search cost does not depend on their values)",
        "index_build_s": round(build_s, 3),
        "embed_chunks_per_s": round(EMBED_SAMPLE / embed_chunks_s, 1),
        "embed_history_s_estimate": round(chunks * embed_chunks_s / EMBED_SAMPLE, 1),
        "torch_threads": torch.get_num_threads(),
        "embed_query": {**embed_query, "samples": len(embed_timed[0])},
        "search": timings,
        "ratios": {
            "hybrid_p50_vs_embed_query_p50": round(timings["hybrid"]["p50_ms"] / embed_query["p50_ms"], 4),
            "hybrid_p50_vs_dense_p50": round(timings["hybrid"]["p50_ms"] / timings["dense"]["p50_ms"], 3),
        },
    }


def main() -> None:  # pragma: no cover - manual run: python -m bench.retrieval_index
    import json

    print(json.dumps(measure_index(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
