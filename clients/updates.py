"""Building and framing signed adapter updates (the edge side of the wire contract).

``build_update`` makes a signed envelope from a delta; ``update_messages`` frames it and splits it into
signed chunks when it is over ``chunk_bytes`` (each chunk is authenticated on its own by the ingest).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Protocol

import torch
from pydantic import ValidationError

from schemas.chunking import split_update
from schemas.codec import encode_tensors, sha256_hex
from schemas.errors import SchemaError
from schemas.events import (
    AdapterUpdate,
    DPMetadata,
    Envelope,
    TensorEncoding,
    TrainingMetrics,
    field_of,
    make_envelope,
)
from schemas.signing import sign_update


def build_update(
    *,
    federation: str,
    client_id: str,
    spec_fingerprint: str,
    base_version: int,
    num_samples: int,
    delta: Mapping[str, torch.Tensor],
    key: bytes | None,
    encoding: TensorEncoding | None = None,
    metrics: TrainingMetrics | None = None,
    dp: DPMetadata | None = None,
    update_id: str | None = None,
) -> Envelope[AdapterUpdate]:
    """A signed (when ``key`` is given) ``AdapterUpdate`` envelope carrying ``delta``.

    Raises :class:`~schemas.errors.SchemaError` (naming the field) for a value the aggregator would
    dead-letter anyway (an empty id, ``num_samples < 1``...), before anything is sent."""
    encoding = encoding or TensorEncoding()
    payload = encode_tensors(delta, encoding)
    try:
        update = AdapterUpdate(
            federation=federation,
            client_id=client_id,
            update_id=update_id or f"{client_id}-{uuid.uuid4().hex[:16]}",
            base_version=base_version,
            num_samples=num_samples,
            spec_fingerprint=spec_fingerprint,
            encoding=encoding,
            payload_sha256=sha256_hex(payload),
            payload=payload,
            metrics=metrics or TrainingMetrics(),
            dp=dp,
        )
    except ValidationError as err:
        field, msg = field_of(err)
        raise SchemaError(msg, field=field) from None
    envelope = make_envelope(update, source=f"pfi://client/{client_id}", subject=federation)
    return sign_update(envelope, key) if key is not None else envelope


class HasChunkBytes(Protocol):
    @property
    def chunk_bytes(self) -> int: ...


def update_messages(
    envelope: Envelope[AdapterUpdate], chunk_bytes: int | HasChunkBytes, *, key: bytes
) -> list[bytes]:
    """The messages of one update: one frame, or its ordered chunks, each signed with ``key`` (the
    client's key; the ingest refuses unsigned chunks). ``chunk_bytes``: a size, or settings carrying one."""
    size = chunk_bytes if isinstance(chunk_bytes, int) else chunk_bytes.chunk_bytes
    return split_update(envelope, size, key=key)
