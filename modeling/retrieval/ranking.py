"""Deterministic top-k over a score array: highest score first, ties broken by the lower position."""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int, *, min_score: float | None = None) -> list[tuple[int, float]]:
    """The best ``min(k, len(scores))`` ``(position, score)`` pairs; with ``min_score``, only scores above it.

    Uses a partial selection first, then keeps every element tied with the k-th score, so that which of
    several equal scores is returned never depends on the selection algorithm."""
    positions = np.arange(scores.shape[0])
    if min_score is not None:
        keep = scores > min_score
        positions, scores = positions[keep], scores[keep]
    n = int(scores.shape[0])
    if k <= 0 or n == 0:
        return []
    if k < n:
        threshold = np.partition(scores, n - k)[n - k]
        keep = scores >= threshold
        positions, scores = positions[keep], scores[keep]
    order = np.lexsort((positions, -scores))[:k]
    return [(int(positions[i]), float(scores[i])) for i in order]
