"""Norm bounding and coordinate-wise robust aggregation of adapter deltas.

All functions are pure: inputs are never modified, outputs are fresh float32 tensors. Work is
vectorized per tensor (one ``torch.stack`` + ``sort`` per key); Python loops run over keys only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from modeling.lora import StateDict as StateDict  # re-exported: the one definition is modeling.lora's
from schemas.codec import state_l2_norm

MIN_TRIM = 1
"""The service's trimmed mean drops at least one update per side of every version of 3 or more."""


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of ``state``, accumulated in float64 (``inf``/``nan`` if a value is
    not finite): :func:`schemas.codec.state_l2_norm`, the one norm of PFI.

    The aggregator's validation (norm bound, finiteness), clipping and DP sensitivity all use it. In float64
    the sum of squares of finite float32 values cannot overflow (a float32 is at most 3.4e38, its square
    1.2e77, and no adapter has 1e231 values), so the norm is finite exactly when every value is: a finite
    value such as 1e20 is clipped, never an overflow in the merge.
    """
    return state_l2_norm(state)


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that brings a delta of L2 norm ``norm`` within ``max_norm`` (1.0 if already within)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip a delta with a non-finite norm ({norm})")
    return 1.0 if norm <= max_norm else max_norm / norm


def scaled(delta: Mapping[str, torch.Tensor], scale: float) -> StateDict:
    """``delta · scale`` as new float32 tensors, multiplied in float64: a tiny factor (``C / 1e40``) is not
    rounded to a float32 denormal, so the clipped norm is ``C`` to float32 precision."""
    if scale == 1.0:
        return {k: v.to(torch.float32, copy=True) for k, v in delta.items()}
    return {k: (v.to(torch.float64) * scale).to(torch.float32) for k, v in delta.items()}


def clip_to_norm(delta: StateDict, max_norm: float) -> tuple[StateDict, float, bool]:
    """Scale ``delta`` so that its global L2 norm is at most ``max_norm``.

    Returns ``(clipped, original_norm, was_clipped)``; ``clipped`` is always a new dict of new
    float32 tensors. Raises ``ValueError`` for a non-finite delta or a non-positive bound.
    """
    norm = l2_norm(delta)
    scale = clip_scale(norm, max_norm)
    return scaled(delta, scale), norm, scale < 1.0


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


def trim_count(n: int, trim_ratio: float, min_trim: int = 0) -> int:
    """How many values per side a trimmed mean of ``n`` drops: ``⌊trim_ratio·n⌋``, and at least
    ``min_trim`` when ``n >= 2·min_trim + 1`` (something must remain). The service passes ``min_trim=1``
    so that a timed-out flush of fewer than K updates still trims one per side (K is validated to trim
    at least one)."""
    k = math.floor(trim_ratio * n)
    if n >= 2 * min_trim + 1:
        k = max(k, min_trim)
    return k


def coordinate_trimmed_mean(deltas: Sequence[StateDict], trim_ratio: float, min_trim: int = 0) -> StateDict:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Drops the :func:`trim_count` smallest and as many largest values of each coordinate and averages the
    rest; if nothing would remain, falls back to :func:`coordinate_median`.
    """
    if not 0.0 <= trim_ratio < 1.0:
        raise ValueError(f"trim_ratio must be in [0, 1), got {trim_ratio}")
    keys = _common_keys(deltas)
    n = len(deltas)
    k = trim_count(n, trim_ratio, min_trim)
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


def trimmed_window(n: int, trim_ratio: float, min_trim: int = 0) -> int:
    """How many order statistics per coordinate a trimmed mean of ``n`` values averages (median: 1 or 2)."""
    k = trim_count(n, trim_ratio, min_trim)
    if n - 2 * k > 0:
        return n - 2 * k
    return 1 if n % 2 == 1 else 2
