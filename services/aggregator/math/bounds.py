"""How far one client can move the global adapter in one version, as a function of the spec alone.

**The quantity.** Fix everything in a version but one client's update (its delta *and* what it claims:
``num_samples``, ``base_version``). ``influence_bound(spec, n)`` bounds the L2 distance between the new
globals of two such versions of ``n`` updates (replace-one adjacency: "what the global would be had this
client sent anything else, e.g. a zero delta"). It also bounds how far the global is from the one the
honest updates alone lead to, in the sense that swapping the attacker's update for an honest one changes
the result by at most this much. Every delta is clipped to ``C = max_update_norm`` first (``norm_policy``
``reject`` refuses instead: the same bound), staleness discounts are ``s(τ) <= 1``, ``η = server_lr``.

**Weighted mean** (``robust == "none"``): the step is ``η·(H + s_a n_a c_a) / (N + n_a)`` with
``H = Σ_{i≠a} s_i n_i c_i``, ``N = Σ_{i≠a} n_i``, ``||c_i|| <= C`` (clipped). Write it as
``h + λ·(x - h)`` with ``h = H/N`` (``||h|| <= C``), ``x = s_a c_a`` (``||x|| <= C``) and
``λ = n_a / (N + n_a)``. For two choices ``(λ, x)``, ``(λ', x')`` with ``λ >= λ'``:
``λ(x-h) - λ'(x'-h) = λ'(x - x') + (λ-λ')(x - h)``, of norm ``<= 2C·λ' + 2C·(λ-λ') = 2C·λ``. So
``bound = 2·η·C·max_share`` where ``max_share`` is the largest ``λ`` the client can get:

* ``weighting="uniform"``: ``n_i = 1``, ``max_share = 1/n``;
* ``weighting="samples"``: ``n_a <= cap = max_num_samples`` (the claim is capped) and every other
  ``n_i >= 1``, so ``max_share = cap / (cap + n - 1)``. With a large cap this is close to 1: a liar
  gets almost the whole version. That is why ``uniform`` is the default.

**Trimmed mean / median** (coordinate-wise, weights ignored): changing one input value from ``x`` to
``x'`` moves every order statistic of that coordinate in the same direction by amounts that sum to
``x' - x``, so the mean of a window of ``m`` order statistics moves by at most ``|x' - x| / m``. Over
all coordinates: ``bound = η·||x' - x|| / m <= 2·η·C / m``, with ``m = n - 2k`` (``k`` trimmed per side,
at least one: see :func:`~services.aggregator.math.robust.trim_count`) and ``m = 1`` or ``2`` for the
median (odd/even ``n``). What the L2 bound does not show: with one attacker and ``k >= 1`` every
coordinate also stays within the range of the honest values.

**A client with r updates in a version** (``r = max_client_updates``, default 1): its updates act as one
of combined share ``λ = r·n_a / (r·n_a + Σ_others n_i)`` whose mean delta has norm ``<= C``, so
``max_share`` becomes ``r/n`` (uniform) or ``r·cap / (r·cap + n - r)`` (samples); for order statistics,
changing r values moves the window's sum by at most the sum of their changes: ``2·η·C·r / m``. (With
``r > k`` the robust combiners also lose the honest-envelope property: keep ``r = 1`` with them.)

**Per version**: the maximum over the sizes a version can have, ``flush_min_updates <= n <= K`` (a
timed-out buffer with fewer waits; a full buffer flushes at exactly K; parked updates enter the next
buffer only up to K).

**Server optimizer.** ``none``: as above. ``momentum`` (``m = β·m + Δ``): the difference stays in ``m``
and is applied again, scaled by ``β`` each version: over all later versions it adds up to at most
``bound / (1 - β)`` (the value returned). ``adam`` divides per coordinate by ``√v``: no L2 bound in terms
of ``C`` holds (``inf``). Server DP noise is independent of the client and not part of the bound; an
unbounded norm (``max_update_norm=None``, only with ``allow_unbounded_norm``) gives ``inf``.
"""

from __future__ import annotations

import math

from schemas.events import AggregationSpec
from services.aggregator.math.robust import MIN_TRIM, trimmed_window


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


def step_influence(spec: AggregationSpec, n: int) -> float:
    """Bound on how far one client moves the pseudo-gradient (before ``server_lr`` and the optimizer)."""
    if spec.max_update_norm is None:
        return math.inf
    c = spec.max_update_norm
    if spec.robust == "none":
        return 2.0 * c * max_share(spec, n)
    if spec.robust == "median":
        window = 1 if n % 2 == 1 else 2
    else:
        window = trimmed_window(n, spec.trim_ratio, MIN_TRIM)
    return 2.0 * c * min(spec.max_client_updates, n) / window


def influence_bound(spec: AggregationSpec, n: int | None = None) -> float:
    """How far (L2) one client can move the global in a version of ``n`` updates, or, with ``n=None``, in
    any version this spec can make (see the module docstring for the derivation)."""
    sizes = range(spec.flush_min_updates, spec.buffer_size + 1) if n is None else (n,)
    step = max(step_influence(spec, size) for size in sizes)
    if spec.server_optimizer == "adam":
        return math.inf
    bound = spec.server_lr * step
    if spec.server_optimizer == "momentum":
        bound /= 1.0 - spec.momentum
    return bound
