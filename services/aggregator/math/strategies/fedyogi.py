"""Yogi on the server (``server_optimizer="yogi"``; FedYogi, Reddi et al. 2021, "Adaptive Federated
Optimization", ICLR, Alg. 2; Yogi itself: Zaheer et al. 2018).

``m = β1·m + (1-β1)·Δ``;  ``v = v - (1-β2)·Δ²·sign(v - Δ²)``;  ``global += η·m / (√v + τ)``, per coordinate
(``adam_beta1``, ``adam_beta2``, ``adam_eps`` = τ, ``η = server_lr``: the same knobs as FedAdam).

Adam's ``v`` forgets multiplicatively (``β2·v``), so one large ``Δ²`` is forgotten fast and the effective
step size jumps back up; Yogi's changes additively, by at most ``(1-β2)·Δ²`` per version, towards
``Δ²``, which Reddi et al. found more stable with heterogeneous clients. ``v`` stays ``>= 0``: when
``v > Δ²`` it decreases by ``(1-β2)·Δ² < Δ²``. The moments start at zero, like FedAdam's here (the
first step is then FedAdam's first step).

**Bound**: as for FedAdam, the per-coordinate division admits no L2 bound in terms of the clipping norm
(``inf``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from schemas.events import AggregationSpec


class FedYogi:
    """Yogi's additive second moment on the pseudo-gradient."""

    name = "yogi"
    buffers: tuple[str, ...] = ("m", "v")

    def validate(self, spec: AggregationSpec) -> None:
        """Any spec (the betas' and τ's ranges are the schema's)."""

    def step(
        self, delta: torch.Tensor, moments: Mapping[str, torch.Tensor | None], spec: AggregationSpec
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b1, b2 = spec.adam_beta1, spec.adam_beta2
        m_old, v_old = moments["m"], moments["v"]
        m = delta * (1.0 - b1) if m_old is None else torch.add(m_old * b1, delta, alpha=1.0 - b1)
        square = delta * delta
        if v_old is None:
            v_old = torch.zeros_like(square)
        v = torch.addcmul(v_old, square, torch.sign(v_old - square), value=-(1.0 - b2))
        return torch.div(m, v.sqrt().add_(spec.adam_eps)).mul_(spec.server_lr), {"m": m, "v": v}

    def bound(self, spec: AggregationSpec, step_bound: float) -> float:
        return math.inf
