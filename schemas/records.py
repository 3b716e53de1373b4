"""Records PFI stores (in Redis) rather than streams: version metadata, federation status."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.events import StrictModel


class UpdateContribution(StrictModel):
    """One client update inside a global version, and how much it counted."""

    update_id: str
    client_id: str
    base_version: int
    staleness: int
    staleness_weight: float
    weight: float  # coefficient of its delta in the merge: s(τ)·n / Σn (1/K each under robust modes)
    num_samples: int
    norm: float  # L2 norm of the delta as received
    clipped: bool


class VersionMeta(StrictModel):
    """Metadata of a global adapter version; stored beside its immutable blob."""

    federation: str
    version: int = Field(ge=0)
    parent: int | None
    kind: Literal["init", "aggregate"]
    created_at: datetime
    digest: str  # sha256 of the stored blob
    size_bytes: int
    spec_fingerprint: str
    updates: tuple[UpdateContribution, ...] = ()
    lora_mode: str = "fedit"
    robust: str = "none"
    server_optimizer: str = "none"
    noise_std: float = 0.0
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    aggregation_seconds: float = 0.0

    @property
    def update_ids(self) -> list[str]:
        return [u.update_id for u in self.updates]
