"""Partial aggregates: FedBuff split over leaves and a root, as pure math (no Kafka, Redis or asyncio).

Single-aggregator FedBuff makes a version from K buffered updates (:func:`~..math.fedbuff.aggregate`)::

    Δ = Σ_i s(τ_i) · n_i · clip(P(Δ_i)) / Σ_i n_i

(``P`` the LoRA-mode projection, ``n_i`` the effective sample count: 1 with uniform weighting, the claim
capped at ``max_num_samples`` otherwise, ``τ_i`` the distance from the update's base version to the
latest version along the lineage). ``s(τ_i)`` depends on the update only through its base version
``b_i``, so grouping the sum by base version::

    Δ = Σ_b s(τ_b) · S_b / Σ_b N_b,   S_b = Σ_{i: b_i = b} n_i · clip(P(Δ_i)),   N_b = Σ_{i: b_i = b} n_i

A **leaf** computes ``S_b`` and ``N_b`` of the updates it validated (:class:`PartialBuilder`); it needs no
version, so a partial stays valid whatever version exists when it reaches the root. The **root** sums
the groups of the partials it folds (:class:`Accumulation`) and applies the staleness discount against
*its* latest version (:func:`aggregate_partials`): the same ``s(τ)`` single FedBuff applies to the same
updates, so the result equals :func:`~..math.fedbuff.aggregate` over them up to the order of the float32
summation (tests/unit/test_hierarchy_partial.py compares both with a float64 reference).

DP: the weighted mean's sensitivity is ``C · max_i s(τ_i)·n_i / Σ n_i``
(:class:`~..math.strategies.weighted_mean.WeightedMean`); each group carries ``max_b = max n_i`` of its
updates, so the root computes the same value (``max_b s(τ_b)·max_b``) and adds the noise once, with the
same generator, in the same key order as :class:`~..math.strategies.gaussian_dp.GaussianDP`.
Robust combiners (order statistics) cannot be computed from sums: the spec refuses them with
``topology="hierarchical"`` (``schemas.events.AggregationSpec``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.fedbuff import AggregationResult, effective_samples
from services.aggregator.math.lora_modes import project_delta
from services.aggregator.math.privacy import add_gaussian_noise
from services.aggregator.math.robust import clip_scale, l2_norm, scaled
from services.aggregator.math.server_optimizer import ServerOptState, apply_server_update
from services.aggregator.math.staleness import from_spec


@dataclass(frozen=True)
class Contribution:
    """One update inside a partial (no tensors): what the version's metadata and the dedupe need."""

    update_id: str
    client_id: str
    base_version: int
    num_samples: int  # as claimed
    samples: int  # effective (the weight before staleness)
    norm: float  # of the projected delta, before clipping
    clipped: bool


@dataclass
class PartialGroup:
    """The updates of one base version in a partial: ``S_b``, ``N_b``, ``max n_i`` and their count."""

    base_version: int
    weighted_sum: StateDict  # float32, the keys some (projected) delta has
    samples: int = 0
    max_samples: int = 0
    count: int = 0

    def add(self, other: PartialGroup) -> None:
        """Fold ``other`` (same base version) into this group, in place."""
        if other.base_version != self.base_version:
            raise ValueError(f"cannot fold base version {other.base_version} into {self.base_version}")
        for key, tensor in other.weighted_sum.items():
            acc = self.weighted_sum.get(key)
            if acc is None:
                self.weighted_sum[key] = tensor.to(torch.float32, copy=True)
            else:
                if acc.shape != tensor.shape:
                    raise ValueError(f"shape of {key!r} differs between partials")
                acc.add_(tensor.to(torch.float32))
        self.samples += other.samples
        self.max_samples = max(self.max_samples, other.max_samples)
        self.count += other.count


@dataclass
class Partial:
    """A leaf's partial aggregate of one federation: groups by base version and the updates in them."""

    federation: str
    partial_id: str
    spec_fingerprint: str
    groups: dict[int, PartialGroup]
    contributions: list[Contribution]

    @property
    def count(self) -> int:
        return len(self.contributions)

    def clients(self) -> set[str]:
        return {c.client_id for c in self.contributions}


def bound_delta(delta: StateDict, spec: AggregationSpec) -> tuple[StateDict, float, bool]:
    """``(clip(P(delta)), norm of P(delta), clipped?)``: exactly :func:`~..math.fedbuff.aggregate`'s steps 1-2
    (float64 norm, float64 scale). ``ValueError`` for a non-finite delta."""
    projected = project_delta(delta, spec.lora_mode)
    norm = l2_norm(projected)
    if not math.isfinite(norm):
        raise ValueError("the delta has non-finite values")
    scale = 1.0 if spec.max_update_norm is None else clip_scale(norm, spec.max_update_norm)
    if scale < 1.0:
        return scaled(projected, scale), norm, True
    return projected, norm, False


