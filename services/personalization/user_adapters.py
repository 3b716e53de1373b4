"""Personal adapters: validation of uploads, their Redis record, and the decoded form the model uses.

Redis: one hash per user, ``pfi:{fed}:user:<uid>:adapter`` (:func:`services.store.keys.user_adapter`)
with fields ``version`` (a counter, +1 per upload), ``blob`` (the adapter re-encoded as the global
blobs are: fp32 safetensors, zstd) and ``meta`` (JSON, :class:`AdapterRecord` without the version). An
upload is one Lua script (bump, write, announce); a delete is one MULTI (``DEL`` + announce), so the
key is gone the moment the call returns. Announcements go to the stream ``pfi:{fed}:user-events``
(:func:`services.store.keys.user_events`, same hash slot) and name users only by a digest
(:func:`user_key`), never by id: every replica reads the stream and drops its cached copy (see
:mod:`services.personalization.subscriber`).

Generations (tombstones): ``pfi:{fed}:user-generations`` (:func:`services.store.keys.user_generations`)
maps the user digest to a counter that every upload *and* delete increments in the same atomic step,
and that a delete never resets. A replica reads the generation atomically with the adapter
(:meth:`UserAdapterStore.load`) and, after decoding, inserts into its cache only if the generation is
still the same (:meth:`UserAdapterStore.generation`): a load that overlapped a delete on any replica
is thrown away, whether or not that replica's stream reader has seen the delete yet.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import torch
from pydantic import Field
from redis.asyncio import Redis

from modeling.blobs import BLOB_ENCODING
from schemas.codec import all_finite, decode_tensors, encode_tensors, sha256_hex
from schemas.errors import CodecError, PayloadTooLargeError
from schemas.events import StrictModel, TensorEncoding
from services.personalization.errors import BadRequest, PayloadTooLarge, Unprocessable
from services.store import keys
from services.store.scripts import lua

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
EVENTS_MAXLEN = 10_000
NEGATIVE_ENTRY_BYTES = 256  # what a cached "this user has no adapter" costs in the byte budget
MAX_ABS_VALUE = 1e4  # larger LoRA weights are certainly not a trained adapter (and overflow in fp16)


def user_key(fed: str, user: str) -> str:
    """The cache key (and the stream's name for the user): a digest, so ids never reach the stream."""
    return sha256_hex(f"{fed}\x1f{user}".encode())[:32]


def events_key(fed: str) -> str:
    return keys.user_events(fed)


class AdapterRecord(StrictModel):
    """What the service keeps about a personal adapter (the blob aside)."""

    federation: str
    user_id: str
    version: int = Field(ge=1)
    trained_against: int = Field(ge=0, description="global version the adapter was trained against")
    created_at: datetime
    digest: str = Field(description="sha256 of the stored blob")
    size_bytes: int = Field(ge=0, description="stored (compressed) size")
    num_tensors: int = Field(ge=1)
    num_parameters: int = Field(ge=1)
    upload_encoding: TensorEncoding
    gate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="scale of the personal LoRA's output at serving (0: off, served as global-only; "
        "1: full), chosen by the device on its own validation text",
    )


@dataclass(eq=False)
class PersonalAdapter:
    """A decoded personal adapter, as the model stacks bind it. ``params`` are frozen
    ``nn.Parameter`` views of the tensors (no copy), so binding one to a PEFT slot allocates nothing.
    ``generation`` is the user's Redis generation it was loaded at (see the module docstring)."""

    key: str
    record: AdapterRecord
    params: dict[str, torch.nn.Parameter]
    nbytes: int
    evicted: bool = field(default=False)
    generation: int = 0

    @property
    def version(self) -> int:
        return self.record.version


class NoAdapter:
    """Cached fact: the user has no personal adapter (served base + global), as of ``generation``."""

    __slots__ = ("generation",)

    def __init__(self, generation: int = 0) -> None:
        self.generation = generation


