"""Norm bounding and coordinate-wise robust aggregation of adapter deltas.

All functions are pure: inputs are never modified, outputs are fresh float32 tensors. Work is
vectorized per tensor (one ``torch.stack`` + ``sort`` per key); Python loops run over keys only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

StateDict = dict[str, torch.Tensor]
"""Float tensors keyed like a PEFT adapter state dict (``...q_proj.lora_A.weight``)."""


def l2_norm(state: StateDict) -> float:
    """Global L2 norm over all tensors of ``state`` (``inf``/``nan`` if a value is not finite)."""
    total = 0.0
    for tensor in state.values():
        n = float(torch.linalg.vector_norm(tensor, dtype=torch.float32))
        total += n * n
    return math.sqrt(total)


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that brings a delta of L2 norm ``norm`` within ``max_norm`` (1.0 if already within)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip a delta with a non-finite norm ({norm})")
    return 1.0 if norm <= max_norm else max_norm / norm


def clip_to_norm(delta: StateDict, max_norm: float) -> tuple[StateDict, float, bool]:
    """Scale ``delta`` so that its global L2 norm is at most ``max_norm``.

    Returns ``(clipped, original_norm, was_clipped)``; ``clipped`` is always a new dict of new
    float32 tensors. Raises ``ValueError`` for a non-finite delta or a non-positive bound.
    """
    norm = l2_norm(delta)
    scale = clip_scale(norm, max_norm)
    if scale == 1.0:
        return {k: v.to(torch.float32, copy=True) for k, v in delta.items()}, norm, False
    return {k: v.to(torch.float32) * scale for k, v in delta.items()}, norm, True


def _stacked(deltas: Sequence[StateDict], key: str) -> torch.Tensor:
    return torch.stack([d[key].to(torch.float32) for d in deltas])


def _common_keys(deltas: Sequence[StateDict]) -> list[str]:
    if not deltas:
        raise ValueError("need at least one delta")
    keys = list(deltas[0])
    expected = set(keys)
    for i, d in enumerate(deltas[1:], start=1):
        if set(d) != expected:
            raise ValueError(f"delta {i} has other keys than delta 0: {sorted(set(d) ^ expected)[:5]}")
        for key in keys:
            if d[key].shape != deltas[0][key].shape:
                raise ValueError(f"delta {i}: shape of {key!r} {tuple(d[key].shape)} differs from delta 0")
    return keys


def _sorted_median(ordered: torch.Tensor) -> torch.Tensor:
    n = ordered.shape[0]
    mid = n // 2
    if n % 2 == 1:
        return ordered[mid].clone()
    return (ordered[mid - 1] + ordered[mid]) * 0.5


def coordinate_median(deltas: Sequence[StateDict]) -> StateDict:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    out: StateDict = {}
    for key in _common_keys(deltas):
        out[key] = _sorted_median(torch.sort(_stacked(deltas, key), dim=0).values)
    return out


def coordinate_trimmed_mean(deltas: Sequence[StateDict], trim_ratio: float) -> StateDict:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Drops the ``⌊trim_ratio·n⌋`` smallest and the as many largest values of each coordinate and
    averages the rest; if nothing would remain, falls back to :func:`coordinate_median`.
    """
    if not 0.0 <= trim_ratio < 1.0:
        raise ValueError(f"trim_ratio must be in [0, 1), got {trim_ratio}")
    keys = _common_keys(deltas)
    n = len(deltas)
    k = math.floor(trim_ratio * n)
    if n - 2 * k <= 0:
        return coordinate_median(deltas)
    out: StateDict = {}
    for key in keys:
        stacked = _stacked(deltas, key)
        if k == 0:
            out[key] = stacked.mean(dim=0)
        else:
            out[key] = torch.sort(stacked, dim=0).values[k : n - k].mean(dim=0)
    return out


def trimmed_window(n: int, trim_ratio: float) -> int:
    """How many order statistics per coordinate a trimmed mean of ``n`` values averages (median: 1 or 2)."""
    k = math.floor(trim_ratio * n)
    if n - 2 * k > 0:
        return n - 2 * k
    return 1 if n % 2 == 1 else 2
