"""Server-side Gaussian mechanism on the aggregated delta and its RDP accountant.

Sensitivity (what :func:`sensitivity` implements). Every client delta is clipped to L2 norm ``C``
(``max_update_norm``) before aggregation. Neighbouring buffers differ in one update whose delta is
replaced by the zero delta ("zero-out" adjacency, as in DP-FedAvg's fixed-denominator estimator,
McMahan et al. 2018); the aggregation weights are treated as public and fixed. Then:

* weighted mean ``Δ = Σ w_i Δ_i / Σ w_i``: zeroing update ``j`` moves ``Δ`` by ``w_j Δ_j / Σ w``,
  of norm ≤ ``C·max_i w_i / Σ_i w_i`` (uniform weights: ``C / n``);
* coordinate-wise trimmed mean averaging a window of ``m`` order statistics (median: ``m`` = 1 or 2):
  changing one input value moves every order statistic in the same direction by amounts summing to
  the change, so each coordinate moves by at most ``|x_j,c| / m`` and ``Δ`` by ≤ ``C / m``.

Under replace-one adjacency (an update swapped for any other clipped one) every bound doubles.
The noise std is ``noise_multiplier · sensitivity``, so each released version is a Gaussian mechanism
with multiplier ``sigma = noise_multiplier``, whose Rényi DP at order ``alpha`` is
``alpha / (2 sigma²)`` (Mironov 2017). Versions compose additively in RDP; no subsampling amplification is
claimed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from modeling.lora import StateDict

DEFAULT_ORDERS: tuple[float, ...] = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""The usual RDP order grid (as in TF-Privacy / Opacus)."""


def sensitivity(clip_norm: float, weights: Sequence[float]) -> float:
    """L2 sensitivity of the weighted mean of clipped deltas: ``clip_norm · max_i w_i / Σ_i w_i``."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("weights must be non-empty, non-negative, with a positive sum")
    return clip_norm * max(weights) / sum(weights)


def robust_sensitivity(clip_norm: float, window: int) -> float:
    """L2 sensitivity of a coordinate-wise trimmed mean/median averaging ``window`` order statistics."""
    if not clip_norm > 0 or window < 1:
        raise ValueError(f"need clip_norm > 0 and window >= 1, got {clip_norm}, {window}")
    return clip_norm / window


def add_gaussian_noise(delta: StateDict, std: float, generator: torch.Generator) -> StateDict:
    """``delta`` plus i.i.d. N(0, std²) noise on every coordinate (new float32 tensors)."""
    if not std >= 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    out: StateDict = {}
    for key, tensor in delta.items():
        t = tensor.to(torch.float32, copy=True)
        if std > 0:
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32, device=t.device)
            t.add_(noise, alpha=std)
        out[key] = t
    return out


class RdpAccountant:
    """Rényi-DP accountant of the (non-subsampled) Gaussian mechanism composed over versions."""

    def __init__(self, orders: Iterable[float] = DEFAULT_ORDERS) -> None:
        self.orders: tuple[float, ...] = tuple(float(a) for a in orders)
        if not self.orders or min(self.orders) <= 1.0:
            raise ValueError("RDP orders must be non-empty and > 1")
        self.rdp: list[float] = [0.0] * len(self.orders)
        self.steps = 0

    def step(self, noise_multiplier: float, count: int = 1) -> None:
        """Account ``count`` releases with noise std = ``noise_multiplier`` x sensitivity.

        A multiplier of 0 (no noise) makes every order's RDP, and so ε, infinite.
        """
        if noise_multiplier < 0 or count < 0:
            raise ValueError(f"need noise_multiplier >= 0 and count >= 0, got {noise_multiplier}, {count}")
        if count == 0:
            return
        for i, alpha in enumerate(self.orders):
            per_step = math.inf if noise_multiplier == 0 else alpha / (2.0 * noise_multiplier**2)
            self.rdp[i] += count * per_step
        self.steps += count

    def epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """``(ε, alpha*)``: ``ε = min_alpha RDP(alpha) + log(1/δ)/(alpha-1)`` and the minimizing order.

        ε is 0 (and the order NaN) before any step.
        """
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if self.steps == 0:
            return 0.0, math.nan
        candidates = [
            r + math.log(1.0 / delta) / (a - 1.0) for a, r in zip(self.orders, self.rdp, strict=True)
        ]
        best = min(range(len(candidates)), key=candidates.__getitem__)
        return candidates[best], self.orders[best]

    def epsilon(self, delta: float) -> float:
        """The ε of (ε, δ)-DP spent so far."""
        return self.epsilon_and_order(delta)[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (an infinite RDP is written as the string ``"inf"``)."""
        return {
            "orders": list(self.orders),
            "rdp": [r if math.isfinite(r) else "inf" for r in self.rdp],
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RdpAccountant:
        """Inverse of :meth:`to_dict`."""
        acc = cls(orders=data["orders"])
        rdp = [float(r) for r in data["rdp"]]
        if len(rdp) != len(acc.orders):
            raise ValueError("rdp and orders differ in length")
        acc.rdp = rdp
        acc.steps = int(data["steps"])
        return acc
