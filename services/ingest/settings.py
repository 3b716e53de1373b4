"""``PFI_INGEST_*``: limits of the HTTPS ingest route (per serving replica)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class IngestSettings(BaseSettings):
    """Per-client and process-wide limits of ``POST /v1/federations/{fed}/updates``."""

    model_config = SettingsConfigDict(env_prefix="PFI_INGEST_", extra="ignore")

    client_in_flight: int = Field(default=4, ge=1, description="requests of one client handled at once")
    total_in_flight: int = Field(
        default=64, ge=1, description="requests handled at once by this replica (bounds body memory)"
    )
    client_bytes_per_s: float = Field(default=4 * MIB, gt=0, description="sustained upload rate per client")
    client_burst_bytes: int = Field(
        default=64 * MIB, ge=1024, description="bytes a client may send at once (token bucket size)"
    )
    max_tracked_clients: int = Field(default=100_000, ge=1, description="quota buckets kept (LRU)")
    produce_timeout_s: float = Field(default=15.0, gt=0, description="Kafka acknowledgement wait -> 503")
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After of a 503 (Kafka unavailable)")
    dedupe_ttl_s: int = Field(
        default=6 * 3600,
        ge=60,
        description="how long a stored message is remembered: a retry within it is answered, not produced",
    )
