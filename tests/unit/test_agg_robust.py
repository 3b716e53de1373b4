"""Clipping and coordinate-wise robust statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.aggregator.math.robust import (
    StateDict,
    clip_to_norm,
    coordinate_median,
    coordinate_trimmed_mean,
    l2_norm,
    trimmed_window,
)

KEYS = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 16),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (16, 4),
    "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": (4, 16),
}


def rand_state(gen: torch.Generator, scale: float = 1.0, offset: float = 0.0) -> StateDict:
    return {k: torch.randn(shape, generator=gen) * scale + offset for k, shape in KEYS.items()}


def snapshot(state: StateDict) -> StateDict:
    return {k: v.clone() for k, v in state.items()}


def assert_same(a: StateDict, b: StateDict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_l2_norm_is_global_over_all_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    s = rand_state(gen)
    flat = torch.cat([v.reshape(-1) for v in s.values()]).double()
    assert l2_norm(s) == pytest.approx(float(flat.norm()), rel=1e-6)
    assert l2_norm({}) == 0.0
    assert l2_norm({"x": torch.tensor([3.0, 4.0])}) == pytest.approx(5.0)


def test_clip_bounds_the_norm_and_keeps_direction() -> None:
    gen = torch.Generator().manual_seed(1)
    s = rand_state(gen, scale=10.0)
    before = snapshot(s)
    norm = l2_norm(s)
    clipped, original, was = clip_to_norm(s, 1.5)
    assert was
    assert original == pytest.approx(norm)
    assert l2_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    for k in s:
        torch.testing.assert_close(clipped[k], s[k] * (1.5 / norm))
        assert clipped[k].dtype == torch.float32
    assert_same(s, before)  # input untouched


def test_clip_within_bound_is_an_equal_copy() -> None:
    s = {"x": torch.tensor([3.0, 4.0])}
    out, norm, was = clip_to_norm(s, 5.0)
    assert not was
    assert norm == pytest.approx(5.0)
    assert torch.equal(out["x"], s["x"])
    assert out["x"].data_ptr() != s["x"].data_ptr()


def test_clip_refuses_non_finite_and_bad_bound() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        clip_to_norm({"x": torch.tensor([math.nan, 1.0])}, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_to_norm({"x": torch.tensor([math.inf, 1.0])}, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_to_norm({"x": torch.tensor([1.0])}, 0.0)


def test_median_matches_numpy_odd_and_even() -> None:
    gen = torch.Generator().manual_seed(2)
    for n in (1, 2, 5, 6):
        deltas = [rand_state(gen) for _ in range(n)]
        med = coordinate_median(deltas)
        for k in KEYS:
            ref = np.median(np.stack([d[k].numpy() for d in deltas]), axis=0)
            np.testing.assert_allclose(med[k].numpy(), ref, rtol=1e-6, atol=1e-7)


def test_trimmed_mean_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    deltas = [rand_state(gen) for _ in range(10)]
    before = [snapshot(d) for d in deltas]
    out = coordinate_trimmed_mean(deltas, 0.2)  # drop 2 low + 2 high per coordinate
    for k in KEYS:
        arr = np.sort(np.stack([d[k].numpy() for d in deltas]), axis=0)
        np.testing.assert_allclose(out[k].numpy(), arr[2:8].mean(axis=0), rtol=1e-5, atol=1e-6)
    for d, b in zip(deltas, before, strict=True):
        assert_same(d, b)


def test_trimmed_mean_zero_ratio_is_mean_and_fallback_is_median() -> None:
    gen = torch.Generator().manual_seed(4)
    deltas = [rand_state(gen) for _ in range(4)]
    plain = coordinate_trimmed_mean(deltas, 0.0)
    for k in KEYS:
        torch.testing.assert_close(plain[k], torch.stack([d[k] for d in deltas]).mean(0))
    # 2 values, ratio 0.5: trimming 1 + 1 leaves nothing -> the median (mean of the two)
    two = deltas[:2]
    fallback = coordinate_trimmed_mean(two, 0.5)
    assert_same(fallback, coordinate_median(two))
    assert trimmed_window(2, 0.5) == 2
    assert trimmed_window(3, 0.5) == 1
    assert trimmed_window(10, 0.2) == 6
    with pytest.raises(ValueError, match="trim_ratio"):
        coordinate_trimmed_mean(deltas, 1.0)


@pytest.mark.parametrize("robust", ["trimmed_mean", "median"])
def test_one_poisoned_update_cannot_drag_the_result(robust: str) -> None:
    gen = torch.Generator().manual_seed(5)
    clean = [rand_state(gen, scale=0.1, offset=1.0) for _ in range(6)]
    poisoned = {k: v * 100.0 for k, v in rand_state(gen, scale=0.1, offset=1.0).items()}
    deltas = [*clean, poisoned]
    out = coordinate_trimmed_mean(deltas, 0.15) if robust == "trimmed_mean" else coordinate_median(deltas)
    for k in KEYS:
        stack = torch.stack([d[k] for d in clean])
        # every coordinate stays within the range of the clean values
        assert bool((out[k] >= stack.min(0).values - 1e-6).all())
        assert bool((out[k] <= stack.max(0).values + 1e-6).all())
    mean = {k: torch.stack([d[k] for d in deltas]).mean(0) for k in KEYS}
    clean_mean = {k: torch.stack([d[k] for d in clean]).mean(0) for k in KEYS}
    err_robust = l2_norm({k: out[k] - clean_mean[k] for k in KEYS})
    err_mean = l2_norm({k: mean[k] - clean_mean[k] for k in KEYS})
    assert err_robust < 0.05 * err_mean


def test_mismatched_keys_or_shapes_raise() -> None:
    a = {"x": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="keys"):
        coordinate_median([a, {"y": torch.zeros(2, 2)}])
    with pytest.raises(ValueError, match="shape"):
        coordinate_trimmed_mean([a, {"x": torch.zeros(2, 3)}], 0.1)
    with pytest.raises(ValueError, match="at least one"):
        coordinate_median([])
