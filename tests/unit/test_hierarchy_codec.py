"""Partials on the wire (issue 15): a round trip, and every malformed partial is a typed refusal."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch

from schemas.codec import encode_tensors
from schemas.events import AggregationSpec
from services.aggregator.hierarchy.codec import (
    ENCODING,
    MAGIC,
    PartialRejected,
    decode_partial,
    encode_partial,
)
from services.aggregator.hierarchy.partial import Partial, PartialBuilder
from services.aggregator.hierarchy.partitions import split_key

SHAPES = {"a.lora_A.weight": (2, 8), "a.lora_B.weight": (8, 2)}
LIMIT = 1 << 20


def partial(n: int = 3) -> Partial:
    builder = PartialBuilder(AggregationSpec(weighting="samples", max_update_norm=1.0), SHAPES)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        delta = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        builder.add(f"u{i}", f"c{i}", i % 2, 5 + i, delta)
    return builder.build("fed", "p-1", "f" * 64)


def parts(data: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack_from(">I", data, len(MAGIC))
    start = len(MAGIC) + 4
    return json.loads(data[start : start + size]), data[start + size :]


def rebuild(header: dict[str, Any], tensors: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + tensors


def test_round_trip_keeps_groups_sums_and_contributions() -> None:
    original = partial()
    back = decode_partial(encode_partial(original), max_bytes=LIMIT)
    assert back.federation == "fed"
    assert back.partial_id == "p-1"
    assert back.contributions == original.contributions
    assert set(back.groups) == {0, 1}
    for base, group in original.groups.items():
        assert back.groups[base].samples == group.samples
        assert back.groups[base].max_samples == group.max_samples
        for key, tensor in group.weighted_sum.items():
            assert torch.equal(back.groups[base].weighted_sum[key], tensor)


def test_oversized_truncated_and_foreign_bytes_are_refused() -> None:
    data = encode_partial(partial())
    with pytest.raises(PartialRejected, match="exceeds"):
        decode_partial(data, max_bytes=len(data) - 1)
    for bad in (b"", b"garbage", MAGIC, MAGIC + b"\xff\xff\xff\xff{}", data[: len(data) // 2], data[:40]):
        with pytest.raises(PartialRejected):
            decode_partial(bad, max_bytes=LIMIT)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: h["groups"].append(dict(h["groups"][0])),  # a group twice
        lambda h: h["groups"][0].update(samples=h["groups"][0]["samples"] + 1),  # sums disagree
        lambda h: h["groups"][0].update(count=99),
        lambda h: h["contributions"].append(dict(h["contributions"][0])),  # an update twice
        lambda h: h["contributions"][0].update(base_version=7),  # names a group the partial lacks
        lambda h: h.update(federation="../etc"),  # not a federation name
        lambda h: h.update(extra=1),  # unknown field
        lambda h: h["contributions"].clear(),  # empty
        lambda h: h["contributions"][0].update(samples=-1),
    ],
)
def test_inconsistent_headers_are_refused(tamper: object) -> None:
    header, tensors = parts(encode_partial(partial()))
    tamper(header)  # type: ignore[operator]
    with pytest.raises(PartialRejected):
        decode_partial(rebuild(header, tensors), max_bytes=LIMIT)


def test_non_finite_or_orphan_tensors_are_refused() -> None:
    p = partial()
    p.groups[0].weighted_sum["a.lora_A.weight"][0, 0] = float("inf")
    with pytest.raises(PartialRejected, match="not finite"):
        decode_partial(encode_partial(p), max_bytes=LIMIT)
    p = partial()
    p.groups[0].weighted_sum["x"] = torch.zeros(1)
    data = encode_partial(p)
    header, _ = parts(data)
    assert decode_partial(data, max_bytes=LIMIT).groups[0].weighted_sum["x"].shape == (
        1,
    )  # the root checks shapes
    orphan = encode_tensors({"5/a.lora_A.weight": torch.zeros(2, 8)}, ENCODING)
    with pytest.raises(PartialRejected, match="no group"):
        decode_partial(rebuild(header, orphan), max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"fed/c1", ("fed", "c1")),
        (b"fed", None),
        (b"/c1", None),
        (b"fed/", None),
        (b"a/b/c", None),
        (b"\xff\xfe/c", None),
        (None, None),
        (b"", None),
    ],
)
def test_leaf_reads_only_federation_slash_client_keys(key: bytes | None, expected: object) -> None:
    assert split_key(key) == expected
