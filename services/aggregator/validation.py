"""Validation of one complete :class:`AdapterUpdate` against its federation (CPU work: run it in a
worker thread). Every refusal is a :class:`~schemas.errors.RejectedInput` with a reason code.

Checks, cheapest first: federation matches, signature (HMAC over the canonical header, which covers
the payload digest), spec fingerprint, base version (future / rolled back / too stale), decode
(bounded), tensor names, shapes, finiteness, L2 norm bound (reject mode; clip mode clips in the
merge). Duplicates need Redis and the buffer, so the service checks them itself.

The norm is the merge's: :func:`services.aggregator.math.robust.l2_norm` (float64) of the delta as the
merge sees it (projected by the LoRA mode: under ``ffa`` the ``lora_A`` entries are dropped), so "within
the bound" here means "not clipped" there, and a finite float32 value like 1e20 is clipped in the merge,
never an overflow. :func:`foldable_norm` is the check, at admission, that the clipped, weighted delta is
finite (so the fold cannot fail on data).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modeling.lora import StateDict as StateDict  # re-exported (bench); defined once, in modeling.lora
from schemas.codec import decode_tensors
from schemas.errors import RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AggregationSpec, Envelope, FederationSpec
from schemas.signing import KeyStore, verify_update
from services.aggregator.math.lora_modes import project_delta
from services.aggregator.math.robust import clip_scale, l2_norm


@dataclass(frozen=True)
class FederationView:
    """An immutable snapshot of what validation needs to know about a federation."""

    spec: FederationSpec
    fingerprint: str
    latest: int
    head: int
    lineage: Mapping[int, int]  # version -> distance from latest (0 = latest), up to max_staleness
    shapes: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ValidUpdate:
    update: AdapterUpdate
    delta: StateDict
    staleness: int
    norm: float
    decode_seconds: float


def staleness_of(update: AdapterUpdate, view: FederationView) -> int:
    """τ = the distance from ``base_version`` to the latest version along the current lineage."""
    base = update.base_version
    depth = view.lineage.get(base)
    if depth is not None:
        return depth
    if base > view.head:
        raise RejectedInput(
            f"base_version {base} is newer than the newest version {view.head}",
            reason=RejectReason.FUTURE_BASE_VERSION,
        )
    oldest = min(view.lineage) if view.lineage else view.latest
    if base < oldest:
        raise RejectedInput(
            f"base_version {base} is more than max_staleness={view.spec.aggregation.max_staleness} versions "
            f"behind the latest version {view.latest}",
            reason=RejectReason.TOO_STALE,
        )
    raise RejectedInput(
        f"base_version {base} is not an ancestor of the latest version {view.latest} (rolled back)",
        reason=RejectReason.UNKNOWN_BASE_VERSION,
    )


def check_tensors(delta: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(shapes) - set(delta))
    extra = sorted(set(delta) - set(shapes))
    if extra:
        raise RejectedInput(
            f"{len(extra)} tensor(s) not in the federation's adapter, e.g. {extra[0]!r}",
            reason=RejectReason.SHAPE_MISMATCH,
        )
    if missing:
        raise RejectedInput(
            f"{len(missing)} adapter tensor(s) missing, e.g. {missing[0]!r}",
            reason=RejectReason.SHAPE_MISMATCH,
        )
    for name, tensor in delta.items():
        if tuple(tensor.shape) != shapes[name]:
            raise RejectedInput(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shapes[name]}",
                reason=RejectReason.SHAPE_MISMATCH,
            )


def merge_norm(delta: Mapping[str, torch.Tensor], agg: AggregationSpec) -> float:
    """The L2 norm the merge clips (of the delta projected by ``agg.lora_mode``), after checking that every
    value is finite and that the clipped delta is (``NON_FINITE`` otherwise). One float64 pass per tensor:
    the float64 sum of squares of finite float32 values cannot overflow, so a norm is finite exactly when
    every value is."""
    merged = project_delta(dict(delta), agg.lora_mode)
    norm = l2_norm(merged)
    rest = {k: v for k, v in delta.items() if k not in merged}
    if not math.isfinite(norm) or (rest and not math.isfinite(l2_norm(rest))):
        raise RejectedInput("the delta contains NaN or Inf values", reason=RejectReason.NON_FINITE)
    try:
        foldable_norm(norm, agg)
    except ValueError as err:
        raise RejectedInput(str(err), reason=RejectReason.NON_FINITE) from None
    return norm


def foldable_norm(norm: float, agg: AggregationSpec) -> float:
    """The norm of the delta as the merge adds it (clipped to ``max_update_norm``; weights are <= 1), or
    ``ValueError`` when it is not finite. With a bound it is at most ``max_update_norm`` (<= 1e6), so a
    sum of K of them is finite too."""
    if not math.isfinite(norm):
        raise ValueError(f"the delta's norm is not finite ({norm})")
    bounded = norm if agg.max_update_norm is None else norm * clip_scale(norm, agg.max_update_norm)
    if not math.isfinite(bounded):
        raise ValueError(f"the clipped delta's norm is not finite ({bounded})")
    return bounded


def validate_update(
    envelope: Envelope[Any],
    view: FederationView,
    keys: KeyStore,
    *,
    max_decoded_bytes: int,
    payload_verified: bool = False,
) -> ValidUpdate:
    """Run every stateless check; return the decoded fp32 delta or raise ``RejectedInput``.

    ``payload_verified``: the caller has checked ``payload_sha256`` already (hashed once, not twice)."""
    started = time.perf_counter()
    update = envelope.data
    if not isinstance(update, AdapterUpdate):
        raise RejectedInput(
            f"expected an adapter update, got {envelope.type!r}", reason=RejectReason.SCHEMA_INVALID
        )
    if update.federation != view.spec.name:
        raise RejectedInput(f"update is for {update.federation!r}", reason=RejectReason.UNKNOWN_FEDERATION)
    verify_update(envelope, keys, payload_verified=payload_verified)
    if update.spec_fingerprint != view.fingerprint:
        raise RejectedInput(
            "spec_fingerprint differs from the federation's (another base model or LoRA config)",
            reason=RejectReason.SPEC_MISMATCH,
        )
    staleness = staleness_of(update, view)
    delta = decode_tensors(update.payload, update.encoding, max_decoded_bytes=max_decoded_bytes)
    check_tensors(delta, view.shapes)
    agg = view.spec.aggregation
    norm = merge_norm(delta, agg)
    if agg.max_update_norm is not None and agg.norm_policy == "reject" and norm > agg.max_update_norm:
        raise RejectedInput(
            f"L2 norm {norm:.4g} exceeds the bound {agg.max_update_norm:.4g}",
            reason=RejectReason.NORM_EXCEEDED,
        )
    return ValidUpdate(update, delta, staleness, norm, time.perf_counter() - started)
