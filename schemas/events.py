"""Event contract: a CloudEvents 1.0 envelope around versioned PFI event payloads.

Every event type is named ``ai.pfi.<name>.v<major>``. Producers build envelopes with
:func:`make_envelope`; consumers parse with :func:`parse_envelope`, which refuses unknown types or
versions, extra and missing fields with a :class:`~schemas.errors.SchemaError` naming the field.
``source`` + ``id`` is the idempotency key of an event.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from schemas.errors import RejectReason, SchemaError, UnknownEventTypeError

SPECVERSION = "1.0"
TYPE_PREFIX = "ai.pfi."
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
MAX_NUM_SAMPLES = 2**53  # exact in float64 (aggregation weights are float math)
ROBUST_MIN_UPDATES = 3  # a median/trimmed mean of fewer updates is one client's value
PARKED_PER_SLOT = 4  # parked second updates per buffer slot (see AggregationSpec.max_parked)


class StrictModel(BaseModel):
    """Base of every PFI schema: no unknown fields, immutable, bytes as base64 in JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


class LoraSpec(StrictModel):
    """The LoRA adapter config. Determines the adapter's tensor names and shapes."""

    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(default=("q_proj", "v_proj"), min_length=1)


class AggregationSpec(StrictModel):
    """How the aggregator merges updates of a federation (see ARCHITECTURE.md, "Aggregation").

    What a client claims is bounded here, not trusted (issue 12, "Server-side weighting"):

    * ``weighting`` defaults to ``"uniform"``: every update of a version weighs the same, whatever
      ``num_samples`` it claims. ``"samples"`` weighs by ``min(num_samples, max_num_samples)``; the cap
      (default 1024: a generous on-device LoRA round is a few hundred examples, and 2**53 claimed samples
      weigh no more than 1024) bounds a liar's share by ``cap / (cap + n - 1)`` of a version of ``n``.
    * Every delta is L2-bounded (``max_update_norm``, clipped or rejected). ``None`` (no bound: one client
      can then move the global arbitrarily far) is refused unless ``allow_unbounded_norm`` is set.
    * The robust combiners need at least 3 updates per version, so ``buffer_size >= 3``, and a timed-out
      flush with fewer waits for more (see :attr:`flush_min_updates`); ``trimmed_mean`` must trim at least
      one update per side of a full buffer (``floor(trim_ratio * buffer_size) >= 1``), and trims at least
      one per side of a smaller timed-out flush too.
    * At most ``max_client_updates`` (default 1) updates per client enter a buffer: the next ones wait
      (parked, in arrival order) for the next buffer; as many parked per client and ``4 * buffer_size`` per
      federation, beyond that an update is refused (``client_rate_limited``). More than 1 multiplies what
      one client can do to a version (see the bound); it exists for single-client harnesses and trusted
      fleets.

    ``services.aggregator.math.bounds.influence_bound`` gives, per version, how far one client can move the
    global under this spec (with the derivation).
    """

    buffer_size: int = Field(default=4, ge=1, description="K of FedBuff; 1 is FedAsync")
    flush_timeout_s: float = Field(default=30.0, gt=0, description="flush a non-empty buffer after this")
    min_updates: int = Field(
        default=1, ge=1, description="fewest updates a timed-out flush commits (robust combiners: >= 3)"
    )
    server_lr: float = Field(default=1.0, gt=0)
    # This and ``robust`` name the aggregator's registered strategies (services/aggregator/math/strategies/):
    # schemas/ cannot import services/, so a new strategy adds its name here too (a unit test checks).
    server_optimizer: Literal["none", "momentum", "adam", "yogi"] = "none"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.99, ge=0.0, lt=1.0)
    adam_eps: float = Field(default=1e-3, gt=0)
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    staleness_a: float = Field(default=0.5, ge=0.0)
    staleness_b: float = Field(default=4.0, ge=0.0, description="hinge: no discount up to b")
    max_staleness: int = Field(default=16, ge=0)
    max_client_updates: int = Field(default=1, ge=1, description="updates of one client in one buffer")
    weighting: Literal["samples", "uniform"] = "uniform"
    max_num_samples: int = Field(
        default=1024, ge=1, le=MAX_NUM_SAMPLES, description="cap on a client's claimed num_samples (weights)"
    )
    lora_mode: Literal["fedit", "ffa"] = "fedit"
    robust: Literal["none", "trimmed_mean", "median"] = "none"
    trim_ratio: float = Field(default=0.25, ge=0.0, lt=0.5)
    # Bounded above so that sums of K clipped float32 deltas (and their squares) stay finite.
    max_update_norm: float | None = Field(default=100.0, gt=0, le=1e6, description="L2 bound of one delta")
    allow_unbounded_norm: bool = Field(default=False, description="permit max_update_norm=None")
    norm_policy: Literal["clip", "reject"] = "clip"
    dp_noise_multiplier: float = Field(default=0.0, ge=0.0, description="server-side Gaussian noise")
    dp_delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    keep_versions: int = Field(default=20, ge=2)
    # Issue 15 (hierarchical aggregation, services/aggregator/hierarchy): "single" = one aggregator owns the
    # federation (its updates keyed by federation); "hierarchical" = updates keyed by client over every
    # partition, leaf aggregators fold partial aggregates, one root makes the versions.
    topology: Literal["single", "hierarchical"] = "single"

    @model_validator(mode="after")
    def _bounded(self) -> AggregationSpec:
        if self.topology == "hierarchical" and self.robust != "none":
            raise ValueError(
                f"robust={self.robust!r} needs every update of a version in one place (an order statistic "
                "cannot be computed from partial sums): topology='hierarchical' supports robust='none' "
                "(norm bounding at the leaves) only"
            )
        if self.max_update_norm is None and not self.allow_unbounded_norm:
            raise ValueError(
                "max_update_norm=None lets one client move the global arbitrarily far: "
                "set a bound, or allow_unbounded_norm=true to accept that"
            )
        if self.max_update_norm is None and self.dp_noise_multiplier > 0:
            raise ValueError("server DP noise needs max_update_norm (the clipping bound) to be set")
        if self.robust != "none" and self.buffer_size < ROBUST_MIN_UPDATES:
            raise ValueError(
                f"robust={self.robust!r} needs buffer_size >= {ROBUST_MIN_UPDATES} "
                f"(an order statistic of fewer updates is one client's value), got {self.buffer_size}"
            )
        if self.robust == "trimmed_mean" and math.floor(self.trim_ratio * self.buffer_size) < 1:
            raise ValueError(
                f"trimmed_mean with trim_ratio={self.trim_ratio} and buffer_size={self.buffer_size} trims "
                f"nothing: need floor(trim_ratio * buffer_size) >= 1"
            )
        if self.max_client_updates > self.buffer_size:
            raise ValueError(
                f"max_client_updates ({self.max_client_updates}) exceeds buffer_size ({self.buffer_size})"
            )
        if self.min_updates > self.buffer_size:
            raise ValueError(f"min_updates ({self.min_updates}) exceeds buffer_size ({self.buffer_size})")
        return self

    @property
    def flush_min_updates(self) -> int:
        """The fewest updates a version is made of: a timed-out buffer with fewer keeps waiting (a full one,
        K updates, always flushes). ``min_updates``, and at least 3 for the robust combiners."""
        floor = ROBUST_MIN_UPDATES if self.robust != "none" else 1
        return min(self.buffer_size, max(self.min_updates, floor))

    @property
    def max_parked(self) -> int:
        """How many updates over their client's share of the buffer a federation holds for the next one."""
        return PARKED_PER_SLOT * self.buffer_size


