"""Raw bytes that are not a well-formed frame, and signed updates whose payload does not decode."""

from __future__ import annotations

from collections.abc import Callable

import safetensors.torch
import torch

from schemas.codec import SCALE_SUFFIX, encode_tensors
from schemas.errors import RejectReason
from schemas.events import GlobalVersionPublished, TensorEncoding, make_envelope, utcnow
from schemas.frame import MAGIC, encode_frame
from tests.fuzz.cases.base import GeneratorBase
from tests.fuzz.cases.frames import INT8, canonical, lying_safetensors, make_frame, parts_of, u32
from tests.fuzz.cases.model import Case

R = RejectReason


class FramingCases(GeneratorBase):
    """``malformed`` and ``codec`` cases (raw path)."""

    def raw_malformed(self) -> Case:
        rng = self.rng
        frame = encode_frame(self.signed(tag="m"))
        header, payload = parts_of(frame)
        M = R.MALFORMED

        def garbage() -> Case:
            blob = rng.randbytes(rng.randint(1, 4000))
            return self.raw("malformed", "garbage", [b"Q" + blob], M)

        def truncated() -> Case:
            return self.raw("malformed", "truncated", [frame[: rng.randrange(0, len(frame))]], M)

        def payload_flip() -> Case:
            flipped = bytearray(payload)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            return self.raw("malformed", "payload_bit_flip", [make_frame(header, bytes(flipped))], M)

        def payload_swap() -> Case:
            other = encode_frame(self.signed(tag="m"))
            return self.raw("malformed", "payload_swapped", [make_frame(header, parts_of(other)[1])], M)

        def payload_extra() -> Case:
            return self.raw("malformed", "payload_appended", [frame + rng.randbytes(rng.randint(1, 64))], M)

        def not_utf8() -> Case:
            body = b"\xff" + rng.randbytes(rng.randint(0, 200))
            return self.raw("malformed", "header_not_utf8", [MAGIC + u32(len(body)) + body + payload], M)

        def not_json() -> Case:
            body = rng.choice([b"{not json", b"{'single': 'quotes'}", b'{"a":1,}', b"", b"[1,2", b"NaNx"])
            return self.raw("malformed", "header_not_json", [MAGIC + u32(len(body)) + body + payload], M)

        def not_object() -> Case:
            body = rng.choice([b"[]", b"[1,2,3]", b"42", b'"text"', b"null", b"true", b"1e999"])
            return self.raw("malformed", "header_not_object", [MAGIC + u32(len(body)) + body + payload], M)

        def duplicate_key() -> Case:
            text = canonical(header)
            body = b'{"id":"dup",' + text[1:] if b'"id"' in text else text
            return self.raw("malformed", "duplicate_json_key", [MAGIC + u32(len(body)) + body + payload], M)

        def deep() -> Case:
            depth = rng.randint(2000, 8000)
            body = b'{"data":' + b"[" * depth + b"]" * depth + b"}"
            return self.raw("malformed", "deeply_nested_json", [MAGIC + u32(len(body)) + body], M)

        def bad_magic() -> Case:
            magic = rng.choice([b"PFI\x02", b"PFI\x00", b"pfi\x01", b"\x00\x00\x00\x00"])
            return self.raw("malformed", "bad_magic", [magic + frame[4:]], M)

        def short() -> Case:
            return self.raw("malformed", "shorter_than_prefix", [frame[: rng.randint(0, 7)]], M)

        def length_past_end() -> Case:
            body = canonical(header)
            extra = rng.randint(1, 10_000)
            return self.raw(
                "malformed",
                "header_length_past_end",
                [MAGIC + u32(len(body) + len(payload) + extra) + body + payload],
                M,
            )

        def trailing_on_payloadless() -> Case:
            event = GlobalVersionPublished(
                federation=self.spec.name,
                version=1,
                parent=0,
                digest="0" * 64,
                num_updates=1,
                size_bytes=1,
                created_at=utcnow(),
            )
            tail = rng.randbytes(rng.randint(1, 100))
            return self.raw(
                "malformed",
                "payloadless_event_with_bytes",
                [encode_frame(make_envelope(event, source="x")) + tail],
                M,
            )

        def tombstone() -> Case:
            return self.raw("malformed", "tombstone_or_empty", [rng.choice([None, b""])], M)

        def huge_int() -> Case:
            text = canonical(header).replace(b'"num_samples":', b'"num_samples":' + b"9" * 5000 + b',"x":', 1)
            return self.raw(
                "malformed", "int_over_json_digit_limit", [MAGIC + u32(len(text)) + text + payload], M
            )

        return self.pick(
            {
                "garbage": garbage,
                "truncated": truncated,
                "payload_flip": payload_flip,
                "payload_swap": payload_swap,
                "payload_extra": payload_extra,
                "not_utf8": not_utf8,
                "not_json": not_json,
                "not_object": not_object,
                "duplicate_key": duplicate_key,
                "deep": deep,
                "bad_magic": bad_magic,
                "short": short,
                "length_past_end": length_past_end,
                "trailing": trailing_on_payloadless,
                "tombstone": tombstone,
                "huge_int": huge_int,
            }
        )

    def raw_codec(self) -> Case:
        """Correctly signed updates whose payload does not decode (MALFORMED from the codec)."""
        rng = self.rng
        M = R.MALFORMED
        fp32 = TensorEncoding(dtype="float32", compression="none")
        good = encode_tensors(self.delta(), TensorEncoding())

        def case(variant: str, payload: bytes, encoding: TensorEncoding) -> Case:
            env = self.forged(payload, encoding, tag="codec")
            return self.raw("codec", variant, [encode_frame(env)], M, update_id=env.data.update_id)

        def options() -> dict[str, Callable[[], Case]]:
            return {
                "not_zstd": lambda: case(
                    "not_zstd", b"\x00" + rng.randbytes(rng.randint(0, 500)), TensorEncoding()
                ),
                "zstd_truncated": lambda: case(
                    "zstd_truncated", good[: rng.randint(4, len(good) - 1)], TensorEncoding()
                ),
                "zstd_trailing": lambda: case(
                    "zstd_trailing", good + rng.randbytes(rng.randint(1, 40)), TensorEncoding()
                ),
                "zstd_bad_header": lambda: case(
                    "zstd_bad_header", good[:4] + b"\xff\xff" + good[6:], TensorEncoding()
                ),
                "safetensors_garbage": lambda: case(
                    "safetensors_garbage", rng.randbytes(rng.randint(0, 600)), fp32
                ),
                "safetensors_lying_header": lambda: case(
                    "safetensors_lying_header", lying_safetensors(self.names[0]), fp32
                ),
                "no_tensors": lambda: case("no_tensors", bytes(safetensors.torch.save({})), fp32),
                "dtype_not_declared": lambda: case(
                    "dtype_not_declared",
                    encode_tensors(self.delta(), fp32),
                    fp32.model_copy(update={"dtype": "float16"}),
                ),
                "integer_tensors": lambda: case(
                    "integer_tensors",
                    bytes(
                        safetensors.torch.save(
                            {k: torch.zeros(s, dtype=torch.int64) for k, s in self.shapes.items()}
                        )
                    ),
                    fp32,
                ),
                "int8_orphan_scale": lambda: case("int8_orphan_scale", self._int8_blob("orphan"), INT8),
                "int8_missing_scale": lambda: case("int8_missing_scale", self._int8_blob("missing"), INT8),
                "int8_scale_shape": lambda: case("int8_scale_shape", self._int8_blob("shape"), INT8),
                "int8_float_values": lambda: case("int8_float_values", self._int8_blob("float"), INT8),
            }

        return self.pick(options())

    def _int8_blob(self, flaw: str) -> bytes:
        good = dict(
            safetensors.torch.load(
                encode_tensors(self.delta(), TensorEncoding(quantization="int8", compression="none"))
            )
        )
        name = self.rng.choice(self.names)
        if flaw == "orphan":
            good["ghost.weight" + SCALE_SUFFIX] = torch.ones(())
        elif flaw == "missing":
            del good[name + SCALE_SUFFIX]
        elif flaw == "shape":
            good[name + SCALE_SUFFIX] = torch.ones(3, 3)
        else:
            good[name] = good[name].to(torch.float32)
        return bytes(safetensors.torch.save(good))
