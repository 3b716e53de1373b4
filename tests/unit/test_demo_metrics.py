"""The demo's pure parts: causal retrieval queries, documents from a training text, and the per-user
perplexity summary (median reduction, shares improved / harmed, worst-10%)."""

from __future__ import annotations

import math

import pytest

from demo.evaluation import summarize
from demo.scoring import Score, causal_queries, documents


def test_a_query_is_the_text_before_its_chunk_never_the_chunk() -> None:
    train = " ".join(f"t{i}" for i in range(2000))
    chunks = [" ".join(f"c{j}x{i}" for i in range(50)) for j in range(4)]
    queries = causal_queries(train, chunks, tail_chars=200)
    assert len(queries) == len(chunks)
    assert train.endswith(queries[0])
    assert len(queries[0]) <= 200
    for i, query in enumerate(queries):
        assert chunks[i] not in query
        assert not any(word in query.split() for word in chunks[i].split())  # nothing of the scored text
        if i:
            assert chunks[i - 1].endswith(query)
    assert causal_queries("", ["a b c"]) == ["."]  # a query is never empty


def test_documents_cover_the_text_in_bounded_pieces() -> None:
    paragraphs = [f"paragraph {i} " + "word " * (i % 50) for i in range(300)]
    text = "\n\n".join(paragraphs)
    docs = documents(text, size=1000)
    assert all(0 < len(d) <= 1000 for d in docs)
    assert "\n\n".join(docs) == text  # cut at paragraph boundaries, nothing lost or added
    huge = "x" * 2500
    assert documents(huge, size=1000) == ["x" * 1000, "x" * 1000, "x" * 500]
    assert documents("  \n\n ") == []


def _scores(nll: dict[str, float]) -> dict[str, Score]:
    return {v: Score(n, 0.5, 100) for v, n in nll.items()}


def test_summary_per_user_perplexity_against_global() -> None:
    base = {"base": 4.0, "local": 3.9, "global": 3.5, "async_global": 3.5, "async_personalized": 3.4}
    deltas = {  # NLL change vs global per user: personalized, personalized_rag
        "u1": (-0.2, -0.4),
        "u2": (-0.1, -0.3),
        "u3": (0.0, -0.2),
        "u4": (0.05, 0.02),  # harmed: ppl +5.1% / +2.0%
    }
    per_user = {
        u: _scores(
            {
                **base,
                "personalized_ungated": 3.5 + p,
                "personalized": 3.5 + p,
                "global_rag": 3.5 + r - p,
                "personalized_rag": 3.5 + r,
            }
        )
        for u, (p, r) in deltas.items()
    }
    s = summarize(per_user)
    reductions = sorted(1 - math.exp(p) for p, _ in deltas.values())
    assert s["median_ppl_reduction_vs_global"]["personalized"] == pytest.approx(
        (reductions[1] + reductions[2]) / 2
    )
    assert s["share_users_improved"]["personalized"] == 0.5  # u3 is equal: not improved
    assert s["share_users_harmed"]["personalized"] == 0.25
    assert s["share_users_improved"]["personalized_rag"] == 0.75
    assert s["share_users_harmed"]["personalized_rag"] == 0.25
    assert s["worst10_ppl"]["personalized"] == pytest.approx(math.exp(3.55))  # the worst user (1 of 4)
    assert s["worst10_ppl"]["global"] == pytest.approx(math.exp(3.5))
    assert set(s["median_ppl_reduction_vs_global"]) == {
        "personalized_ungated",
        "personalized",
        "global_rag",
        "personalized_rag",
    }
    # unchanged meaning: relative reduction of the mean per-user NLL
    mean_p = sum(3.5 + p for p, _ in deltas.values()) / 4
    assert s["rel_gain_personalized_vs_global"] == pytest.approx((3.5 - mean_p) / 3.5)