class FederationSpec(StrictModel):
    """A federation: one base model, one task, one adapter config, one global adapter lineage."""

    name: str = Field(pattern=NAME_PATTERN)
    base_model: str = Field(min_length=1)
    task: str = Field(default="causal-lm", min_length=1)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    seed: int = 0

    def fingerprint(self) -> str:
        """Digest of what fixes the adapter's tensors (base model, task, LoRA config, seed of v0)."""
        shape_defining = {
            "base_model": self.base_model,
            "task": self.task,
            "lora": self.lora.model_dump(mode="json"),
            "seed": self.seed,
        }
        return hashlib.sha256(canonical_json(shape_defining)).hexdigest()


class TensorEncoding(StrictModel):
    """How the tensor payload of an update is encoded (see ``schemas.codec``)."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    quantization: Literal["none", "int8"] = "none"
    compression: Literal["none", "zstd"] = "zstd"


class DPMetadata(StrictModel):
    """Local differential privacy applied by the client before sending."""

    mechanism: Literal["gaussian"] = "gaussian"
    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)


MAX_REPORTED_LOSS = 100.0  # nats per token: ln(vocabulary size) of any real tokenizer is below 13


def _reported_loss(description: str) -> Any:
    """A client's quality report (issue 16): a number (never text), finite, 0..MAX_REPORTED_LOSS.
    Monitoring only: the aggregator never weighs by it (services/aggregator/quality.py)."""
    return Field(
        default=None,
        ge=0.0,
        le=MAX_REPORTED_LOSS,
        allow_inf_nan=False,
        strict=True,
        description=description,
    )


class TrainingMetrics(StrictModel):
    loss_before: float | None = None
    loss_after: float | None = None
    steps: int = Field(default=0, ge=0)
    train_seconds: float = Field(default=0.0, ge=0)
    # Issue 16, all optional (older clients send none): mean per-token NLL on the client's own
    # validation split, measured after local training.
    val_loss_global: float | None = _reported_loss("the global version trained from (base_version) alone")
    val_loss_personal: float | None = _reported_loss("that global + the client's personal adapter")
    val_loss_prev_global: float | None = _reported_loss("the global version the client had before it")

    @model_serializer(mode="wrap")
    def _omit_absent_reports(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Signatures cover the canonical dump (schemas.signing): an update of a client that predates
        # these fields must dump to the same bytes as before, so absent reports are left out.
        out: dict[str, Any] = handler(self)
        for name in QUALITY_REPORT_FIELDS:
            if out.get(name, 0) is None:
                del out[name]
        return out


QUALITY_REPORT_FIELDS = ("val_loss_global", "val_loss_personal", "val_loss_prev_global")


class Event(StrictModel):
    """Base of event payloads: subclasses set ``event_name`` and ``event_version``."""

    event_name: ClassVar[str] = ""
    event_version: ClassVar[int] = 1

    @classmethod
    def event_type(cls) -> str:
        return f"{TYPE_PREFIX}{cls.event_name}.v{cls.event_version}"


class AdapterUpdate(Event):
    """A client's adapter delta, trained from global ``base_version``. ``payload`` travels raw (framed)."""

    event_name: ClassVar[str] = "adapter-update"

    federation: str = Field(pattern=NAME_PATTERN)
    client_id: str = Field(pattern=ID_PATTERN)
    update_id: str = Field(pattern=ID_PATTERN)
    base_version: int = Field(ge=0)
    # Bounded so that sample weights stay finite float64 math: an unbounded JSON integer (10**400) made the
    # merge raise OverflowError on every flush and replay, wedging the federation.
    num_samples: int = Field(ge=1, le=MAX_NUM_SAMPLES)
    spec_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    encoding: TensorEncoding
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    payload: bytes = Field(repr=False)
    metrics: TrainingMetrics = Field(default_factory=TrainingMetrics)
    dp: DPMetadata | None = None
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class AdapterUpdateChunk(Event):
    """One ordered slice of a framed :class:`AdapterUpdate` too large for one Kafka message."""

    event_name: ClassVar[str] = "adapter-update-chunk"

    federation: str = Field(pattern=NAME_PATTERN)
    client_id: str = Field(pattern=ID_PATTERN)
    update_id: str = Field(pattern=ID_PATTERN)
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    total_size: int = Field(ge=1)
    total_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    chunk_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    payload: bytes = Field(repr=False)
    # HMAC-SHA256 by the client's key over the chunk's envelope (payload covered by ``chunk_sha256``):
    # every chunk is authenticated before a reassembler buffers any of it (see ``schemas.signing``).
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class GlobalVersionPublished(Event):
    """A new global adapter version was committed to Redis (or the latest pointer moved)."""

    event_name: ClassVar[str] = "global-version-published"

    federation: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=0)
    parent: int | None = None
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_updates: int = Field(ge=0)
    size_bytes: int = Field(ge=0)
    created_at: datetime
    rollback: bool = False


