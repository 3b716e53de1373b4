"""FedBuff (Nguyen et al. 2022): merge a buffer of K client deltas into the next global adapter.

``global += η · Σ s(τ_i) n_i Δ_i / Σ n_i``, with, in order:

1. projection of each delta by the LoRA mode (``ffa`` drops ``lora_A``: see :mod:`.lora_modes`);
2. per-update L2 clipping to ``max_update_norm`` when set (the service itself rejects over-norm
   updates when ``norm_policy == "reject"``; here they are just clipped);
3. coefficients ``w_i = s(τ_i)·n_i / Σ n_j`` (``n = 1`` with ``weighting == "uniform"``, the default;
   with ``"samples"``, ``n_i`` is the claimed count capped at ``max_num_samples``), combined by the
   spec's combiner (``robust``: see :mod:`.strategies`). The weighted mean uses them; the robust options
   (``trimmed_mean``/``median``) are coordinate-wise statistics of the clipped deltas that **ignore the
   weights** (staleness and sample counts cannot be honoured by an order statistic without letting a
   liar inflate its influence); ``weights`` then reports ``1/K`` each. The trimmed mean drops at least
   one update per side (``min_trim=1``) whatever the buffer's size;
4. optional server Gaussian noise, std = ``dp_noise_multiplier · sensitivity`` of that combiner (the
   :class:`~.strategies.gaussian_dp.GaussianDP` wrapper; see :mod:`.privacy`);
5. the server optimizer (``server_optimizer``: ``none``/``momentum``/``adam``/``yogi``, see
   :mod:`.strategies`) with ``server_lr`` = η.

ARCHITECTURE.md first wrote the denominator as ``Σ s(τ_i) n_i``. That normalizes the discount
away: with K = 1 the weight is 1 whatever τ, so "K = 1 is FedAsync" would not hold (FedAsync mixes
with ``η·s(τ)``), and a buffer of uniformly stale updates would move the global as far as a fresh
one. Dividing by ``Σ n_i`` keeps the discount absolute: K = 1 gives FedAsync's ``η·s(τ)·Δ`` and equal
sample counts give FedBuff's ``(η/K)·Σ s(τ_i)·Δ_i`` (Nguyen et al. 2022, Alg. 1).

Norms are float64 (:func:`.robust.l2_norm`, the same norm validation uses) and clipping multiplies in
float64 (:func:`.robust.scaled`), so a finite delta always clips to a finite one of norm ``C``; a result
that is still not finite raises ``ValueError`` (the service then isolates the update that causes it).
How far one client can move the global under a spec: :mod:`.bounds`.

A key absent from a delta counts as a zero delta for that key; a key absent from every delta
(e.g. ``lora_A`` under FFA) is left untouched in the global. Inputs are never modified.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.lora_modes import project_delta
from services.aggregator.math.robust import clip_scale, l2_norm, scaled
from services.aggregator.math.server_optimizer import ServerOptState, apply_server_update
from services.aggregator.math.staleness import from_spec
from services.aggregator.math.strategies import combiner_for


@dataclass(frozen=True)
class BufferedUpdate:
    """One validated client delta waiting in the buffer."""

    update_id: str
    client_id: str
    delta: StateDict
    num_samples: int
    staleness: int
    # The L2 norm of the projected delta (:func:`.robust.l2_norm` of ``project_delta(delta, lora_mode)``)
    # when the caller computed it already (the service's validation does): not computed twice (issue 15).
    norm: float | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")


@dataclass(frozen=True)
class AggregationResult:
    """What :func:`aggregate` produced; every dict keyed by update id covers the whole buffer."""

    new_global: StateDict  # float32, every key of the global
    applied_delta: StateDict  # the server step: new_global = global + applied_delta, for the keys that moved
    weights: dict[str, float]  # update_id -> normalized weight
    staleness_weights: dict[str, float]  # update_id -> s(τ)
    norms: dict[str, float]  # update_id -> L2 norm of the projected delta before clipping
    clipped: list[str]  # update ids whose delta was scaled down
    opt_state: ServerOptState
    noise_std: float
    pseudo_gradient: StateDict = field(default_factory=dict)  # Δ fed to the optimizer (after noise)


def _validate(global_state: StateDict, buffer: Sequence[BufferedUpdate]) -> None:
    if not buffer:
        raise ValueError("cannot aggregate an empty buffer")
    seen: set[str] = set()
    for u in buffer:
        if u.update_id in seen:
            raise ValueError(f"update {u.update_id!r} appears twice in the buffer")
        seen.add(u.update_id)
        for key, tensor in u.delta.items():
            ref = global_state.get(key)
            if ref is None:
                raise ValueError(f"update {u.update_id!r}: key {key!r} is not in the global adapter")
            if tensor.shape != ref.shape:
                raise ValueError(
                    f"update {u.update_id!r}: shape of {key!r} {tuple(tensor.shape)} != {tuple(ref.shape)}"
                )


def _finite(state: StateDict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def effective_samples(num_samples: int, spec: AggregationSpec) -> int:
    """The sample count an update weighs with: 1 (uniform), or the claim capped at ``max_num_samples``."""
    return 1 if spec.weighting == "uniform" else min(num_samples, spec.max_num_samples)


def aggregate(
    global_state: StateDict,
    buffer: Sequence[BufferedUpdate],
    spec: AggregationSpec,
    opt_state: ServerOptState | None = None,
    *,
    generator: torch.Generator | None = None,
) -> AggregationResult:
    """Merge ``buffer`` into ``global_state`` (see the module docstring for the exact steps).

    ``generator`` drives the server DP noise (a fresh, OS-seeded one if ``None``). Raises
    ``ValueError`` for an empty buffer, duplicate update ids, a delta key the global lacks, a shape
    mismatch, a non-finite delta, or DP noise requested without ``max_update_norm``.
    """
    _validate(global_state, buffer)
    s = from_spec(spec)
    deltas = [project_delta(u.delta, spec.lora_mode) for u in buffer]

    norms: dict[str, float] = {}
    clipped: list[str] = []
    bounded: list[StateDict] = []
    for u, d in zip(buffer, deltas, strict=True):
        norm = l2_norm(d) if u.norm is None else u.norm
        if not math.isfinite(norm):
            raise ValueError(f"update {u.update_id!r} has non-finite values")
        norms[u.update_id] = norm
        scale = 1.0 if spec.max_update_norm is None else clip_scale(norm, spec.max_update_norm)
        if scale < 1.0:
            clipped.append(u.update_id)
            d = scaled(d, scale)
        bounded.append(d)

    staleness_weights = {u.update_id: s(u.staleness) for u in buffer}
    samples = [effective_samples(u.num_samples, spec) for u in buffer]
    raw = [staleness_weights[u.update_id] * n for u, n in zip(buffer, samples, strict=True)]
    # Normalized by the sample total, not by the discounted total: the staleness discount is absolute,
    # so K = 1 is FedAsync (global += η·s(τ)·Δ) and uniform samples give FedBuff's (η/K)·Σ s(τ_i)·Δ_i.
    total = float(sum(samples))
    if not sum(raw) > 0:
        raise ValueError("aggregation weights sum to zero")

    combined = combiner_for(spec, generator).combine(global_state, bounded, raw, total, spec)
    weights = {u.update_id: w for u, w in zip(buffer, combined.weights, strict=True)}
    pseudo_grad, noise_std = combined.pseudo_gradient, combined.noise_std

    new_global, step, new_state = apply_server_update(global_state, pseudo_grad, spec, opt_state)
    if not _finite({k: new_global[k] for k in step}):
        raise ValueError("the merge produced non-finite values")
    return AggregationResult(
        new_global=new_global,
        applied_delta=step,
        weights=weights,
        staleness_weights=staleness_weights,
        norms=norms,
        clipped=clipped,
        opt_state=new_state,
        noise_std=noise_std,
        pseudo_gradient=pseudo_grad,
    )


class UpdateBuffer:
    """The FedBuff buffer of one federation: flush at K updates or when the oldest waited too long.

    At most ``max_per_client`` updates per client: :meth:`has_room_for` tells the caller to park the next
    one (see ``services.aggregator.runtime``). A timed-out buffer with fewer than ``min_updates`` is not
    due (it waits for more). Pure and clock-injected (``clock`` returns seconds, monotonic); not thread-safe.
    Disposable by design: after a crash the service replays the updates from the offsets stored in Redis.
    """

    def __init__(
        self,
        buffer_size: int,
        flush_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        min_updates: int = 1,
        max_per_client: int = 1,
    ) -> None:
        if buffer_size < 1 or not flush_timeout_s > 0 or not 1 <= min_updates <= buffer_size:
            raise ValueError(
                f"need buffer_size >= 1, flush_timeout_s > 0 and 1 <= min_updates <= buffer_size, "
                f"got {buffer_size}, {flush_timeout_s}, {min_updates}"
            )
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be >= 1, got {max_per_client}")
        self.buffer_size = buffer_size
        self.flush_timeout_s = flush_timeout_s
        self.min_updates = min_updates
        self.max_per_client = max_per_client
        self._clock = clock
        self._entries: dict[str, tuple[float, BufferedUpdate]] = {}
        self._clients: Counter[str] = Counter()

    def add(self, update: BufferedUpdate) -> bool:
        """Buffer ``update``; True when it holds >= K updates ("flush now"). A duplicate id or an update
        of a client with ``max_per_client`` in the buffer: ValueError."""
        self._check(update)
        self._entries[update.update_id] = (self._clock(), update)
        self._clients[update.client_id] += 1
        return self.full()

    def _check(self, update: BufferedUpdate) -> None:
        if update.update_id in self._entries:
            raise ValueError(f"update {update.update_id!r} is already buffered")
        if self._clients[update.client_id] >= self.max_per_client:
            raise ValueError(f"client {update.client_id!r} already has its share of this buffer")

    def full(self) -> bool:
        return len(self._entries) >= self.buffer_size

    def client_count(self, client_id: str) -> int:
        """How many updates of ``client_id`` the buffer holds."""
        return self._clients[client_id]

    def has_room_for(self, client_id: str) -> bool:
        return self._clients[client_id] < self.max_per_client

    def deadline(self) -> float | None:
        """Clock time at which the buffer becomes due (None when empty)."""
        if not self._entries:
            return None
        oldest, _ = next(iter(self._entries.values()))
        return oldest + self.flush_timeout_s

    def due(self, now: float | None = None) -> bool:
        """Whether the buffer holds ``min_updates`` or more and its oldest update has waited
        ``flush_timeout_s`` or longer."""
        deadline = self.deadline()
        if deadline is None or len(self._entries) < self.min_updates:
            return False
        return (self._clock() if now is None else now) >= deadline

    def take_entries(self) -> list[tuple[float, BufferedUpdate]]:
        """Every buffered update with the clock time it was added, oldest first; the buffer is left empty."""
        entries = list(self._entries.values())
        self.clear()
        return entries

    def take(self) -> list[BufferedUpdate]:
        """Every buffered update, oldest first; the buffer is left empty."""
        return [u for _, u in self.take_entries()]

    def restore(self, entries: Sequence[tuple[float, BufferedUpdate]]) -> None:
        """Put taken entries back (their times kept), ahead of anything added since."""
        rest = list(self._entries.values())
        self.clear()
        for added_at, update in [*entries, *rest]:
            self._check(update)
            self._entries[update.update_id] = (added_at, update)
            self._clients[update.client_id] += 1

    def contains(self, update_id: str) -> bool:
        return update_id in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._clients.clear()

    def __len__(self) -> int:
        return len(self._entries)
