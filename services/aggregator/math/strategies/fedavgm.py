"""Server momentum (``server_optimizer="momentum"``; FedAvgM, Hsu et al. 2019).

``m = β·m + Δ``;  ``global += η·m`` (``β = momentum``, ``η = server_lr``; ``m`` starts at ``Δ``).

**Bound**: a difference in one ``Δ`` stays in ``m`` and is applied again, scaled by ``β`` each version:
over all later versions it adds up to at most ``η·bound / (1 - β)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from schemas.events import AggregationSpec


class FedAvgM:
    """Heavy-ball momentum on the pseudo-gradient."""

    name = "momentum"
    buffers: tuple[str, ...] = ("m",)

    def validate(self, spec: AggregationSpec) -> None:
        """Any spec (``0 <= momentum < 1`` is the schema's)."""

    def step(
        self, delta: torch.Tensor, moments: Mapping[str, torch.Tensor | None], spec: AggregationSpec
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m_old = moments["m"]
        m = delta.clone() if m_old is None else torch.add(delta, m_old, alpha=spec.momentum)
        return m * spec.server_lr, {"m": m}

    def bound(self, spec: AggregationSpec, step_bound: float) -> float:
        bound = spec.server_lr * step_bound
        bound /= 1.0 - spec.momentum
        return bound
