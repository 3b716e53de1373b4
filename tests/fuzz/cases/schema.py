"""Well-framed envelopes that break the schema: bad fields, unknown types, foreign specs and federations."""

from __future__ import annotations

import hashlib
from typing import Any

from schemas.codec import encode_tensors
from schemas.errors import RejectReason
from schemas.events import (
    AdapterUpdateChunk,
    GlobalVersionPublished,
    LoraSpec,
    TensorEncoding,
    UpdateRejected,
    make_envelope,
    utcnow,
)
from schemas.frame import encode_frame
from tests.fuzz.cases.base import GeneratorBase
from tests.fuzz.cases.frames import make_frame, parts_of
from tests.fuzz.cases.model import Case

R = RejectReason


class SchemaCases(GeneratorBase):
    """``schema``, ``unknown_type``, ``spec_mismatch`` and ``unknown_federation`` cases (raw path)."""

    def raw_schema(self) -> Case:
        rng = self.rng
        env = self.signed(tag="s")
        frame = encode_frame(env)
        header, payload = parts_of(frame)
        data = header["data"]
        S = R.SCHEMA_INVALID

        def with_data(variant: str, **changes: Any) -> Case:
            new = {**header, "data": {**data, **changes}}
            return self.raw("schema", variant, [make_frame(new, payload)], S)

        required = [
            "federation",
            "client_id",
            "update_id",
            "base_version",
            "num_samples",
            "spec_fingerprint",
            "encoding",
            "payload_sha256",
        ]
        bad_values: dict[str, list[Any]] = {
            "base_version": ["latest", -1, 1.5, None, [0], {"v": 1}],
            "num_samples": [0, -3, "many", None, 2.5, 10**400, 2**64],
            "federation": ["Bad Name!", "", None, 7, "x" * 100],
            "client_id": ["bad id", "", None, ["c"], "-leading-dash"],
            "update_id": ["has space", "u" * 200, None, "", "ünï"],
            "spec_fingerprint": ["abc", "G" * 64, None, "A" * 64],
            "payload_sha256": ["ABC", "0" * 63, None, "g" * 64],
            "signature": ["zz", "A" * 64, 12, "0" * 65],
            "encoding": [
                {"dtype": "float64"},
                {"compression": "gzip"},
                {"quantization": "int4"},
                "zstd",
                None,
                {"dtype": "float32", "endianness": "big"},
            ],
            "metrics": [None, {"steps": -1}, {"train_seconds": -1.0}, {"bogus": 1}, "fine"],
            "dp": [
                {"clip_norm": 0, "noise_multiplier": 1},
                {"mechanism": "laplace", "clip_norm": 1, "noise_multiplier": 1},
                5,
                {"clip_norm": 1},
            ],
        }
        bad_attrs: dict[str, list[Any]] = {
            "id": ["bad id!", "", 5, None],
            "source": ["", "s" * 300, None, 3],
            "time": ["yesterday", "2024-13-45T00:00:00Z", None, "10000-01-01T00:00:00Z"],
            "datacontenttype": ["text/plain", None],
            "subject": [5, ["x"]],
            "data": [None, "payload", []],
        }

        def missing_field() -> Case:
            name = rng.choice(required)
            return self.raw(
                "schema",
                f"missing_data_{name}",
                [make_frame({**header, "data": {k: v for k, v in data.items() if k != name}}, payload)],
                S,
            )

        def missing_attr() -> Case:
            name = rng.choice(["id", "source", "time", "data"])
            return self.raw(
                "schema",
                f"missing_attr_{name}",
                [make_frame({k: v for k, v in header.items() if k != name}, payload)],
                S,
            )

        def bad_value() -> Case:
            name = rng.choice(sorted(bad_values))
            return with_data(f"bad_data_{name}", **{name: rng.choice(bad_values[name])})

        def bad_attr() -> Case:
            name = rng.choice(sorted(bad_attrs))
            return self.raw(
                "schema",
                f"bad_attr_{name}",
                [make_frame({**header, name: rng.choice(bad_attrs[name])}, payload)],
                S,
            )

        def extra_field() -> Case:
            return with_data(
                "extra_data_field", **{rng.choice(["priority", "weight", "trust"]): rng.randint(0, 9)}
            )

        def extra_attr() -> Case:
            return self.raw(
                "schema", "extra_attribute", [make_frame({**header, "traceparent": "00-ab"}, payload)], S
            )

        def payload_in_header() -> Case:
            return with_data("payload_inside_header", payload="AAAA")

        def type_not_string() -> Case:
            return self.raw(
                "schema",
                "type_not_string",
                [make_frame({**header, "type": rng.choice([5, None, ["t"]])}, payload)],
                S,
            )

        def missing_type() -> Case:
            return self.raw(
                "schema",
                "missing_type",
                [make_frame({k: v for k, v in header.items() if k != "type"}, payload)],
                S,
            )

        def chunk_type_update_body() -> Case:
            return self.raw(
                "schema",
                "chunk_type_update_body",
                [make_frame({**header, "type": AdapterUpdateChunk.event_type()}, payload)],
                S,
            )

        def key_mismatch() -> Case:
            other = self.signed(tag="s", federation=self.ghost.name)
            return self.raw(
                "schema", "message_key_mismatch", [encode_frame(other)], S, update_id=other.data.update_id
            )

        def huge_samples_signed() -> Case:
            # A *correctly signed* update claiming more samples than a float64 can hold.
            payload2 = encode_tensors(self.delta(), TensorEncoding())
            forged = self.forged(
                payload2, TensorEncoding(), tag="s", num_samples=rng.choice([10**400, 10**309, 2**1100])
            )
            return self.raw(
                "schema",
                "num_samples_overflow_signed",
                [encode_frame(forged)],
                S,
                update_id=forged.data.update_id,
            )

        return self.pick(
            {
                "missing_field": missing_field,
                "missing_attr": missing_attr,
                "bad_value": bad_value,
                "bad_value2": bad_value,
                "bad_attr": bad_attr,
                "extra_field": extra_field,
                "extra_attr": extra_attr,
                "payload_in_header": payload_in_header,
                "type_not_string": type_not_string,
                "missing_type": missing_type,
                "chunk_type": chunk_type_update_body,
                "key_mismatch": key_mismatch,
                "huge_samples": huge_samples_signed,
            }
        )

    def raw_unknown_type(self) -> Case:
        rng = self.rng
        header, payload = parts_of(encode_frame(self.signed(tag="t")))
        U = R.UNKNOWN_EVENT_TYPE

        def bad_type() -> Case:
            value = rng.choice(
                [
                    "ai.pfi.adapter-update.v2",
                    "ai.pfi.adapter-update.v0",
                    "ai.pfi.adapter-update.v10",
                    "ai.pfi.adapter-update",
                    "AI.PFI.ADAPTER-UPDATE.V1",
                    "ai.pfi.nope.v1",
                    "",
                    "com.example.update.v1",
                    "ai.pfi.adapter-update.v1 ",
                ]
            )
            return self.raw(
                "unknown_type", "unknown_type", [make_frame({**header, "type": value}, payload)], U
            )

        def bad_specversion() -> Case:
            new = {**header, "specversion": rng.choice(["0.3", "2.0", 1.0, None, "1.0.0"])}
            if rng.random() < 0.2:
                new.pop("specversion")
            return self.raw("unknown_type", "specversion", [make_frame(new, payload)], U)

        def misplaced() -> Case:
            if rng.random() < 0.5:
                event: Any = GlobalVersionPublished(
                    federation=self.spec.name,
                    version=3,
                    parent=2,
                    digest="0" * 64,
                    num_updates=1,
                    size_bytes=1,
                    created_at=utcnow(),
                )
            else:
                event = UpdateRejected(reason=R.MALFORMED, detail="x", rejected_at=utcnow())
            return self.raw(
                "unknown_type", "misplaced_event", [encode_frame(make_envelope(event, source="pfi://x"))], U
            )

        return self.pick({"bad_type": bad_type, "bad_specversion": bad_specversion, "misplaced": misplaced})

    def raw_spec_mismatch(self) -> Case:
        rng = self.rng
        others = [
            self.spec.model_copy(update={"seed": rng.randint(1, 10**6)}),
            self.spec.model_copy(
                update={"lora": LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))}
            ),
            self.spec.model_copy(update={"base_model": "pfi/other-model"}),
        ]
        fp = rng.choice([o.fingerprint() for o in others] + [hashlib.sha256(rng.randbytes(8)).hexdigest()])
        env = self.signed(tag="x", spec_fingerprint=fp)
        return self.raw(
            "spec_mismatch",
            "other_fingerprint",
            [encode_frame(env)],
            R.SPEC_MISMATCH,
            update_id=env.data.update_id,
        )

    def raw_unknown_federation(self) -> Case:
        rng = self.rng
        UF = R.UNKNOWN_FEDERATION
        variant = rng.choice(["ghost_federation", "ghost_chunks", "no_key", "non_utf8_key", "random_key"])
        if variant == "ghost_federation":
            env = self.signed(tag="uf", federation=self.ghost.name)
            return self.raw(
                "unknown_federation", variant, [encode_frame(env)], UF, key=self.ghost.name.encode()
            )
        if variant == "ghost_chunks":
            env = self.signed(tag="uf", federation=self.ghost.name)
            chunks: list[bytes | None] = list(self.split(env, 2048))
            return self.raw(
                "unknown_federation",
                variant,
                chunks,
                [(i, UF) for i in range(len(chunks))],
                key=self.ghost.name.encode(),
            )
        env = self.signed(tag="uf")
        key = {
            "no_key": None,
            "non_utf8_key": b"\xff\xfe" + rng.randbytes(6),
            "random_key": f"nope-{rng.randrange(10**9)}".encode(),
        }[variant]
        return self.raw("unknown_federation", variant, [encode_frame(env)], UF, key=key)
