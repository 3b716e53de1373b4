"""The event contract: envelopes, type/version resolution, field-named errors, fingerprints."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.errors import RejectReason, SchemaError, UnknownEventTypeError
from schemas.events import (
    AdapterUpdate,
    FederationSpec,
    GlobalVersionPublished,
    LoraSpec,
    TensorEncoding,
    make_envelope,
    parse_envelope,
    utcnow,
)


def _update_dict() -> dict[str, Any]:
    spec = FederationSpec(name="fed", base_model="pfi/tiny-llama")
    update = AdapterUpdate(
        federation="fed",
        client_id="alice",
        update_id="u-1",
        base_version=3,
        num_samples=12,
        spec_fingerprint=spec.fingerprint(),
        encoding=TensorEncoding(),
        payload_sha256="0" * 64,
        payload=b"\x00\x01",
    )
    return make_envelope(update, source="pfi://client/alice", subject="fed").model_dump(mode="json")


def test_round_trip_resolves_the_model_from_the_type() -> None:
    raw = _update_dict()
    assert raw["type"] == "ai.pfi.adapter-update.v1"
    assert raw["specversion"] == "1.0"
    envelope = parse_envelope(raw)
    assert isinstance(envelope.data, AdapterUpdate)
    assert envelope.data.payload == b"\x00\x01"
    assert envelope.data.base_version == 3


@pytest.mark.parametrize("event_type", ["ai.pfi.adapter-update.v2", "ai.pfi.nonsense.v1", "com.other.v1"])
def test_unknown_type_or_version_is_a_typed_error(event_type: str) -> None:
    raw = _update_dict() | {"type": event_type}
    with pytest.raises(UnknownEventTypeError) as info:
        parse_envelope(raw)
    assert info.value.field == "type"
    assert info.value.reason is RejectReason.UNKNOWN_EVENT_TYPE


def test_unknown_specversion() -> None:
    with pytest.raises(UnknownEventTypeError) as info:
        parse_envelope(_update_dict() | {"specversion": "0.3"})
    assert info.value.field == "specversion"


def test_extra_field_is_named() -> None:
    raw = _update_dict()
    raw["data"]["surprise"] = 1
    with pytest.raises(SchemaError) as info:
        parse_envelope(raw)
    assert info.value.field == "data.surprise"
    assert info.value.reason is RejectReason.SCHEMA_INVALID


@pytest.mark.parametrize("field", ["base_version", "num_samples", "client_id", "spec_fingerprint"])
def test_missing_field_is_named(field: str) -> None:
    raw = _update_dict()
    del raw["data"][field]
    with pytest.raises(SchemaError) as info:
        parse_envelope(raw)
    assert info.value.field == f"data.{field}"


def test_wrong_value_is_named() -> None:
    raw = _update_dict()
    raw["data"]["base_version"] = -1
    with pytest.raises(SchemaError) as info:
        parse_envelope(raw)
    assert info.value.field == "data.base_version"


def test_expected_type_is_enforced() -> None:
    with pytest.raises(UnknownEventTypeError):
        parse_envelope(_update_dict(), GlobalVersionPublished)


def test_envelope_attribute_missing() -> None:
    raw = _update_dict()
    del raw["source"]
    with pytest.raises(SchemaError) as info:
        parse_envelope(raw)
    assert info.value.field == "source"


def test_fingerprint_depends_on_shape_defining_fields_only() -> None:
    base = FederationSpec(name="a", base_model="pfi/tiny-llama")
    renamed = base.model_copy(update={"name": "b"})
    other_rank = base.model_copy(update={"lora": LoraSpec(rank=16)})
    other_agg = FederationSpec(name="a", base_model="pfi/tiny-llama", aggregation={"buffer_size": 9})  # type: ignore[arg-type]
    assert base.fingerprint() == renamed.fingerprint() == other_agg.fingerprint()
    assert base.fingerprint() != other_rank.fingerprint()


def test_version_event_round_trip() -> None:
    event = GlobalVersionPublished(
        federation="fed",
        version=2,
        parent=1,
        digest="a" * 64,
        num_updates=3,
        size_bytes=10,
        created_at=utcnow(),
    )
    raw = make_envelope(event, source="pfi://aggregator/x").model_dump(mode="json")
    assert parse_envelope(raw).data == event
