"""The rows every attack adds to (expected and observed outcome, see the package doc), forged chunks, and
the exactly-once audit of the honest updates.

Every attack function takes the :class:`~bench.attacks.rig.Rig` (processes running, devices enrolled) and
adds rows to an :class:`Attacks`; none raises for a refused attack: an attack that was *not* refused is a
row with ``ok = False``, the benchmark's figure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench.attacks.rig import Pair, Rig
from bench.common import say
from schemas.events import AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame, encode_frame
from schemas.signing import sign_chunk


@dataclass
class Row:
    name: str
    group: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Attacks:
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, group: str, expected: str, observed: str, ok: bool) -> None:
        self.rows.append(Row(name, group, expected, observed, ok))
        say(f"  {'ok ' if ok else 'NOT REFUSED'} {group}/{name}: expected {expected}, observed {observed}")

    def http(self, name: str, group: str, response: httpx.Response, *allowed: int) -> None:
        code = ""
        with contextlib.suppress(Exception):
            code = str(response.json()["error"]["code"])
        observed = f"{response.status_code} {code}".strip()
        self.add(name, group, "/".join(map(str, allowed)), observed, response.status_code in allowed)

    async def http_or_reset(
        self, name: str, group: str, request: Awaitable[httpx.Response], *allowed: int
    ) -> None:
        """Like :meth:`http` for a request whose oversized body the server refuses before reading it: the
        server answers and closes with the rest of the body unread, and the TCP reset that follows can
        reach the client before the answer does (a client that sends ``Expect: 100-continue`` sees the
        answer). Either way nothing was read: a reset counts as refused."""
        try:
            response = await request
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as err:
            expected = "/".join(map(str, allowed)) + " (or reset)"
            self.add(name, group, expected, f"reset ({type(err).__name__})", True)
            return
        self.http(name, group, response, *allowed)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]


def chunk_envelope(message: bytes) -> Envelope[AdapterUpdateChunk]:
    return decode_frame(message, max_frame_bytes=1 << 24, expected=AdapterUpdateChunk)


def forged_chunk(like: bytes, *, key: bytes | None, **data: Any) -> bytes:
    """A chunk with ``like``'s ids and other content, signed with ``key`` (unsigned when None)."""
    envelope = chunk_envelope(like)
    payload = os.urandom(len(envelope.data.payload))
    changed = envelope.data.model_copy(
        update={
            "payload": payload,
            "chunk_sha256": hashlib.sha256(payload).hexdigest(),
            "total_sha256": hashlib.sha256(payload + b"forged").hexdigest(),
            "signature": None,
            **data,
        }
    )
    forged = envelope.model_copy(update={"data": changed})
    return encode_frame(sign_chunk(forged, key) if key is not None else forged)


# ---------------------------------------------------------------------------------------------- audit


async def audit(rig: Rig) -> dict[str, Any]:
    """Every honest upload is accepted by the ingest, then in exactly one version (and in the seen window
    while a retained version could accept it again)."""
    counts: Counter[Pair] = Counter()
    versions: dict[str, int] = {}
    must_be_seen: set[Pair] = set()
    for fed in (rig.main.name, rig.weights.name):
        metas = await rig.metas(fed)
        versions[fed] = len(metas)
        keep = (await rig.store.require_spec(fed)).aggregation.keep_versions
        head = max((m.version for m in metas), default=0)
        for meta in metas:
            for u in meta.updates:
                counts[(fed, u.client_id, u.update_id)] += 1
                # the seen window keeps at least the updates of the newest keep - 1 versions (one lineage
                # here); older ones may be forgotten once no retained version could accept them again
                if meta.version >= head - keep + 2:
                    must_be_seen.add((fed, u.client_id, u.update_id))
    sent = rig.honest_sent
    lost = [p for p in sent if counts[p] == 0]
    double = [p for p in sent if counts[p] > 1]
    unseen = [p for p in sent if p in must_be_seen and not await rig.store.is_seen(*p)]
    return {
        "honest_sent": len(sent),
        "refused": len(rig.honest_refused),
        "aggregated": sum(counts[p] >= 1 for p in sent),
        "lost": len(lost),
        "double_counted": len(double),
        "not_in_seen_set": len(unseen),
        "lost_ids": [list(p) for p in lost][:20],
        "versions": versions,
    }