class UpdateRejected(Event):
    """Dead-letter record: an inbound message that was refused, and why."""

    event_name: ClassVar[str] = "update-rejected"

    reason: RejectReason
    detail: str
    federation: str | None = None
    client_id: str | None = None
    update_id: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    original_type: str | None = None
    rejected_at: datetime


E = TypeVar("E", bound=Event)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.event_type(): cls
    for cls in (AdapterUpdate, AdapterUpdateChunk, GlobalVersionPublished, UpdateRejected)
}


class Envelope(StrictModel, Generic[E]):
    """CloudEvents 1.0 attributes around one event payload."""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(pattern=ID_PATTERN)
    source: str = Field(min_length=1, max_length=256)
    type: str
    time: datetime
    subject: str | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    data: E


# ``Envelope[model]`` per event model, created once and kept. Pydantic caches parametrized generics only
# weakly, so a parametrization nothing else holds (a version announcement's) was garbage-collected and
# built again, class and validators, every few calls: a profile of the aggregator found an eighth of each
# version's commit in ``create_generic_submodel``. Bounded: event models are a fixed set.
_ENVELOPE_TYPES: dict[type[Any], type[Envelope[Any]]] = {}


def envelope_type(model: type[E]) -> type[Envelope[E]]:
    """``Envelope[model]``, parametrized once per event model."""
    cls = _ENVELOPE_TYPES.get(model)
    if cls is None:
        cls = _ENVELOPE_TYPES.setdefault(model, Envelope[model])  # type: ignore[valid-type]
    return cls


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_envelope(
    data: E, *, source: str, subject: str | None = None, event_id: str | None = None
) -> Envelope[E]:
    """Wrap ``data`` in an envelope with a fresh id (or ``event_id``) and the current time."""
    envelope: Envelope[E] = envelope_type(type(data))(
        id=event_id or uuid.uuid4().hex,
        source=source,
        type=type(data).event_type(),
        time=utcnow(),
        subject=subject,
        data=data,
    )
    return envelope


