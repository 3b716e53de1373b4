"""Client-side clipping and Gaussian noise of the shared delta (local DP)."""

from __future__ import annotations

import math

import pytest
import torch

from clients.agent import AgentOptions
from clients.privacy import add_gaussian_noise, clip_delta, privatize
from schemas.codec import state_l2_norm
from schemas.errors import ConfigError
from schemas.events import DPMetadata


def _delta(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.0.lora_A.weight": torch.randn(4, 64, generator=gen) * scale,
        "layer.0.lora_B.weight": torch.randn(64, 4, generator=gen) * scale,
        "layer.1.lora_A.weight": torch.randn(4, 64, generator=gen) * scale,
    }


@pytest.mark.parametrize("scale", [0.001, 0.1, 10.0, 1000.0])
@pytest.mark.parametrize("clip", [0.5, 3.0])
def test_clip_bounds_the_global_norm_and_keeps_direction(scale: float, clip: float) -> None:
    delta = _delta(scale)
    norm = state_l2_norm(delta)
    out, before, clipped = clip_delta(delta, clip)
    assert before == pytest.approx(norm)
    assert state_l2_norm(out) <= clip * (1 + 1e-6)
    assert clipped == (norm > clip)
    factor = min(1.0, clip / norm)
    for key in delta:  # one factor for all tensors: the direction is kept
        assert torch.allclose(out[key], delta[key] * factor, rtol=1e-5, atol=1e-12)
    assert all(not torch.equal(out[k], delta[k]) for k in delta) or not clipped
    assert all(out[k] is not delta[k] for k in delta)  # never in place


def test_no_clip_bound_and_exact_bound() -> None:
    delta = _delta(1.0)
    out, norm, clipped = clip_delta(delta, None)
    assert not clipped
    assert state_l2_norm(out) == pytest.approx(norm)
    out, _, clipped = clip_delta(delta, norm)  # exactly at the bound: untouched
    assert not clipped
    assert all(torch.equal(out[k], delta[k]) for k in delta)


def test_non_finite_delta_is_refused() -> None:
    delta = _delta(1.0)
    delta["layer.0.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN or Inf"):
        clip_delta(delta, 1.0)


def test_noise_std_matches_multiplier_times_clip() -> None:
    zeros = {"a": torch.zeros(200, 200), "b": torch.zeros(50_000)}
    noisy = add_gaussian_noise(zeros, 0.3, seed=1)
    values = torch.cat([v.flatten() for v in noisy.values()])
    assert values.mean().abs() < 0.01
    assert values.std().item() == pytest.approx(0.3, rel=0.02)
    # Seeded: reproducible; unseeded: from the OS CSPRNG, so two draws differ.
    assert torch.equal(add_gaussian_noise(zeros, 0.3, seed=1)["a"], noisy["a"])
    assert not torch.equal(add_gaussian_noise(zeros, 0.3)["a"], add_gaussian_noise(zeros, 0.3)["a"])


def test_privatize_clips_then_adds_noise_and_records_metadata() -> None:
    delta = _delta(10.0)
    out = privatize(delta, clip_norm=2.0, noise_multiplier=0.5, seed=7)
    assert out.dp == DPMetadata(mechanism="gaussian", clip_norm=2.0, noise_multiplier=0.5)
    assert out.noise_std == pytest.approx(1.0)
    assert out.clipped
    assert out.norm == pytest.approx(state_l2_norm(delta))
    clipped, _, _ = clip_delta(delta, 2.0)
    noise = torch.cat([(out.delta[k] - clipped[k]).flatten() for k in delta])
    assert noise.std().item() == pytest.approx(1.0, rel=0.1)
    n = noise.numel()  # the noisy delta's norm is about sqrt(clip^2 + n * std^2)
    assert state_l2_norm(out.delta) == pytest.approx(math.sqrt(4.0 + n), rel=0.1)


def test_privatize_without_noise_has_no_dp_metadata() -> None:
    out = privatize(_delta(10.0), clip_norm=1.0)
    assert out.dp is None
    assert out.noise_std == 0.0
    assert state_l2_norm(out.delta) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    ("clip", "noise"), [(None, 1.0), (0.0, 0.0), (-1.0, 0.0), (1.0, -0.1), (float("inf"), 0.0)]
)
def test_bad_options_are_refused(clip: float | None, noise: float) -> None:
    with pytest.raises(ConfigError):
        privatize(_delta(1.0), clip_norm=clip, noise_multiplier=noise)
    with pytest.raises(ConfigError):
        AgentOptions(clip_norm=clip, noise_multiplier=noise)
