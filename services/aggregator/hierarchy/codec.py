"""Partials on the wire: one Kafka message of the partials topic per partial.

``MAGIC | u32 header length | header JSON | tensors`` where the tensors are safetensors (float32, the
codec of :mod:`schemas.codec`), named ``<base version>/<adapter key>``. Only the aggregator principal may
write the partials topic (Kafka ACLs), but the root still decodes defensively: sizes are bounded before
anything is allocated, the header is a strict model, every tensor must belong to a declared group and
fit the federation's adapter (checked by the root), and any violation is a :class:`PartialRejected`.
"""

from __future__ import annotations

import struct

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.codec import decode_tensors, encode_tensors
from schemas.errors import PFIError
from schemas.events import ID_PATTERN, NAME_PATTERN, TensorEncoding
from services.aggregator.hierarchy.partial import Contribution, Partial, PartialGroup

MAGIC = b"PFIPART1"
MAX_HEADER_BYTES = 16 << 20
MAX_CONTRIBUTIONS = 100_000
ENCODING = TensorEncoding(dtype="float32", quantization="none", compression="none")
_LEN = struct.Struct(">I")


class PartialRejected(PFIError):
    """A partials-topic message that is not a well-formed partial."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Group(_Strict):
    base_version: int = Field(ge=0)
    samples: int = Field(ge=1)
    max_samples: int = Field(ge=1)
    count: int = Field(ge=1)


class _Contribution(_Strict):
    update_id: str = Field(pattern=ID_PATTERN)
    client_id: str = Field(pattern=ID_PATTERN)
    base_version: int = Field(ge=0)
    num_samples: int = Field(ge=1)
    samples: int = Field(ge=1)
    norm: float = Field(ge=0)
    clipped: bool


class _Header(_Strict):
    federation: str = Field(pattern=NAME_PATTERN)
    partial_id: str = Field(pattern=ID_PATTERN)
    spec_fingerprint: str = Field(max_length=128)
    groups: list[_Group] = Field(max_length=MAX_CONTRIBUTIONS)
    contributions: list[_Contribution] = Field(min_length=1, max_length=MAX_CONTRIBUTIONS)


def encode_partial(partial: Partial) -> bytes:
    header = (
        _Header(
            federation=partial.federation,
            partial_id=partial.partial_id,
            spec_fingerprint=partial.spec_fingerprint,
            groups=[
                _Group(
                    base_version=g.base_version, samples=g.samples, max_samples=g.max_samples, count=g.count
                )
                for g in partial.groups.values()
            ],
            contributions=[_Contribution(**c.__dict__) for c in partial.contributions],
        )
        .model_dump_json()
        .encode()
    )
    tensors = {f"{b}/{k}": t for b, g in partial.groups.items() for k, t in g.weighted_sum.items()}
    return MAGIC + _LEN.pack(len(header)) + header + encode_tensors(tensors, ENCODING)


def decode_partial(data: bytes, *, max_bytes: int) -> Partial:
    """The partial in ``data`` (:class:`PartialRejected` for anything malformed or over ``max_bytes``)."""
    if len(data) > max_bytes:
        raise PartialRejected(f"partial of {len(data)} bytes exceeds {max_bytes}")
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LEN.size:
        raise PartialRejected("not a partial (bad magic)")
    (size,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if size > min(MAX_HEADER_BYTES, len(data) - start):
        raise PartialRejected(f"header length {size} out of bounds")
    try:
        header = _Header.model_validate_json(data[start : start + size])
    except ValidationError as err:
        raise PartialRejected(f"bad partial header: {err.errors()[0]['msg']}") from None
    try:
        tensors = decode_tensors(data[start + size :], ENCODING, max_decoded_bytes=max_bytes)
    except PFIError as err:
        raise PartialRejected(f"bad partial tensors: {err}") from None
    groups: dict[int, PartialGroup] = {}
    for g in header.groups:
        if g.base_version in groups or g.max_samples > g.samples:
            raise PartialRejected(f"group {g.base_version} is duplicated or inconsistent")
        groups[g.base_version] = PartialGroup(g.base_version, {}, g.samples, g.max_samples, g.count)
    for name, tensor in tensors.items():
        base, _, key = name.partition("/")
        if not base.isdigit() or int(base) not in groups or not key:
            raise PartialRejected(f"tensor {name!r} belongs to no group")
        if not bool(torch.isfinite(tensor).all()):
            raise PartialRejected(f"tensor {name!r} is not finite")
        groups[int(base)].weighted_sum[key] = tensor
    contributions = [Contribution(**c.model_dump()) for c in header.contributions]
    _check_consistent(groups, contributions)
    return Partial(header.federation, header.partial_id, header.spec_fingerprint, groups, contributions)


def _check_consistent(groups: dict[int, PartialGroup], contributions: list[Contribution]) -> None:
    ids = [c.update_id for c in contributions]
    if len(set(ids)) != len(ids):
        raise PartialRejected("an update appears twice in the partial")
    for base, group in groups.items():
        mine = [c for c in contributions if c.base_version == base]
        if (
            len(mine) != group.count
            or sum(c.samples for c in mine) != group.samples
            or max(c.samples for c in mine) != group.max_samples
        ):
            raise PartialRejected(f"group {base} disagrees with its contributions")
    if {c.base_version for c in contributions} != set(groups):
        raise PartialRejected("contributions name a group the partial lacks")