def field_of(err: ValidationError, prefix: str = "") -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return (f"{prefix}{loc}" if loc else prefix.rstrip(".")), first["msg"]


def parse_envelope(raw: dict[str, Any], expected: type[E] | None = None) -> Envelope[Any]:
    """Validate a decoded envelope; resolve its data model from ``type``.

    Raises :class:`UnknownEventTypeError` for an unknown ``specversion``/``type``/version (or one
    other than ``expected``), :class:`SchemaError` naming the field for anything else.
    """
    if not isinstance(raw, dict):
        raise SchemaError("an event must be a JSON object", field=None)
    if raw.get("specversion") != SPECVERSION:
        raise UnknownEventTypeError(
            f"unsupported specversion {raw.get('specversion')!r}", field="specversion"
        )
    event_type = raw.get("type")
    if not isinstance(event_type, str):
        raise SchemaError("missing or non-string event type", field="type")
    model = EVENT_TYPES.get(event_type)
    if model is None:
        raise UnknownEventTypeError(f"unknown event type or version {event_type!r}", field="type")
    if expected is not None and model is not expected:
        raise UnknownEventTypeError(f"expected {expected.event_type()!r}, got {event_type!r}", field="type")
    try:
        return envelope_type(model).model_validate(raw)
    except ValidationError as err:
        field, msg = field_of(err)
        reason = RejectReason.SCHEMA_INVALID
        raise SchemaError(msg, field=field, reason=reason) from None


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace) for digests and signatures."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
