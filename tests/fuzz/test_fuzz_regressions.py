"""Regressions found by the fuzz tests (no stack needed)."""

from __future__ import annotations

import pytest
import torch

from schemas.errors import SchemaError
from schemas.events import MAX_NUM_SAMPLES, AdapterUpdate, AggregationSpec, TensorEncoding, make_envelope
from schemas.frame import decode_frame, encode_frame
from schemas.signing import generate_key, sign_update
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate


def signed_frame(num_samples: int) -> bytes:
    """A correctly signed update claiming ``num_samples`` (built without validation, as an attacker would)."""
    payload = b"\x00" * 8
    update = AdapterUpdate.model_construct(
        federation="fed-a",
        client_id="c1",
        update_id="u1",
        base_version=0,
        num_samples=num_samples,
        spec_fingerprint="0" * 64,
        encoding=TensorEncoding(),
        payload_sha256="af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
        payload=payload,
        signature=None,
    )
    return encode_frame(sign_update(make_envelope(update, source="pfi://client/c1"), generate_key()))


@pytest.mark.parametrize("num_samples", [10**400, 10**309, MAX_NUM_SAMPLES + 1])
def test_num_samples_over_float64_is_schema_invalid(num_samples: int) -> None:
    # Before the bound, such a signed update was accepted; every flush then raised OverflowError
    # (int too large to convert to float), was replayed, and failed again: the federation was wedged.
    with pytest.raises(SchemaError) as err:
        decode_frame(signed_frame(num_samples), max_frame_bytes=1 << 20)
    assert err.value.field == "data.num_samples"


def test_the_largest_allowed_num_samples_aggregates() -> None:
    assert (
        decode_frame(signed_frame(MAX_NUM_SAMPLES), max_frame_bytes=1 << 20).data.num_samples
        == MAX_NUM_SAMPLES
    )
    state = {"w": torch.zeros(2, 2)}
    buffer = [
        BufferedUpdate(f"u{i}", "c", {"w": torch.full((2, 2), 0.1)}, MAX_NUM_SAMPLES, 0) for i in range(8)
    ]
    result = aggregate(state, buffer, AggregationSpec())
    assert bool(torch.isfinite(result.new_global["w"]).all())
