"""No server optimizer (``server_optimizer="none"``): ``global += η·Δ`` (FedAvg, McMahan et al. 2017;
FedBuff, Nguyen et al. 2022), ``η = server_lr``.

**Bound**: one client moves the global by at most ``η`` times what it moves ``Δ`` by.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from schemas.events import AggregationSpec


class FedAvg:
    """The plain server step ``η·Δ``: no moment buffers."""

    name = "none"
    buffers: tuple[str, ...] = ()

    def validate(self, spec: AggregationSpec) -> None:
        """Any spec."""

    def step(
        self, delta: torch.Tensor, moments: Mapping[str, torch.Tensor | None], spec: AggregationSpec
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return delta * spec.server_lr, {}

    def bound(self, spec: AggregationSpec, step_bound: float) -> float:
        return spec.server_lr * step_bound