NO_ADAPTER = NoAdapter()
CacheValue = PersonalAdapter | NoAdapter


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def to_params(state: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    return {k: torch.nn.Parameter(v.contiguous(), requires_grad=False) for k, v in state.items()}


def sniff_encoding(body: bytes, dtype: str, quantization: str) -> TensorEncoding:
    """The encoding of an upload: compression from the zstd magic, dtype/quantization as declared."""
    try:
        return TensorEncoding(
            dtype=cast(Any, dtype),
            quantization=cast(Any, quantization),
            compression="zstd" if body[:4] == ZSTD_MAGIC else "none",
        )
    except ValueError as err:
        raise BadRequest(f"bad encoding parameters: {err}") from None


def validate_state(
    state: Mapping[str, torch.Tensor], template: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Exactly the federation's adapter tensors (names and shapes), all finite and of sane magnitude."""
    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    if missing or extra:
        raise Unprocessable(
            f"adapter tensors differ from the federation's LoRA config: "
            f"{len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}",
            code="shape_mismatch",
        )
    wrong = [
        f"{k}: {tuple(t.shape)} != {template[k]}" for k, t in state.items() if tuple(t.shape) != template[k]
    ]
    if wrong:
        raise Unprocessable(f"wrong tensor shapes: {'; '.join(wrong[:3])}", code="shape_mismatch")
    if not all_finite(state):
        bad = [k for k, t in state.items() if not bool(torch.isfinite(t).all())]
        raise Unprocessable(f"non-finite values (NaN/Inf) in {bad[:3]}", code="non_finite")
    peak = max((float(t.abs().max()) for t in state.values() if t.numel()), default=0.0)
    if not math.isfinite(peak) or peak > MAX_ABS_VALUE:
        raise Unprocessable(f"adapter values up to {peak:g} exceed {MAX_ABS_VALUE:g}", code="out_of_range")
    return {k: state[k].to(torch.float32).contiguous() for k in template}


def decode_upload(
    body: bytes,
    encoding: TensorEncoding,
    template: Mapping[str, tuple[int, ...]],
    *,
    max_decoded_bytes: int,
) -> dict[str, torch.Tensor]:
    """Decode and validate an uploaded adapter (CPU work: call it off the event loop)."""
    if not body:
        raise BadRequest("empty body: expected an encoded adapter (safetensors, optionally zstd)")
    try:
        state = decode_tensors(body, encoding, max_decoded_bytes=max_decoded_bytes)
    except PayloadTooLargeError as err:
        raise PayloadTooLarge(f"adapter too large: {err.message}") from None
    except CodecError as err:
        raise BadRequest(f"corrupt adapter: {err.message}", code="corrupt_adapter") from None
    return validate_state(state, template)


def encode_for_storage(state: Mapping[str, torch.Tensor]) -> bytes:
    return encode_tensors(state, BLOB_ENCODING)


def decode_stored(
    blob: bytes, template: Mapping[str, tuple[int, ...]], max_decoded_bytes: int
) -> dict[str, torch.Tensor]:
    """A stored blob back to tensors, checked again (the federation could have been recreated)."""
    state = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=max_decoded_bytes)
    return validate_state(state, template)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class UserAdapterStore:
    """The Redis side of personal adapters."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._put = redis.register_script(lua("put_user_adapter.lua"))

    async def put(self, record: AdapterRecord, blob: bytes) -> tuple[int, int]:
        """Store a new version (the record's ``version`` is ignored); returns ``(version, generation)``
        written."""
        fed, user = record.federation, record.user_id
        meta = record.model_dump_json(exclude={"version"})
        version, generation = await self._put(
            keys=[keys.user_adapter(fed, user), events_key(fed), keys.user_generations(fed)],
            args=[blob, meta, user_key(fed, user), record.digest, str(EVENTS_MAXLEN)],
        )
        return int(version), int(generation)

    async def generation(self, fed: str, user: str) -> int:
        """The user's current generation (0: never uploaded nor deleted)."""
        raw = await self.redis.hget(keys.user_generations(fed), user_key(fed, user))
        return 0 if raw is None else int(_text(raw))

    async def load(self, fed: str, user: str) -> tuple[int, tuple[AdapterRecord, bytes] | None]:
        """``(generation, (record, blob) or None)`` read in one atomic step (MULTI)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.user_generations(fed), user_key(fed, user))
            pipe.hmget(keys.user_adapter(fed, user), ["version", "meta", "blob"])
            gen_raw, raw = await pipe.execute()
        generation = 0 if gen_raw is None else int(_text(gen_raw))
        found = self._parse(raw, with_blob=True)
        if found is None:
            return generation, None
        record, blob = found
        assert blob is not None
        return generation, (record, blob)

    async def get(
        self, fed: str, user: str, *, with_blob: bool = True
    ) -> tuple[AdapterRecord, bytes | None] | None:
        fields = ["version", "meta", "blob"] if with_blob else ["version", "meta"]
        raw = await self.redis.hmget(keys.user_adapter(fed, user), fields)
        return self._parse(raw, with_blob=with_blob)

    @staticmethod
    def _parse(raw: list[Any], *, with_blob: bool) -> tuple[AdapterRecord, bytes | None] | None:
        if raw[0] is None or raw[1] is None:
            return None
        meta = json.loads(_text(raw[1]))
        meta["version"] = int(_text(raw[0]))
        record = AdapterRecord.model_validate(meta)
        blob = raw[2] if with_blob else None
        if with_blob and blob is None:
            return None
        return record, (blob if isinstance(blob, bytes) or blob is None else blob.encode())

    async def delete(self, fed: str, user: str) -> bool:
        """Erase the user's adapter and announce it; False if there was none."""
        digest = user_key(fed, user)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.user_adapter(fed, user))
            pipe.hincrby(keys.user_generations(fed), digest, 1)  # a tombstone: loads in flight lose
            pipe.xadd(
                events_key(fed),
                {"op": "delete", "user": digest},
                maxlen=EVENTS_MAXLEN,
                approximate=True,
            )
            deleted, _, _ = await pipe.execute()
        return bool(deleted)
