"""Client-side privacy of the shared delta: L2 clipping and optional Gaussian noise (local DP).

:func:`privatize` first scales the whole delta (every tensor by one factor) so that its global L2 norm
is at most ``clip_norm``, then, when ``noise_multiplier > 0``, adds i.i.d. ``N(0, (noise_multiplier ·
clip_norm)²)`` noise to every coordinate: the Gaussian mechanism with sensitivity ``clip_norm``. The
update then carries ``DPMetadata(clip_norm, noise_multiplier)`` so the aggregator (and an auditor)
knows what was applied. Noise needs a clip bound (without one the sensitivity is unbounded).

Noise is drawn from a :class:`torch.Generator` seeded from the OS's CSPRNG unless a seed is given
(tests); the global torch RNG is never touched.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from modeling.lora import StateDict
from schemas.codec import state_l2_norm
from schemas.errors import ConfigError
from schemas.events import DPMetadata


@dataclass(frozen=True)
class PrivatizedDelta:
    """The delta to send and what was done to it. ``norm`` is the L2 norm before clipping."""

    delta: StateDict
    norm: float
    clipped: bool
    dp: DPMetadata | None

    @property
    def noise_std(self) -> float:
        return self.dp.noise_multiplier * self.dp.clip_norm if self.dp is not None else 0.0


def check_privacy_options(clip_norm: float | None, noise_multiplier: float) -> None:
    """Raise :class:`ConfigError` for an unusable combination."""
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"clip norm must be a finite number > 0, got {clip_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and clip_norm is None:
        raise ConfigError("DP noise needs a clip norm (the sensitivity of the Gaussian mechanism)")


def clip_delta(delta: Mapping[str, torch.Tensor], clip_norm: float | None) -> tuple[StateDict, float, bool]:
    """``(clipped copy, norm before, whether it was scaled)``: one factor for every tensor so the global
    L2 norm is at most ``clip_norm`` (``None``: no bound). Non-finite input is refused."""
    norm = state_l2_norm(delta)
    if not math.isfinite(norm):
        raise ConfigError("the delta holds NaN or Inf values (training diverged); not sending it")
    out = {k: v.detach().to(torch.float32).clone() for k, v in delta.items()}
    if clip_norm is None or norm <= clip_norm:
        return out, norm, False
    factor = clip_norm / norm
    for tensor in out.values():
        tensor.mul_(factor)
    return out, norm, True


def add_gaussian_noise(
    delta: Mapping[str, torch.Tensor], std: float, *, seed: int | None = None
) -> StateDict:
    """A copy of ``delta`` plus i.i.d. ``N(0, std²)`` noise on every coordinate."""
    if std < 0 or not math.isfinite(std):
        raise ConfigError(f"noise std must be a finite number >= 0, got {std}")
    gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    out: StateDict = {}
    for key, tensor in delta.items():
        base = tensor.detach().to(torch.float32)
        if std == 0:
            out[key] = base.clone()
        else:
            out[key] = base + std * torch.randn(base.shape, generator=gen, dtype=torch.float32)
    return out


def privatize(
    delta: Mapping[str, torch.Tensor],
    *,
    clip_norm: float | None,
    noise_multiplier: float = 0.0,
    seed: int | None = None,
) -> PrivatizedDelta:
    """Clip ``delta`` to ``clip_norm`` and add Gaussian noise of std ``noise_multiplier · clip_norm``."""
    check_privacy_options(clip_norm, noise_multiplier)
    clipped, norm, was_clipped = clip_delta(delta, clip_norm)
    if noise_multiplier == 0:
        return PrivatizedDelta(clipped, norm, was_clipped, None)
    assert clip_norm is not None  # check_privacy_options
    noisy = add_gaussian_noise(clipped, noise_multiplier * clip_norm, seed=seed)
    dp = DPMetadata(clip_norm=clip_norm, noise_multiplier=noise_multiplier)
    return PrivatizedDelta(noisy, norm, was_clipped, dp)
