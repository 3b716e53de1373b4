"""How far one client can move the global adapter in one version, as a function of the spec alone.

**The quantity.** Fix everything in a version but one client's update (its delta *and* what it claims:
``num_samples``, ``base_version``). ``influence_bound(spec, n)`` bounds the L2 distance between the new
globals of two such versions of ``n`` updates (replace-one adjacency: "what the global would be had this
client sent anything else, e.g. a zero delta"). It also bounds how far the global is from the one the
honest updates alone lead to, in the sense that swapping the attacker's update for an honest one changes
the result by at most this much. Every delta is clipped to ``C = max_update_norm`` first (``norm_policy``
``reject`` refuses instead: the same bound), staleness discounts are ``s(τ) <= 1``, ``η = server_lr``.

**Per combiner** (``Combiner.influence``, derived in each one's module under :mod:`.strategies`): how far
the client moves the pseudo-gradient.

* weighted mean (``robust == "none"``): ``2·C·max_share`` (:func:`max_share`: ``r/n`` uniform,
  ``r·cap / (r·cap + n - r)`` with ``weighting="samples"``: a large cap gives a liar almost the whole
  version, which is why ``uniform`` is the default);
* trimmed mean / median (coordinate-wise, weights ignored): ``2·C·r / m``, ``m`` the window of order
  statistics averaged (``n - 2k``, ``k >= 1`` trimmed per side; 1 or 2 for the median). What the L2 bound
  does not show: with one attacker and ``k >= 1`` every coordinate also stays within the range of the
  honest values.

``r = max_client_updates`` (default 1); with ``r > k`` the robust combiners lose the honest-envelope
property: keep ``r = 1`` with them.

**Per version**: the maximum over the sizes a version can have, ``flush_min_updates <= n <= K`` (a
timed-out buffer with fewer waits; a full buffer flushes at exactly K; parked updates enter the next
buffer only up to K).

**Per server optimizer** (``ServerOptimizer.bound``): ``none``: ``η`` times the above. ``momentum``
(``m = β·m + Δ``): the difference stays in ``m`` and is applied again, scaled by ``β`` each version: over all
later versions it adds up to at most ``η·bound / (1 - β)`` (the value returned). ``adam`` and ``yogi``
divide per coordinate by ``√v``: no L2 bound in terms of ``C`` holds (``inf``). Server DP noise is
independent of the client and not part of the bound; an unbounded norm (``max_update_norm=None``, only
with ``allow_unbounded_norm``) gives ``inf``.
"""

from __future__ import annotations

import math

from schemas.events import AggregationSpec
from services.aggregator.math.strategies import get_combiner, get_server_optimizer
from services.aggregator.math.strategies.weighted_mean import max_share

__all__ = ["influence_bound", "max_share", "step_influence"]


def step_influence(spec: AggregationSpec, n: int) -> float:
    """Bound on how far one client moves the pseudo-gradient (before ``server_lr`` and the optimizer)."""
    if spec.max_update_norm is None:
        return math.inf
    return get_combiner(spec.robust).influence(spec, n, spec.max_update_norm)


def influence_bound(spec: AggregationSpec, n: int | None = None) -> float:
    """How far (L2) one client can move the global in a version of ``n`` updates, or, with ``n=None``, in
    any version this spec can make (see the module docstring for the derivation)."""
    sizes = range(spec.flush_min_updates, spec.buffer_size + 1) if n is None else (n,)
    step = max(step_influence(spec, size) for size in sizes)
    return get_server_optimizer(spec.server_optimizer).bound(spec, step)
