"""In-process parts of ``pfi bench aggregator``: the comparison with Flower's FedAvg and the stage profile.

Everything timed here runs in a worker thread made like the aggregator's own (same torch settings),
because that is where the service runs decoding, validation and the fold. Each figure is the median
of ``repeats`` runs.

* **fold**: :func:`services.aggregator.math.fedbuff.aggregate` (the FedBuff fold the service runs at
  a flush: projection, L2 norms for clipping, staleness and sample weights, weighted mean, server
  step) on already-decoded fp32 tensors, vs ``flwr.server.strategy.aggregate.aggregate`` (FedAvg's
  sample-weighted mean) on the very same tensors as numpy arrays (zero-copy views). Both produce the
  sample-weighted mean (ours as ``global + mean`` with a zero global: checked to agree to 1e-5).
* **wire**: our :func:`schemas.codec.decode_tensors` of each update's payload + the fold, vs Flower's
  ``parameters_to_ndarrays`` of a ``Parameters`` built by ``ndarrays_to_parameters`` from the same
  arrays (built outside the timing, like our encoding) + its aggregate.
* **wire + validate** (information only): our full :func:`validate_update` (HMAC signature, payload
  digest, decode, names/shapes, finiteness, norm) + the fold, vs the same Flower figure (which checks
  nothing).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from bench.aggregator_data import SizePoint
from modeling.blobs import BLOB_ENCODING
from schemas.chunking import Reassembler
from schemas.codec import decode_tensors, encode_tensors, state_l2_norm
from schemas.events import AdapterUpdate, AdapterUpdateChunk, Envelope, FederationSpec
from schemas.frame import decode_frame, verify_payload_digest
from schemas.signing import KeyStore, verify_update
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.aggregator.validation import FederationView, validate_update
from services.settings import PFISettings

T = TypeVar("T")


def _median_seconds(pool: ThreadPoolExecutor, fn: Callable[[], Any], repeats: int) -> float:
    def timed() -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    return statistics.median(pool.submit(timed).result() for _ in range(max(1, repeats)))


def _view(spec: FederationSpec, shapes: dict[str, tuple[int, ...]]) -> FederationView:
    return FederationView(
        spec=spec, fingerprint=spec.fingerprint(), latest=0, head=0, lineage={0: 0}, shapes=shapes
    )


def flower_comparison(
    point: SizePoint,
    spec: FederationSpec,
    envelopes: Sequence[Envelope[AdapterUpdate]],
    keys: KeyStore,
    settings: PFISettings,
    pool: ThreadPoolExecutor,
    repeats: int,
) -> dict[str, Any]:
    """Time our fold / decode+fold / validate+fold against Flower's on ``envelopes`` (one size)."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate as flwr_aggregate

    cap = settings.max_decoded_bytes
    updates = [env.data for env in envelopes]
    decoded = [decode_tensors(u.payload, u.encoding, max_decoded_bytes=cap) for u in updates]
    global_state = {k: torch.zeros(s) for k, s in point.shapes.items()}
    # Flower's FedAvg weighs by num_examples: ours by (capped) num_samples too, not the uniform default.
    agg_spec = spec.aggregation.model_copy(update={"weighting": "samples"})
    view = _view(spec, point.shapes)

    def buffered(deltas: Sequence[dict[str, torch.Tensor]]) -> list[BufferedUpdate]:
        return [
            BufferedUpdate(u.update_id, u.client_id, d, u.num_samples, 0)
            for u, d in zip(updates, deltas, strict=True)
        ]

    ours_buffer = buffered(decoded)
    order = list(point.shapes)  # safetensors sorts names: give Flower one fixed layer order
    flwr_results = [
        ([d[k].numpy() for k in order], u.num_samples) for u, d in zip(updates, decoded, strict=True)
    ]
    flwr_params = [(ndarrays_to_parameters(arrays), n) for arrays, n in flwr_results]

    # Like with like: both compute the same sample-weighted mean.
    ours_mean = pool.submit(aggregate, global_state, ours_buffer, agg_spec).result().new_global
    flwr_mean = flwr_aggregate(flwr_results)
    diff = max(
        float(np.max(np.abs(ours_mean[k].numpy() - arr))) if arr.size else 0.0
        for k, arr in zip(order, flwr_mean, strict=True)
    )

    def ours_wire() -> None:
        deltas = [decode_tensors(u.payload, u.encoding, max_decoded_bytes=cap) for u in updates]
        aggregate(global_state, buffered(deltas), agg_spec)

    def ours_validated() -> None:
        valid = [validate_update(env, view, keys, max_decoded_bytes=cap) for env in envelopes]
        aggregate(global_state, buffered([v.delta for v in valid]), agg_spec)

    def flwr_wire() -> None:
        flwr_aggregate([(parameters_to_ndarrays(p), n) for p, n in flwr_params])

    figures = {
        "updates": len(updates),
        "ours_fold_s": _median_seconds(pool, lambda: aggregate(global_state, ours_buffer, agg_spec), repeats),
        "flower_fold_s": _median_seconds(pool, lambda: flwr_aggregate(flwr_results), repeats),
        "ours_wire_s": _median_seconds(pool, ours_wire, repeats),
        "flower_wire_s": _median_seconds(pool, flwr_wire, repeats),
        "ours_validated_s": _median_seconds(pool, ours_validated, repeats),
        "max_abs_diff": diff,
    }
    figures["vs_flower_fold"] = figures["flower_fold_s"] / figures["ours_fold_s"]
    figures["vs_flower_wire"] = figures["flower_wire_s"] / figures["ours_wire_s"]
    figures["vs_flower_validated"] = figures["flower_wire_s"] / figures["ours_validated_s"]
    return figures


