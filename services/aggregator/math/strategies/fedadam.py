"""Adam on the server (``server_optimizer="adam"``; FedAdam, Reddi et al. 2021, Alg. 2).

``m = β1·m + (1-β1)·Δ``;  ``v = β2·v + (1-β2)·Δ²``;  ``global += η·m / (√v + ε)``, per coordinate
(``adam_beta1``, ``adam_beta2``, ``adam_eps`` = the paper's τ, ``η = server_lr``). No bias correction;
the moments start at zero, as in the paper's algorithm.

**Bound**: dividing per coordinate by ``√v`` lets a small ``Δ`` coordinate take a step of up to ``η``
whatever its size: no L2 bound in terms of the clipping norm holds (``inf``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from schemas.events import AggregationSpec


class FedAdam:
    """Adam's first and second moments on the pseudo-gradient."""

    name = "adam"
    buffers: tuple[str, ...] = ("m", "v")

    def validate(self, spec: AggregationSpec) -> None:
        """Any spec (the betas' and ε's ranges are the schema's)."""

    def step(
        self, delta: torch.Tensor, moments: Mapping[str, torch.Tensor | None], spec: AggregationSpec
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b1, b2 = spec.adam_beta1, spec.adam_beta2
        m_old, v_old = moments["m"], moments["v"]
        m = delta * (1.0 - b1) if m_old is None else torch.add(m_old * b1, delta, alpha=1.0 - b1)
        v = (
            delta * delta * (1.0 - b2)
            if v_old is None
            else torch.addcmul(v_old * b2, delta, delta, value=1.0 - b2)
        )
        return torch.div(m, v.sqrt().add_(spec.adam_eps)).mul_(spec.server_lr), {"m": m, "v": v}

    def bound(self, spec: AggregationSpec, step_bound: float) -> float:
        return math.inf
