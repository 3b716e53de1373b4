"""The simulated devices' heterogeneity, shared by both clocks (seeded, so runs repeat).

* **compute speed**: a factor ``m ~ lognormal(0, sigma)`` per client (:func:`speed_factor`);
* **network delay**: ``U(0, max)`` seconds per hop or per update;
* **availability** (wall clock): offline with probability ``dropout`` before a round, back after an
  exponential pause.

:class:`Device` is one client's profile on the wall clock (its own RNG stream); :class:`DeviceModel`
gives every client's device time per update on the virtual clock.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Protocol

from schemas.errors import ConfigError


def seeded_rng(*parts: object) -> random.Random:
    """An RNG seeded by ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def speed_factor(rng: random.Random, sigma: float) -> float:
    """How many times slower than nominal a device is: ``lognormal(0, sigma)``, 1 when ``sigma`` is 0."""
    return rng.lognormvariate(0.0, sigma) if sigma > 0 else 1.0


def train_seed(seed: int, round_index: int) -> int:
    """The training seed of a client's round ``round_index`` in a run seeded ``seed``."""
    return (seed * 1_000_003 + round_index) & 0x7FFFFFFF


def parse_speed_dist(text: str) -> float:
    """``lognormal:SIGMA`` gives SIGMA; ``constant`` (or ``lognormal:0``) gives 0."""
    if text.strip() == "constant":
        return 0.0
    kind, _, value = text.partition(":")
    if kind.strip() != "lognormal" or not value:
        raise ConfigError(f"speed distribution {text!r}: use lognormal:SIGMA (lognormal:0.5) or constant")
    try:
        sigma = float(value)
    except ValueError:
        raise ConfigError(f"speed distribution {text!r}: SIGMA must be a number") from None
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"speed distribution {text!r}: SIGMA must be >= 0")
    return sigma


@dataclass
class Device:
    """One client's device on the wall clock: its speed factor and its RNG (delays, dropouts)."""

    speed: float
    rng: random.Random

    @classmethod
    def build(cls, seed: int, index: int, sigma: float) -> Device:
        rng = seeded_rng("fleet", seed, index)
        return cls(speed_factor(rng, sigma), rng)

    def network_delay(self, max_s: float) -> float:
        return self.rng.uniform(0.0, max_s)

    def slowdown(self, train_s: float) -> float:
        """Extra seconds a round takes on this device beyond ``train_s`` measured on this machine."""
        return train_s * max(0.0, self.speed - 1.0)

    def offline(self, dropout: float, mean_s: float) -> float | None:
        """Seconds offline before this round (``None``: online)."""
        if dropout > 0 and self.rng.random() < dropout:
            return self.rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0
        return None


class DeviceConfig(Protocol):
    @property
    def seed(self) -> int: ...
    @property
    def speed_sigma(self) -> float: ...
    @property
    def steps(self) -> int: ...
    @property
    def step_seconds(self) -> float: ...
    @property
    def network_s(self) -> float: ...


@dataclass(frozen=True)
class DeviceModel:
    """Per-client speed factors and per-update device times (virtual seconds): client ``i``'s update
    in its round ``r`` takes ``m_i * steps * step_seconds + U(0, network_s)`` (the delay drawn from an
    RNG seeded by (seed, user, r), so every run sees the same delays)."""

    speeds: dict[str, float]
    steps: int
    step_seconds: float
    network_s: float
    seed: int

    @classmethod
    def build(cls, users: list[str], cfg: DeviceConfig) -> DeviceModel:
        speeds = {user: speed_factor(seeded_rng("speed", cfg.seed, user), cfg.speed_sigma) for user in users}
        return cls(speeds, cfg.steps, cfg.step_seconds, cfg.network_s, cfg.seed)

    def duration(self, user: str, round_index: int) -> float:
        delay = seeded_rng("network", self.seed, user, round_index).uniform(0.0, self.network_s)
        return self.speeds[user] * self.steps * self.step_seconds + delay
