"""Bad updates sent through the SDK, and bad input the SDK itself refuses before sending."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pydantic
import torch

from clients.updates import build_update
from schemas.codec import SCALE_SUFFIX
from schemas.errors import CodecError, RejectReason, SchemaError
from schemas.events import TensorEncoding
from schemas.signing import generate_key
from tests.fuzz.cases.model import SDK, Case, Party, RefusedCase
from tests.fuzz.cases.tensors import TensorCases

R = RejectReason


class SdkCases(TensorCases):
    """The SDK path (:meth:`sdk_case`) and :meth:`refused`."""

    def sdk_case(self, category: str) -> Case:
        rng = self.rng
        if category == "forged":
            variant, key, party = rng.choice(
                [
                    ("wrong_key", generate_key(), None),
                    ("unsigned", None, None),
                    ("other_clients_key", self.other.key, None),
                    ("unregistered_client", "own", Party(self.uid("nobody"), generate_key())),
                ]
            )
            if (
                party is not None
            ):  # not registered: each of its chunks is refused on arrival, not only the whole
                env = self.signed(tag="sg", key=key, party=party)
                return self.sdk_per_message("forged", variant, env, R.SIGNATURE_INVALID)
            return self.sdk(
                "forged", variant, self.signed(tag="sg", key=key, party=party), R.SIGNATURE_INVALID
            )
        if category == "non_finite":
            kind, d, encoding = self.non_finite_delta()
            return self.sdk(
                "non_finite",
                f"{kind}_{encoding.dtype}",
                self.signed(d, tag="snf", encoding=encoding),
                R.NON_FINITE,
            )
        if category == "poisoned":
            variant, d = self.poison_delta()
            return self.sdk("poisoned", variant, self.signed(d, tag="sp"), R.NORM_EXCEEDED)
        if category == "shape":
            variant, d = self.bad_shape_delta()
            return self.sdk("shape", variant, self.signed(d, tag="ssh"), R.SHAPE_MISMATCH)
        if category == "spec_mismatch":
            fp = hashlib.sha256(rng.randbytes(8)).hexdigest()
            return self.sdk(
                "spec_mismatch",
                "random_fingerprint",
                self.signed(tag="sx", spec_fingerprint=fp),
                R.SPEC_MISMATCH,
            )
        if category == "future_base":
            return self.sdk(
                "future_base",
                "future",
                self.signed(tag="sfb", base_version=self.future_base()),
                R.FUTURE_BASE_VERSION,
            )
        if category == "too_stale":
            base = self.too_stale_base()
            if base is None:
                raise RuntimeError("too_stale case placed before enough versions exist")
            return self.sdk("too_stale", "too_stale", self.signed(tag="sts", base_version=base), R.TOO_STALE)
        if category == "unknown_federation":
            env = self.signed(
                tag="suf", federation=self.ghost.name, spec_fingerprint=self.ghost.fingerprint()
            )
            return self.sdk_per_message("unknown_federation", "ghost_federation", env, R.UNKNOWN_FEDERATION)
        if category == "replayed":
            if not self.valid:
                raise RuntimeError("replay placed before any valid update")
            original = rng.choice(self.valid)
            return Case(
                "replayed",
                "sdk_resend",
                SDK,
                envelope=original,
                expect=[(-1, R.DUPLICATE)],
                update_id=original.data.update_id,
            )
        if category == "oversized":
            d = self.delta()
            d[self.names[0]] = torch.randn(4, self.limits.max_update_bytes // 16 + rng.randint(1, 2000))
            env = self.signed(d, tag="so", encoding=TensorEncoding(compression="none"))
            return self.sdk_per_message("oversized", "over_cap_chunked_by_sdk", env, R.OVERSIZED)
        raise ValueError(category)

    def refused(self) -> list[RefusedCase]:
        """Bad input the SDK refuses with a typed error before sending anything."""
        d = self.delta

        def build(**kw: Any) -> Callable[[], object]:
            args: dict[str, Any] = {
                "federation": self.spec.name,
                "client_id": self.client.client_id,
                "spec_fingerprint": self.fingerprint,
                "base_version": 0,
                "num_samples": 5,
                "key": self.client.key,
            }
            if "delta" not in kw:
                kw["delta"] = d()
            return lambda: build_update(**{**args, **kw})

        nan = d()
        nan[self.names[0]][0, 0] = float("nan")
        V = SchemaError  # build_update names the bad field in a typed error
        out = [
            RefusedCase("empty_delta", build(delta={}), CodecError),
            RefusedCase("non_tensor_value", build(delta={**d(), self.names[0]: [1.0, 2.0]}), CodecError),
            RefusedCase(
                "integer_tensor",
                build(delta={**d(), self.names[0]: torch.ones(4, 64, dtype=torch.int32)}),
                CodecError,
            ),
            RefusedCase(
                "nan_with_int8", build(delta=nan, encoding=TensorEncoding(quantization="int8")), CodecError
            ),
            RefusedCase(
                "scale_suffix_name",
                build(
                    delta={"x" + SCALE_SUFFIX: torch.ones(2, 2)}, encoding=TensorEncoding(quantization="int8")
                ),
                CodecError,
            ),
            RefusedCase("metadata_name", build(delta={"__metadata__": torch.ones(2)}), CodecError),
            RefusedCase("num_samples_zero", build(num_samples=0), V),
            RefusedCase("num_samples_overflow", build(num_samples=10**400), V),
            RefusedCase("negative_base_version", build(base_version=-1), V),
            RefusedCase("bad_federation_name", build(federation="Bad Name!"), V),
            RefusedCase("bad_client_id", build(client_id="bad id"), V),
            RefusedCase("bad_update_id", build(update_id="has space"), V),
            RefusedCase("bad_fingerprint", build(spec_fingerprint="xyz"), V),
            RefusedCase("bad_encoding", lambda: TensorEncoding(dtype="float64"), pydantic.ValidationError),  # type: ignore[arg-type]
            RefusedCase("bad_dp", lambda: build(dp={"clip_norm": -1, "noise_multiplier": 1})(), V),
        ]
        return out
