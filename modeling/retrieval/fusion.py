"""Reciprocal rank fusion (Cormack et al., 2009): ``score(d) = sum over rankings of 1 / (k + rank(d))``.

Ranks are 1-based; a document absent from a ranking gets nothing from it. Ties in the fused score go to
the lower document position, so the output is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

from modeling.retrieval.errors import RetrievalError

DEFAULT_RRF_K = 60


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], *, k: int = DEFAULT_RRF_K
) -> list[tuple[int, float]]:
    """``(position, fused score)`` for every position in any ranking, best first.

    A position repeated within one ranking counts once, at its best rank."""
    if k < 0:
        raise RetrievalError(f"the RRF constant k must be >= 0, got {k}")
    fused: dict[int, float] = {}
    for ranking in rankings:
        seen: set[int] = set()
        for rank, position in enumerate(ranking, start=1):
            if position in seen:
                continue
            seen.add(position)
            fused[position] = fused.get(position, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))
