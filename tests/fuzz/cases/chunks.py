"""Chunked uploads that are corrupt, inconsistent, duplicated, truncated or lie about the whole."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from schemas.chunking import split_frame
from schemas.codec import sha256_hex
from schemas.errors import RejectReason
from schemas.events import canonical_json
from tests.fuzz.cases.base import GeneratorBase
from tests.fuzz.cases.frames import make_frame, parts_of
from tests.fuzz.cases.model import Case

R = RejectReason


def signed(header: dict[str, Any], key: bytes) -> dict[str, Any]:
    """A chunk header (edited by a case) signed again by the client: such chunks are what the client
    itself could send, so they reach the reassembler's checks (an unsigned or forged one is refused
    ``signature_invalid`` before; see tests/integration/test_aggregator_untrusted.py)."""
    unsigned = {**header, "data": {k: v for k, v in header["data"].items() if k != "signature"}}
    mac = hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()
    return {**header, "data": {**header["data"], "signature": mac}}


class ChunkCases(GeneratorBase):
    """``chunks`` cases (raw path)."""

    def raw_chunks(self) -> Case:
        """Chunked uploads that are corrupt, inconsistent, duplicated, truncated or lie about the whole."""
        rng = self.rng
        env = self.signed(tag="ch")
        chunks = self.split(env, rng.choice([700, 1024, 1500]))
        n = len(chunks)
        uid = env.data.update_id
        C, E = R.CHUNK_CORRUPT, R.CHUNK_EXPIRED

        def edit(i: int, **changes: Any) -> bytes:
            header, payload = parts_of(chunks[i])
            header["data"].update(changes)
            return make_frame(signed(header, self.client.key), payload)

        def rehash(i: int, payload: bytes, **changes: Any) -> bytes:
            header, _ = parts_of(chunks[i])
            header["data"].update({"chunk_sha256": sha256_hex(payload), **changes})
            return make_frame(signed(header, self.client.key), payload)

        def flipped_alone() -> Case:
            i = rng.randrange(n)
            header, payload = parts_of(chunks[i])
            bad = bytearray(payload)
            bad[rng.randrange(len(bad))] ^= 0xFF
            return self.raw(
                "chunks", "chunk_sha_mismatch", [make_frame(header, bytes(bad))], C, update_id=uid
            )

        def flipped_after_first() -> Case:
            header, payload = parts_of(chunks[1])
            bad = bytearray(payload)
            bad[0] ^= 0x01
            return self.raw(
                "chunks",
                "corrupt_second_then_expired",
                [chunks[0], make_frame(header, bytes(bad))],
                [(1, C), (0, E)],
                update_id=uid,
            )

        def index_past_count() -> Case:
            return self.raw(
                "chunks", "index_past_count", [edit(0, index=n + rng.randint(0, 100))], C, update_id=uid
            )

        def count_over_size() -> Case:
            header, _ = parts_of(chunks[0])
            total = header["data"]["total_size"]
            return self.raw(
                "chunks",
                "count_over_total_size",
                [edit(0, count=total + rng.randint(1, 50))],
                C,
                update_id=uid,
            )

        def empty_chunk() -> Case:
            return self.raw("chunks", "empty_chunk", [rehash(0, b"")], C, update_id=uid)

        def chunk_bigger_than_total() -> Case:
            _, payload = parts_of(chunks[0])
            return self.raw(
                "chunks",
                "chunk_larger_than_total",
                [edit(0, total_size=max(len(payload) - 1, n))],
                C,
                update_id=uid,
            )

        def inconsistent_count() -> Case:
            return self.raw(
                "chunks",
                "inconsistent_count",
                [chunks[0], edit(1, count=n + 1)],
                [(1, C), (0, E)],
                update_id=uid,
            )

        def inconsistent_total() -> Case:
            # Another whole digest is another upload (keyed by it): both stay incomplete and expire.
            return self.raw(
                "chunks",
                "inconsistent_total_sha",
                [chunks[0], edit(1, total_sha256="ab" * 32)],
                [(1, E), (0, E)],
                update_id=uid,
            )

        def duplicate_index() -> Case:
            _, payload = parts_of(chunks[0])
            other = bytearray(payload)
            other[-1] ^= 0x10
            return self.raw(
                "chunks",
                "same_index_other_bytes",
                [chunks[0], rehash(0, bytes(other))],
                [(1, R.CHUNK_DUPLICATE), (0, E)],
                update_id=uid,
            )

        def truncated_upload() -> Case:
            k = rng.randint(1, n - 1)
            return self.raw("chunks", "upload_never_completed", list(chunks[:k]), [(0, E)], update_id=uid)

        def lying_total_sha() -> Case:
            lie = "cd" * 32
            return self.raw(
                "chunks",
                "whole_sha_mismatch",
                [edit(i, total_sha256=lie) for i in range(n)],
                C,
                update_id=uid,
            )

        def sizes_do_not_add_up() -> Case:
            # Two non-empty chunks whose sizes add up to less than the announced total.
            a, b = b"\x01" * 10, b"\x02" * 10
            total = 25
            msgs = [rehash(0, a, count=2, total_size=total), rehash(1, b, count=2, index=1, total_size=total)]
            return self.raw("chunks", "sizes_below_total", list(msgs), C, update_id=uid)

        def over_total() -> Case:
            _, payload0 = parts_of(chunks[0])
            total = len(payload0) + 5
            p1 = b"\x03" * 10
            msgs = [edit(0, count=3, total_size=total), rehash(1, p1, count=3, index=1, total_size=total)]
            return self.raw("chunks", "sizes_over_total", list(msgs), [(1, C), (0, E)], update_id=uid)

        def whole_not_a_frame() -> Case:
            blob = b"NOPE" + rng.randbytes(rng.randint(1500, 4000))
            msgs = split_frame(
                blob,
                federation=self.spec.name,
                client_id=self.client.client_id,
                update_id=uid,
                chunk_bytes=1024,
                source="pfi://x",
                key=self.client.key,
            )
            return self.raw("chunks", "whole_is_not_a_frame", list(msgs), R.MALFORMED, update_id=uid)

        def whole_is_a_chunk() -> Case:
            inner = chunks[0]
            msgs = split_frame(
                inner,
                federation=self.spec.name,
                client_id=self.client.client_id,
                update_id=self.uid("nest"),
                chunk_bytes=256,
                source="pfi://x",
                key=self.client.key,
            )
            return self.raw("chunks", "whole_is_a_chunk", list(msgs), R.UNKNOWN_EVENT_TYPE)

        def key_mismatch() -> Case:
            ghost_env = self.signed(tag="ch", federation=self.ghost.name)
            msgs = self.split(ghost_env, 2048)
            return self.raw(
                "chunks",
                "chunk_key_mismatch",
                [msgs[0]],
                R.SCHEMA_INVALID,
                update_id=ghost_env.data.update_id,
            )

        return self.pick(
            {
                "flipped_alone": flipped_alone,
                "flipped_after_first": flipped_after_first,
                "index_past_count": index_past_count,
                "count_over_size": count_over_size,
                "empty": empty_chunk,
                "bigger": chunk_bigger_than_total,
                "inc_count": inconsistent_count,
                "inc_total": inconsistent_total,
                "dup": duplicate_index,
                "truncated": truncated_upload,
                "lying": lying_total_sha,
                "sizes": sizes_do_not_add_up,
                "over_total": over_total,
                "not_frame": whole_not_a_frame,
                "nested": whole_is_a_chunk,
                "key_mismatch": key_mismatch,
            }
        )
