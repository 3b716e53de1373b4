"""Signature forgeries, replays, and base versions outside the federation's window."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from schemas.codec import encode_tensors, sha256_hex
from schemas.errors import RejectReason
from schemas.events import Envelope, TensorEncoding, TrainingMetrics
from schemas.frame import encode_frame
from schemas.signing import generate_key
from tests.fuzz.cases.base import GeneratorBase
from tests.fuzz.cases.model import Case, Party

R = RejectReason


class ForgeryCases(GeneratorBase):
    """``forged``, ``replayed``, ``future_base`` and ``too_stale`` cases (raw path)."""

    def raw_forged(self) -> Case:
        rng = self.rng
        F = R.SIGNATURE_INVALID

        def env_case(variant: str, env: Envelope[Any]) -> Case:
            return self.raw("forged", variant, [encode_frame(env)], F, update_id=env.data.update_id)

        def tampered(variant: str, **changes: Any) -> Case:
            env = self.signed(tag="g")
            data = env.data.model_copy(update=changes)
            return env_case(variant, env.model_copy(update={"data": data}))

        def tampered_attr(variant: str, **changes: Any) -> Case:
            env = self.signed(tag="g")
            return env_case(variant, env.model_copy(update=changes))

        options: dict[str, Callable[[], Case]] = {
            "wrong_key": lambda: env_case("wrong_key", self.signed(tag="g", key=generate_key())),
            "unsigned": lambda: env_case("unsigned", self.signed(tag="g", key=None)),
            "unknown_client": lambda: env_case(
                "unknown_client", self.signed(tag="g", party=Party(f"ghost-{self.serial}", generate_key()))
            ),
            "other_clients_id": lambda: env_case(  # claims to be `other`, signed with our key
                "signed_by_another_client",
                self.signed(tag="g", party=Party(self.other.client_id, self.client.key)),
            ),
            "impersonation": lambda: tampered(
                "client_id_swapped_after_signing", client_id=self.other.client_id
            ),
            "copied_signature": lambda: tampered(
                "signature_of_another_update", signature=self.signed(tag="g").data.signature
            ),
            "flipped_signature": lambda: self._flipped_signature(),
            "num_samples": lambda: tampered("num_samples_tampered", num_samples=rng.randint(1000, 10**6)),
            "base_version": lambda: tampered(
                "base_version_tampered", base_version=self.version + rng.randint(1, 5)
            ),
            "update_id": lambda: tampered("update_id_tampered", update_id=self.uid("g2")),
            "metrics": lambda: tampered(
                "metrics_tampered", metrics=TrainingMetrics(loss_after=0.0, steps=99)
            ),
            "encoding": lambda: tampered("encoding_tampered", encoding=TensorEncoding(dtype="float16")),
            "time": lambda: self._tampered_time(),
            "event_id": lambda: tampered_attr("event_id_tampered", id="0123456789abcdef"),
            "source": lambda: tampered_attr("source_tampered", source="pfi://client/mallory"),
            "subject": lambda: tampered_attr("subject_tampered", subject=None),
            "payload_swap": lambda: self._consistent_swap(),
            "forged_chunked": lambda: self._chunked_forgery(),
        }
        return self.pick(options)

    def _flipped_signature(self) -> Case:
        env = self.signed(tag="g")
        sig = env.data.signature
        i = self.rng.randrange(64)
        new = sig[:i] + ("0" if sig[i] != "0" else "1") + sig[i + 1 :]
        env = env.model_copy(update={"data": env.data.model_copy(update={"signature": new})})
        return self.raw(
            "forged",
            "signature_hex_flipped",
            [encode_frame(env)],
            R.SIGNATURE_INVALID,
            update_id=env.data.update_id,
        )

    def _tampered_time(self) -> Case:
        env = self.signed(tag="g")
        env = env.model_copy(update={"time": env.time - timedelta(seconds=self.rng.randint(1, 10**6))})
        return self.raw(
            "forged", "time_tampered", [encode_frame(env)], R.SIGNATURE_INVALID, update_id=env.data.update_id
        )

    def _consistent_swap(self) -> Case:
        env = self.signed(tag="g")
        evil = encode_tensors(self.delta(scale=5.0), TensorEncoding())
        data = env.data.model_copy(update={"payload": evil, "payload_sha256": sha256_hex(evil)})
        env = env.model_copy(update={"data": data})
        return self.raw(
            "forged",
            "payload_swapped_consistently",
            [encode_frame(env)],
            R.SIGNATURE_INVALID,
            update_id=env.data.update_id,
        )

    def _chunked_forgery(self) -> Case:
        env = self.signed(tag="g", key=generate_key())
        chunks = self.split(env, self.rng.choice([1024, 2048]))
        return self.raw(
            "forged", "chunked_wrong_key", list(chunks), R.SIGNATURE_INVALID, update_id=env.data.update_id
        )

    def raw_future_base(self) -> Case:
        env = self.signed(tag="fb", base_version=self.future_base())
        return self.raw(
            "future_base", "future", [encode_frame(env)], R.FUTURE_BASE_VERSION, update_id=env.data.update_id
        )

    def raw_too_stale(self) -> Case:
        base = self.too_stale_base()
        if base is None:
            raise RuntimeError("too_stale case placed before enough versions exist")
        env = self.signed(tag="ts", base_version=base)
        return self.raw(
            "too_stale", "too_stale", [encode_frame(env)], R.TOO_STALE, update_id=env.data.update_id
        )

    def raw_replayed(self) -> Case:
        rng = self.rng
        if not self.valid:
            raise RuntimeError("replay placed before any valid update")
        original = rng.choice(self.valid)
        D = R.DUPLICATE
        variant = rng.choice(["same_frame", "re_signed_same_id", "re_chunked"])
        if variant == "same_frame":
            messages: list[bytes | None] = [encode_frame(original)]
        elif variant == "re_signed_same_id":
            env = self.signed(tag="r", update_id=original.data.update_id)
            messages = [encode_frame(env)]
        else:
            messages = list(self.split(original, rng.choice([1024, 2048])))
        return self.raw("replayed", variant, messages, D, update_id=original.data.update_id)
