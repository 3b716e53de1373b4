"""Bad tensors: wrong shapes, NaN/Inf, poisoned (over-norm) deltas, and oversized frames/payloads."""

from __future__ import annotations

import safetensors.torch
import torch
import zstandard

from modeling.lora import StateDict
from schemas.codec import SCALE_SUFFIX
from schemas.errors import RejectReason
from schemas.events import TensorEncoding
from schemas.frame import MAGIC, encode_frame
from tests.fuzz.cases.base import GeneratorBase
from tests.fuzz.cases.chunks import signed
from tests.fuzz.cases.frames import INT8, make_frame, parts_of, u32
from tests.fuzz.cases.model import Case

R = RejectReason


class TensorCases(GeneratorBase):
    """``shape``, ``non_finite``, ``poisoned`` and ``oversized`` cases (raw path).

    The bad deltas (:meth:`bad_shape_delta`, :meth:`non_finite_delta`, :meth:`poison_delta`) are reused by
    the SDK path."""

    def bad_shape_delta(self) -> tuple[str, StateDict]:
        rng = self.rng
        d = self.delta()
        name = rng.choice(self.names)
        variant = rng.choice(
            [
                "transposed",
                "missing",
                "extra",
                "renamed",
                "flat",
                "three_d",
                "empty_dim",
                "scalar",
                "rank8",
                "only_one",
            ]
        )
        if variant == "transposed":
            d[name] = d[name].T.contiguous()
        elif variant == "missing":
            del d[name]
        elif variant == "extra":
            d[name.replace("q_proj", "k_proj").replace("v_proj", "o_proj")] = torch.zeros(4, 64)
        elif variant == "renamed":
            d[name + ".bak"] = d.pop(name)
        elif variant == "flat":
            d[name] = d[name].flatten()
        elif variant == "three_d":
            d[name] = d[name].unsqueeze(0)
        elif variant == "empty_dim":
            d[name] = torch.zeros(0, d[name].shape[1])
        elif variant == "scalar":
            d[name] = torch.tensor(0.5)
        elif variant == "rank8":
            d = {
                k: torch.zeros(8, s[1]) if s[0] == 4 else torch.zeros(s[0], 8) for k, s in self.shapes.items()
            }
        else:
            d = {name: d[name]}
        return variant, d

    def raw_shape(self) -> Case:
        variant, d = self.bad_shape_delta()
        env = self.signed(d, tag="sh")
        return self.raw("shape", variant, [encode_frame(env)], R.SHAPE_MISMATCH, update_id=env.data.update_id)

    def non_finite_delta(self) -> tuple[str, StateDict, TensorEncoding]:
        rng = self.rng
        d = self.delta()
        name = rng.choice(self.names)
        kind = rng.choice(["nan", "inf", "-inf", "all_nan", "fp16_overflow"])
        flat = d[name].view(-1)
        i = rng.randrange(flat.numel())
        if kind == "nan":
            flat[i] = float("nan")
        elif kind == "inf":
            flat[i] = float("inf")
        elif kind == "-inf":
            flat[i] = float("-inf")
        elif kind == "all_nan":
            d[name] = torch.full_like(d[name], float("nan"))
        else:
            flat[i] = 1e6  # finite in fp32, inf once the SDK casts it to float16
            return kind, d, TensorEncoding(dtype="float16")
        dtype = rng.choice(["float32", "float16", "bfloat16"])
        return kind, d, TensorEncoding(dtype=dtype)  # type: ignore[arg-type]

    def raw_non_finite(self) -> Case:
        kind, d, encoding = self.non_finite_delta()
        env = self.signed(d, tag="nf", encoding=encoding)
        messages = [encode_frame(env)] if self.rng.random() < 0.7 else list(self.split(env, 2048))
        return self.raw(
            "non_finite", f"{kind}_{encoding.dtype}", messages, R.NON_FINITE, update_id=env.data.update_id
        )

    def poison_delta(self) -> tuple[str, StateDict]:
        """A delta of 100x the honest norm (the honest delta's direction, or its reverse)."""
        honest = self.delta()
        sign = self.rng.choice([1.0, -1.0])
        return ("x100" if sign > 0 else "x-100"), {k: v * (100.0 * sign) for k, v in honest.items()}

    def raw_poisoned(self) -> Case:
        variant, d = self.poison_delta()
        if self.rng.random() < 0.2:  # just over the bound
            honest = self.delta()
            norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in honest.values())))
            d = {k: v * (self.norm_bound * 1.05 / norm) for k, v in honest.items()}
            variant = "just_over_bound"
        env = self.signed(d, tag="p")
        return self.raw(
            "poisoned", variant, [encode_frame(env)], R.NORM_EXCEEDED, update_id=env.data.update_id
        )

    def raw_oversized(self) -> Case:
        rng = self.rng
        OV = R.OVERSIZED
        cap, decoded_cap = self.limits.max_update_bytes, self.limits.max_decoded_bytes

        def big_frame() -> Case:
            frame = encode_frame(self.signed(tag="o"))
            return self.raw(
                "oversized",
                "frame_over_cap",
                [frame + rng.randbytes(cap - len(frame) + rng.randint(1, 4096))],
                OV,
            )

        def big_header() -> Case:
            header, payload = parts_of(encode_frame(self.signed(tag="o")))
            header = {**header, "data": {**header["data"], "padding": "x" * (cap + rng.randint(1, 1000))}}
            return self.raw("oversized", "header_over_cap", [make_frame(header, payload)], OV)

        def declared_header() -> Case:
            return self.raw(
                "oversized",
                "declared_header_len_over_cap",
                [MAGIC + u32(rng.randint(2**20 + 1, 2**32 - 1)) + b"{}"],
                OV,
            )

        def bomb_declared() -> Case:
            blob = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(
                b"\0" * (decoded_cap + rng.randint(1, 4 * decoded_cap))
            )
            env = self.forged(blob, TensorEncoding(), tag="o")
            return self.raw(
                "oversized", "zstd_bomb_declared_size", [encode_frame(env)], OV, update_id=env.data.update_id
            )

        def bomb_streamed() -> Case:
            cobj = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
            blob = cobj.compress(b"\0" * (decoded_cap * rng.randint(2, 16))) + cobj.flush()
            env = self.forged(blob, TensorEncoding(), tag="o")
            return self.raw(
                "oversized", "zstd_bomb_streamed", [encode_frame(env)], OV, update_id=env.data.update_id
            )

        def int8_expansion() -> Case:
            n = decoded_cap // 4 + rng.randint(16, 4096)  # fits on the wire as int8, not as float32
            blob = bytes(
                safetensors.torch.save(
                    {
                        self.names[0]: torch.zeros(n, dtype=torch.int8),
                        self.names[0] + SCALE_SUFFIX: torch.ones(()),
                    }
                )
            )
            env = self.forged(blob, INT8, tag="o")
            return self.raw(
                "oversized", "int8_decodes_over_cap", [encode_frame(env)], OV, update_id=env.data.update_id
            )

        def chunk_total() -> Case:
            env = self.signed(tag="o")
            (first, *_) = self.split(env, 1024)
            header, payload = parts_of(first)
            header["data"]["total_size"] = cap + rng.randint(1, 10**9)
            return self.raw(
                "oversized",
                "chunk_total_size_over_cap",
                [make_frame(signed(header, self.client.key), payload)],  # the client's own lie
                OV,
                update_id=env.data.update_id,
            )

        return self.pick(
            {
                "big_frame": big_frame,
                "big_header": big_header,
                "declared_header": declared_header,
                "bomb_declared": bomb_declared,
                "bomb_streamed": bomb_streamed,
                "int8": int8_expansion,
                "chunk_total": chunk_total,
            }
        )
