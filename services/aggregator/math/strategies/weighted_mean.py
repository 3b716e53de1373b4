"""Weighted mean (``robust="none"``): FedBuff's ``Σ s(τ_i) n_i Δ_i / Σ n_i`` (Nguyen et al. 2022, Alg. 1).

The weights are the buffer's ``s(τ_i)·n_i / Σ n_j`` (``n_i = 1`` with ``weighting="uniform"``, the default;
the claim capped at ``max_num_samples`` with ``"samples"``): the staleness discount is absolute (K = 1 is
FedAsync's ``s(τ)·Δ``, Xie et al. 2019).

**Sensitivity** (zero-out adjacency, weights public, as in DP-FedAvg's fixed-denominator estimator,
McMahan et al. 2018): zeroing update ``j`` moves the result by ``w_j Δ_j / Σ n``, of norm at most
``C·max_i w_i / Σ n`` (:func:`services.aggregator.math.privacy.sensitivity` scaled by ``Σ w / Σ n``).

**Influence** (replace-one: a client's update, claims included, swapped for anything else). The step is
``(H + s_a n_a c_a) / (N + n_a)`` with ``H = Σ_{i≠a} s_i n_i c_i``, ``N = Σ_{i≠a} n_i``, ``||c_i|| <= C``.
Write it as ``h + λ·(x - h)`` with ``h = H/N`` (``||h|| <= C``), ``x = s_a c_a`` (``||x|| <= C``) and
``λ = n_a / (N + n_a)``. For two choices ``(λ, x)``, ``(λ', x')`` with ``λ >= λ'``:
``λ(x-h) - λ'(x'-h) = λ'(x - x') + (λ-λ')(x - h)``, of norm ``<= 2C·λ' + 2C·(λ-λ') = 2C·λ``. So the
bound is ``2·C·max_share`` where :func:`max_share` is the largest ``λ`` the client can get:

* ``weighting="uniform"``: ``n_i = 1``, ``max_share = r/n``;
* ``weighting="samples"``: ``n_a <= cap = max_num_samples`` and every other ``n_i >= 1``, so
  ``max_share = r·cap / (r·cap + n - r)``. With a large cap this is close to 1: a liar gets almost the
  whole version. That is why ``uniform`` is the default.

(``r = max_client_updates``: a client's r updates act as one of combined share ``r·n_a / (r·n_a + Σ
others)`` whose mean delta has norm ``<= C``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modeling.lora import StateDict
from schemas.codec import flat_view
from schemas.events import AggregationSpec
from services.aggregator.math.privacy import sensitivity
from services.aggregator.math.strategies.base import Combination


def max_share(spec: AggregationSpec, n: int) -> float:
    """The largest normalized weight one client's updates (``max_client_updates`` of them at most) can get
    together in a weighted-mean version of ``n`` updates."""
    if n < 1:
        raise ValueError(f"a version has at least one update, got {n}")
    r = min(spec.max_client_updates, n)
    if spec.weighting == "uniform":
        return r / n
    cap = spec.max_num_samples
    return r * cap / (r * cap + n - r)


def weighted_sum(global_state: StateDict, deltas: Sequence[StateDict], coefs: Sequence[float]) -> StateDict:
    """``Σ coefs_i · deltas_i`` in float32 over the keys some delta has (a missing key counts as zero).

    When every delta tiles one float32 buffer with the global's keys, in its order and shapes (what
    :func:`schemas.codec.decode_tensors` returns), the sum is one ``add_`` per delta over that buffer:
    the same float32 operations per value, in the same order, without a Python loop over keys."""
    fast = _flat_weighted_sum(global_state, deltas, coefs)
    if fast is not None:
        return fast
    out: StateDict = {}
    for key, ref in global_state.items():
        if not any(key in d for d in deltas):
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for d, c in zip(deltas, coefs, strict=True):
            if key in d:
                acc.add_(d[key].to(torch.float32), alpha=c)
        out[key] = acc
    return out


def _flat_weighted_sum(
    global_state: StateDict, deltas: Sequence[StateDict], coefs: Sequence[float]
) -> StateDict | None:
    if not deltas:
        return None
    layout = list(deltas[0])  # the deltas' common order (the global's may differ)
    if len(layout) != len(global_state) or any(
        k not in global_state or deltas[0][k].shape != global_state[k].shape for k in layout
    ):
        return None
    flats: list[torch.Tensor] = []
    for d in deltas:
        if list(d) != layout or any(d[k].shape != deltas[0][k].shape for k in layout):
            return None
        flat = flat_view(d)
        if flat is None:
            return None
        flats.append(flat)
    acc = torch.zeros(flats[0].numel(), dtype=torch.float32)
    for flat, c in zip(flats, coefs, strict=True):
        acc.add_(flat, alpha=c)
    views: StateDict = {}
    start = 0
    for key in layout:
        n = global_state[key].numel()
        views[key] = acc[start : start + n].view(global_state[key].shape)
        start += n
    return {key: views[key] for key in global_state}


class WeightedMean:
    """The FedBuff / FedAvg weighted mean of the clipped deltas."""

    name = "none"
    min_updates = 1

    def validate(self, spec: AggregationSpec) -> None:
        """Any spec: nothing to add to the schema's checks."""

    def combine(
        self,
        global_state: StateDict,
        deltas: Sequence[StateDict],
        raw_weights: Sequence[float],
        total: float,
        spec: AggregationSpec,
    ) -> Combination:
        weights = [w / total for w in raw_weights]
        return Combination(weighted_sum(global_state, deltas, weights), weights)

    def sensitivity(
        self, spec: AggregationSpec, clip: float, raw_weights: Sequence[float], total: float
    ) -> float:
        return sensitivity(clip, raw_weights) * sum(raw_weights) / total

    def influence(self, spec: AggregationSpec, n: int, clip: float) -> float:
        return 2.0 * clip * max_share(spec, n)