class PartialBuilder:
    """Folds validated updates of one federation into a partial (a leaf's work; not thread-safe).

    ``shapes``: the federation's adapter tensors (a delta's keys were checked against them by validation).
    """

    def __init__(self, spec: AggregationSpec, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.spec = spec
        self.shapes = dict(shapes)
        self.groups: dict[int, PartialGroup] = {}
        self.contributions: list[Contribution] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self.contributions)

    def has(self, update_id: str) -> bool:
        return update_id in self._ids

    def client_count(self, client_id: str) -> int:
        return sum(1 for c in self.contributions if c.client_id == client_id)

    def add(
        self, update_id: str, client_id: str, base_version: int, num_samples: int, delta: StateDict
    ) -> None:
        """Bound ``delta`` and add ``n · delta`` to its base version's group. ``ValueError`` for a duplicate
        id, a key or shape the federation lacks, or a non-finite delta (nothing is changed then)."""
        if update_id in self._ids:
            raise ValueError(f"update {update_id!r} is already in this partial")
        for key, tensor in delta.items():
            if key not in self.shapes or tuple(tensor.shape) != self.shapes[key]:
                raise ValueError(
                    f"update {update_id!r}: tensor {key!r} does not fit the federation's adapter"
                )
        bounded, norm, clipped = bound_delta(delta, self.spec)
        n = effective_samples(num_samples, self.spec)
        group = self.groups.get(base_version)
        if group is None:
            group = self.groups[base_version] = PartialGroup(base_version, {})
        for key, tensor in bounded.items():
            acc = group.weighted_sum.get(key)
            if acc is None:
                acc = group.weighted_sum[key] = torch.zeros(self.shapes[key], dtype=torch.float32)
            acc.add_(tensor.to(torch.float32), alpha=float(n))
        group.samples += n
        group.max_samples = max(group.max_samples, n)
        group.count += 1
        self._ids.add(update_id)
        self.contributions.append(
            Contribution(update_id, client_id, base_version, num_samples, n, norm, clipped)
        )

    def build(self, federation: str, partial_id: str, spec_fingerprint: str) -> Partial:
        """The partial of everything added (the builder is left empty)."""
        partial = Partial(federation, partial_id, spec_fingerprint, self.groups, self.contributions)
        self.groups, self.contributions, self._ids = {}, [], set()
        return partial


@dataclass
class Accumulation:
    """What the root has folded for the next version: groups by base version and the contributions."""

    groups: dict[int, PartialGroup] = field(default_factory=dict)
    contributions: list[Contribution] = field(default_factory=list)
    partial_ids: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.contributions)

    def members(self) -> set[tuple[str, str]]:
        return {(c.client_id, c.update_id) for c in self.contributions}

    def clients(self) -> set[str]:
        return {c.client_id for c in self.contributions}

    def fold(self, partial: Partial) -> None:
        """Add a partial (its tensors are copied; the partial is not modified)."""
        for base, group in partial.groups.items():
            mine = self.groups.get(base)
            if mine is None:
                mine = self.groups[base] = PartialGroup(base, {})
            mine.add(group)
        self.contributions.extend(partial.contributions)
        self.partial_ids.append(partial.partial_id)


def stale_bases(groups: Iterable[int], lineage: Mapping[int, int]) -> list[int]:
    """Base versions no longer on the lineage (too stale, or rolled back): their updates cannot be folded."""
    return sorted(b for b in groups if b not in lineage)


def aggregate_partials(
    global_state: StateDict,
    acc: Accumulation,
    spec: AggregationSpec,
    lineage: Mapping[int, int],
    opt_state: ServerOptState | None = None,
    *,
    generator: torch.Generator | None = None,
) -> AggregationResult:
    """The version single FedBuff makes of the accumulated updates (see the module docstring).

    ``lineage``: version -> distance from the latest version (τ of a base version). Raises ``ValueError``
    for an empty accumulation, a base version off the lineage (drop it first: :func:`stale_bases`), a robust
    combiner, DP without a clipping bound, or a non-finite result."""
    if not acc.contributions:
        raise ValueError("cannot aggregate an empty accumulation")
    if spec.robust != "none":
        raise ValueError(f"robust={spec.robust!r} cannot be aggregated from partial sums")
    off = stale_bases(acc.groups, lineage)
    if off:
        raise ValueError(f"base versions {off} are not on the lineage")
    s = from_spec(spec)
    factor = {b: s(lineage[b]) for b in acc.groups}
    total = float(sum(g.samples for g in acc.groups.values()))
    if not total > 0 or not any(factor[b] * g.samples > 0 for b, g in acc.groups.items()):
        raise ValueError("aggregation weights sum to zero")
    pseudo: StateDict = {}
    for key, ref in global_state.items():
        parts = [(factor[b], g.weighted_sum[key]) for b, g in acc.groups.items() if key in g.weighted_sum]
        if not parts:
            continue
        out = torch.zeros(ref.shape, dtype=torch.float32)
        for f, tensor in parts:
            if tensor.shape != ref.shape:
                raise ValueError(f"shape of {key!r} {tuple(tensor.shape)} != {tuple(ref.shape)}")
            out.add_(tensor, alpha=f / total)
        pseudo[key] = out
    unknown = {k for g in acc.groups.values() for k in g.weighted_sum} - set(global_state)
    if unknown:
        raise ValueError(f"keys not in the global adapter: {sorted(unknown)[:3]}")
    noise_std = 0.0
    if spec.dp_noise_multiplier > 0:
        if spec.max_update_norm is None:
            raise ValueError("server DP noise needs max_update_norm (the clipping bound) to be set")
        top = max(factor[b] * g.max_samples for b, g in acc.groups.items())
        noise_std = spec.dp_noise_multiplier * spec.max_update_norm * top / total
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        pseudo = add_gaussian_noise(pseudo, noise_std, generator)
    new_global, step, new_state = apply_server_update(global_state, pseudo, spec, opt_state)
    if not all(bool(torch.isfinite(new_global[k]).all()) for k in step):
        raise ValueError("the merge produced non-finite values")
    contributions = acc.contributions
    return AggregationResult(
        new_global=new_global,
        applied_delta=step,
        weights={c.update_id: factor[c.base_version] * c.samples / total for c in contributions},
        staleness_weights={c.update_id: factor[c.base_version] for c in contributions},
        norms={c.update_id: c.norm for c in contributions},
        clipped=[c.update_id for c in contributions if c.clipped],
        opt_state=new_state,
        noise_std=noise_std,
        pseudo_gradient=pseudo,
    )
