"""Attacks on the ingest route: tokens, signatures, garbage and oversized bodies, quotas."""

from __future__ import annotations

from typing import Any

from bench.attacks.rig import Device, Rig, random_delta
from bench.attacks.shared import Attacks, forged_chunk
from schemas.frame import encode_frame
from schemas.signing import generate_key

# -------------------------------------------------------------------------------------------- ingest


async def ingest(rig: Rig, out: Attacks, a: Device, b: Device, hog: Device) -> None:
    fed = rig.main.name
    frame = encode_frame(a.update(random_delta(rig.shapes, 2), base_version=0))
    out.http("ingest_no_token", "ingest", await rig.post_update(fed, frame, None), 401)
    out.http("ingest_client_id_not_token", "ingest", await rig.post_update(fed, frame, b.token), 403)
    forged = encode_frame(a.update(random_delta(rig.shapes, 3), base_version=0, key=generate_key()))
    out.http("ingest_bad_signature", "ingest", await rig.post_update(fed, forged, a.token), 403)
    unsigned = encode_frame(a.update(random_delta(rig.shapes, 4), base_version=0, key=False))
    out.http("ingest_unsigned_update", "ingest", await rig.post_update(fed, unsigned, a.token), 403)
    env = a.update(random_delta(rig.shapes, 5), base_version=0)
    chunks = rig.messages(a, env, 1024)
    naked = forged_chunk(chunks[0], key=None)
    out.http("ingest_unsigned_chunk", "ingest", await rig.post_update(fed, naked, a.token), 403)
    other_key = forged_chunk(chunks[0], key=generate_key())
    out.http(
        "ingest_chunk_signed_by_other_key", "ingest", await rig.post_update(fed, other_key, a.token), 403
    )
    out.http("ingest_garbage_frame", "ingest", await rig.post_update(fed, b"\x00garbage" * 100, a.token), 400)
    limit = rig.settings.kafka_max_message_bytes
    await out.http_or_reset(
        "ingest_oversized_declared", "ingest", rig.post_update(fed, b"\x00" * (limit + 1), a.token), 413
    )

    async def stream() -> Any:
        for _ in range(limit // 65536 + 2):
            yield b"\x00" * 65536

    await out.http_or_reset(
        "ingest_oversized_streamed", "ingest", rig.post_update(fed, stream(), a.token), 413
    )
    # per-client byte quota: the hog sends (garbage) bodies just under the message cap until refused
    statuses = []
    for _ in range(64):
        r = await rig.post_update(fed, b"\x00" * (limit - 4096), hog.token)
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    retry = r.headers.get("Retry-After")
    out.add(
        "ingest_client_quota", "ingest", "429 + Retry-After",
        f"{r.status_code} after {len(statuses)} bodies (Retry-After {retry})",
        r.status_code == 429 and bool(retry),
    )  # fmt: skip
    # a message for another federation under this one's path
    wrong_fed = a.update(random_delta(rig.shapes, 6), base_version=0)
    other = wrong_fed.model_copy(
        update={"data": wrong_fed.data.model_copy(update={"federation": rig.weights.name})}
    )
    out.http(
        "ingest_other_federation_message",
        "ingest",
        await rig.post_update(fed, encode_frame(other), a.token),
        403,
    )
