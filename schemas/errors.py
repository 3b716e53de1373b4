"""The one exception hierarchy of PFI.

Every error a PFI component raises on purpose is a :class:`PFIError`. Errors that stand for a
rejected input carry a :class:`RejectReason`, the code written into dead-letter records and used as
the ``reason`` label of rejection counters, so that "why was this dropped" always has one answer.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why an inbound update (or one of its chunks) was refused. Stable: used in DLQ records and metrics."""

    MALFORMED = "malformed"  # bytes that are not a PFI frame / not decodable at all
    SCHEMA_INVALID = "schema_invalid"  # a frame whose header fails validation (missing/extra/wrong field)
    UNKNOWN_EVENT_TYPE = "unknown_event_type"  # type or version this consumer does not know
    SIGNATURE_INVALID = "signature_invalid"  # missing, forged or tampered signature; unknown client key
    UNKNOWN_FEDERATION = "unknown_federation"
    SPEC_MISMATCH = "spec_mismatch"  # trained against another federation spec (fingerprint differs)
    SHAPE_MISMATCH = "shape_mismatch"  # tensor names/shapes/dtypes differ from the federation's adapter
    NON_FINITE = "non_finite"  # NaN or Inf in a tensor
    NORM_EXCEEDED = "norm_exceeded"  # L2 norm over the configured bound (reject mode)
    DUPLICATE = "duplicate"  # update id already aggregated or buffered (replay)
    TOO_STALE = "too_stale"  # staleness over max_staleness
    FUTURE_BASE_VERSION = "future_base_version"  # base_version newer than the current global version
    UNKNOWN_BASE_VERSION = "unknown_base_version"  # base_version not in the current lineage (rolled back)
    OVERSIZED = "oversized"  # over the configured update size cap
    CHUNK_CORRUPT = "chunk_corrupt"  # chunk or reassembled digest mismatch, inconsistent chunk headers
    CHUNK_DUPLICATE = "chunk_duplicate"  # the same chunk index twice with different content
    CHUNK_EXPIRED = "chunk_expired"  # an upload whose chunks did not all arrive in time
    UPLOAD_QUOTA = "upload_quota"  # a new chunked upload over its client's in-flight uploads/bytes quota
    REASSEMBLY_FULL = "reassembly_full"  # a new chunked upload while the process-wide bound is full
    FEDERATION_UNAVAILABLE = "federation_unavailable"  # the federation exists but cannot be loaded
    INTERNAL_ERROR = "internal_error"  # an unexpected failure handling this message (logged; never a crash)
    CLIENT_RATE_LIMITED = "client_rate_limited"  # a client's update beyond one buffered + one parked
    FOLD_FAILED = "fold_failed"  # a buffered update the merge could not fold (isolated; the rest is merged)


class PFIError(Exception):
    """Root of every deliberate PFI error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(PFIError):
    """Settings or a file the operator supplied are invalid."""


class StackError(PFIError):
    """The local Kafka/Redis stack could not be installed, started, stopped or reached."""


class RejectedInput(PFIError):
    """Base of errors that reject an inbound input; carries the dead-letter reason code."""

    reason: RejectReason = RejectReason.MALFORMED

    def __init__(self, message: str, *, reason: RejectReason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class SchemaError(RejectedInput):
    """An event failed validation. ``field`` names the offending field (dotted path) when known."""

    reason = RejectReason.SCHEMA_INVALID

    def __init__(self, message: str, *, field: str | None = None, reason: RejectReason | None = None) -> None:
        text = f"{field}: {message}" if field else message
        super().__init__(text, reason=reason)
        self.field = field


class UnknownEventTypeError(SchemaError):
    """The event's ``type`` (name or version suffix) or ``specversion`` is not one this code reads."""

    reason = RejectReason.UNKNOWN_EVENT_TYPE


class CodecError(RejectedInput):
    """Bytes that cannot be decoded into a frame or a tensor state dict."""

    reason = RejectReason.MALFORMED


class PayloadTooLargeError(CodecError):
    """A payload (compressed or decompressed) over the configured cap."""

    reason = RejectReason.OVERSIZED


class ChunkError(RejectedInput):
    """A chunk that cannot be placed: corrupt, inconsistent, duplicated or part of an expired upload."""

    reason = RejectReason.CHUNK_CORRUPT


class SignatureError(RejectedInput):
    """Missing, malformed or wrong signature, or no key for the claimed client."""

    reason = RejectReason.SIGNATURE_INVALID