def stage_times(
    point: SizePoint,
    spec: FederationSpec,
    envelope: Envelope[AdapterUpdate],
    messages: Sequence[bytes],
    keys: KeyStore,
    settings: PFISettings,
    pool: ThreadPoolExecutor,
    repeats: int,
    buffer_size: int,
    profile: bool = False,
) -> dict[str, Any]:
    """CPU seconds (of the worker thread) per stage for one update of ``point``, as the service runs them
    (its CPU path without Kafka and Redis: chunk frames decoded without their digest, which the
    reassembler checks; the payload hashed once, for the frame check and the signature, or not at all
    when chunked: its chunks were); with ``profile``, the top functions of a cProfile of the whole path."""
    cap = settings.max_update_bytes
    view = _view(spec, point.shapes)
    global_state = {k: torch.zeros(s) for k, s in point.shapes.items()}
    stages: dict[str, list[float]] = {}

    def clock(name: str, started: float) -> float:
        now = time.thread_time()  # CPU seconds of this worker thread: the machine's other load is not in it
        stages.setdefault(name, []).append(now - started)
        return now

    def path() -> None:
        t = time.thread_time()
        frame: bytes | None = None
        if len(messages) > 1:
            reassembler: Reassembler[tuple[int, int]] = Reassembler(
                settings.max_inflight_chunk_bytes, settings.chunk_ttl_s, cap
            )
            chunks: list[AdapterUpdateChunk] = [
                decode_frame(m, max_frame_bytes=cap, verify_digest=False).data for m in messages
            ]
            t = clock("decode chunk frames", t)
            for i, chunk in enumerate(chunks):
                frame = reassembler.add(chunk, (0, i)) or frame
            t = clock("reassemble (chunk + frame sha256)", t)
        chunked = frame is not None  # its payload is covered by the signed, hashed chunks: not hashed again
        frame = frame or messages[0]
        whole = decode_frame(frame, max_frame_bytes=cap, expected=AdapterUpdate, verify_digest=False)
        t = clock("decode update frame", t)
        if not chunked:
            verify_payload_digest(whole)
        t = clock("payload sha256 (unchunked updates)", t)
        verify_update(whole, keys, payload_verified=True)
        t = clock("verify signature (HMAC of the header)", t)
        update = whole.data
        delta = decode_tensors(update.payload, update.encoding, max_decoded_bytes=settings.max_decoded_bytes)
        t = clock("decode tensors (safetensors)", t)
        norm = state_l2_norm(delta)
        t = clock("L2 norm (= finite check)", t)
        validate_update(
            whole, view, keys, max_decoded_bytes=settings.max_decoded_bytes, payload_verified=True
        )
        t = clock("= validate_update (the 3 above + shapes)", t)
        items = [  # with validation's norm, as the service buffers them
            BufferedUpdate(f"u{i}", update.client_id, delta, update.num_samples, 0, norm)
            for i in range(buffer_size)
        ]
        result = aggregate(global_state, items, spec.aggregation)
        t = clock("fold (K updates) / K", t)
        stages["fold (K updates) / K"][-1] /= buffer_size
        encode_tensors(result.new_global, BLOB_ENCODING)
        t = clock("encode version blob / K", t)
        stages["encode version blob / K"][-1] /= buffer_size

    for _ in range(max(1, repeats)):
        pool.submit(path).result()
    out: dict[str, Any] = {"stages": {k: statistics.median(v) for k, v in stages.items()}}
    out["costs_us"] = cost_breakdown(out["stages"])
    if profile:
        profiler = cProfile.Profile()
        pool.submit(profiler.runcall, path).result()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        out["profile_top"] = [line for line in text.getvalue().splitlines() if line.strip()][-14:]
    return out


def cost_breakdown(stages: dict[str, float]) -> dict[str, float]:
    """The CPU stages of one update grouped as the capacity model uses them, in µs per update:
    ``verify`` (every hash and HMAC: chunk and whole digests, signature), ``decode`` (frames and tensors),
    ``validate`` (norm, finiteness, names and shapes: the rest of ``validate_update``), ``fold`` (the
    fold and the version blob, per update)."""

    def us(*names: str) -> float:
        return 1e6 * sum(stages.get(n, 0.0) for n in names)

    verify = us(
        "reassemble (chunk + frame sha256)",
        "payload sha256 (unchunked updates)",
        "verify signature (HMAC of the header)",
    )
    decode = us("decode chunk frames", "decode update frame", "decode tensors (safetensors)")
    validate = max(
        0.0,
        us("= validate_update (the 3 above + shapes)")
        - us("verify signature (HMAC of the header)", "decode tensors (safetensors)"),
    )
    fold = us("fold (K updates) / K", "encode version blob / K")
    return {"verify": verify, "decode": decode, "validate": validate, "fold": fold}
