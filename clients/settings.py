"""The edge SDK's settings: environment variables with the ``PFI_EDGE_`` prefix (pydantic-settings).

Everything a device needs and nothing of the server's: where it keeps its state, which service it
talks to, how it gets its credential (an enrollment token, once), what it does to its delta, how it
queues and retries, and its training defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


def default_home() -> Path:
    """``$PFI_HOME`` (the same home as the local stack on a developer machine), else ``~/.pfi``."""
    home = os.environ.get("PFI_HOME")
    return Path(home) if home else Path.home() / ".pfi"


class EdgeSettings(BaseSettings):
    """Edge agents: ``pfi edge run | flush`` (env prefix ``PFI_EDGE_``)."""

    model_config = SettingsConfigDict(env_prefix="PFI_EDGE_", extra="ignore")

    state_dir: Path | None = Field(
        default=None,
        description="credentials, personal adapters and outboxes; unset: <PFI_HOME>/edge (~/.pfi/edge)",
    )
    # -- the service and the device's credential ---------------------------------------------------
    service_url: str | None = Field(
        default=None, description="the personalization service (spec, global adapter, enrollment, ingest)"
    )
    enrollment_token: str | None = Field(
        default=None, description="pfe1... token an admin issued: used once to enroll and get a credential"
    )
    credential: Path | None = Field(
        default=None,
        description="credential file to use (unset: <state_dir>/<federation>/<client>/credential.json)",
    )
    token_refresh_before_s: float = Field(
        default=300.0, ge=0, description="refresh the device token this long before it expires"
    )
    http_timeout_s: float = Field(default=30.0, gt=0, description="per HTTP request to the service")
    # -- what a delta goes through ------------------------------------------------------------------
    clip_norm: float | None = Field(
        default=10.0, gt=0, description="L2 bound of the shared delta a client sends (unset: no clip)"
    )
    noise_multiplier: float = Field(
        default=0.0, ge=0, description="local DP: Gaussian noise std = noise_multiplier x clip_norm"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(default="float16", description="wire dtype")
    int8: bool = Field(default=False, description="int8-quantize the delta (overrides dtype)")
    chunk_bytes: int = Field(
        default=1 * MIB, ge=1024, description="an update larger than this travels as signed chunks"
    )
    # -- outbox and retries -------------------------------------------------------------------------
    outbox_max_bytes: int = Field(default=256 * MIB, ge=1024)
    outbox_max_items: int = Field(default=1000, ge=1)
    send_timeout_s: float = Field(default=30.0, gt=0, description="per update, before it stays queued")
    retry_initial_s: float = Field(default=0.5, gt=0, description="first back-off after a failed send")
    retry_max_s: float = Field(default=30.0, gt=0, description="longest back-off between send attempts")
    flush_timeout_s: float = Field(default=60.0, ge=0, description="draining the outbox at exit")
    # -- training -----------------------------------------------------------------------------------
    steps: int = Field(default=20, ge=0)
    batch_size: int = Field(default=8, ge=1)
    seq_len: int = Field(default=128, ge=2)
    lr: float = Field(default=5e-3, gt=0)
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1)
    personalize_steps: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="after its rounds, `pfi edge run` fits the personal adapter against the latest global "
        "for this many steps, chooses its gate on the user's own validation text and uploads it "
        "(clients.personalize; 0: off, it costs about as much as a round)",
    )
    personalize_lr: float = Field(default=4e-3, gt=0, le=1.0, description="learning rate of that step")

    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else default_home() / "edge"
