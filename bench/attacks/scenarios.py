"""The attacks of issue 12, each a named row with its expected and observed outcome (see the package doc).

Every function takes the :class:`~bench.attacks.rig.Rig` (processes running, devices enrolled) and adds
rows to an :class:`Attacks`; none raises for a refused attack: an attack that was *not* refused is a row
with ``ok = False``, the benchmark's figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from bench.attacks.rig import Device, Pair, Rig, l2, random_delta, rss_bytes, tiny_spec
from bench.common import MIB, say
from schemas.events import MAX_NUM_SAMPLES, AdapterUpdateChunk, Envelope
from schemas.frame import decode_frame, encode_frame
from schemas.signing import generate_key, sign_chunk
from services.aggregator.math.bounds import influence_bound
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.identity import Enrollment
from services.personalization.auth import TokenSigner
from services.transport import kafka_kwargs

FAST_KAFKA = {"request_timeout_ms": 5000, "retry_backoff_ms": 50}
REVOCATION_DEADLINE_S = 5.0  # "a revocation takes effect ... within seconds"
FLOOD_ANSWER_S = 5.0  # a refused flood body is answered within this
#: Refusals of a flood body: the answers, or the server dropping the connection with the body unread.
REFUSED = {"401", "413", "reset"}


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


# ------------------------------------------------------------------------------------------ transport


async def _produce(connection: dict[str, Any], topic: str) -> None:
    producer = AIOKafkaProducer(**connection, **FAST_KAFKA)
    try:
        await producer.start()
        await producer.send_and_wait(topic, b"attack", key=b"k")
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()


async def _refused(coro: Any) -> tuple[bool, str]:
    try:
        await asyncio.wait_for(coro, 30)
    except (KafkaError, TimeoutError, OSError) as err:
        return True, type(err).__name__
    return False, "accepted"


async def transport(rig: Rig, out: Attacks) -> None:
    s = rig.settings
    plaintext = {"bootstrap_servers": s.kafka_bootstrap(), "security_protocol": "PLAINTEXT"}
    refused, seen = await _refused(_produce(plaintext, s.updates_topic))
    out.add("unauthenticated_producer", "kafka", "refused", seen, refused)
    wrong = {**kafka_kwargs(s, "ingest"), "sasl_plain_password": "wrong-" + uuid.uuid4().hex}
    refused, seen = await _refused(_produce(wrong, s.updates_topic))
    out.add("wrong_sasl_password", "kafka", "refused", seen, refused)
    # The ingest principal writes updates; reading them (everyone's plaintext deltas) is refused.
    await rig.kafka_send(rig.main.name, [b"probe"])  # a record to read (dead-lettered as malformed)
    consumer = AIOKafkaConsumer(**kafka_kwargs(s, "ingest"), enable_auto_commit=False, **FAST_KAFKA)
    read = 0
    try:
        await consumer.start()
        tps = [TopicPartition(s.updates_topic, p) for p in range(s.update_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        batch = await consumer.getmany(*tps, timeout_ms=2000)
        read = sum(len(v) for v in batch.values())
        observed = f"{read} records read"
    except (TopicAuthorizationFailedError, KafkaError) as err:
        observed = type(err).__name__
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    out.add("ingest_principal_reads_updates", "kafka", "refused (0 records)", observed, read == 0)


# ------------------------------------------------------------------------------------------- identity


async def identity(rig: Rig, out: Attacks, devices: list[Device], doomed: Device) -> None:
    a, b = devices[0], devices[1]
    fed, other = rig.main.name, rig.weights.name
    bearer = {"Authorization": f"Bearer {a.token}"}
    out.http(
        "device_token_other_federation",
        "identity",
        await rig.http.get(f"/v1/federations/{other}", headers=bearer),
        403,
    )
    r = await rig.post_update(other, b"x", a.token)
    out.http("device_token_upload_other_federation", "identity", r, 403)
    r = await rig.http.get(f"/v1/federations/{fed}/users/{b.client_id}/adapter", headers=bearer)
    out.http("device_token_as_other_user", "identity", r, 403)
    r = await rig.http.get(f"/v1/federations/{fed}/clients", headers=bearer)
    out.http("device_token_admin_list_clients", "identity", r, 403)
    r = await rig.http.post(f"/v1/federations/{fed}/enrollment-tokens", json={"uses": 5}, headers=bearer)
    out.http("device_token_admin_enrollment_token", "identity", r, 403)
    r = await rig.http.delete(f"/v1/federations/{fed}/clients/{b.client_id}", headers=bearer)
    out.http("device_token_admin_revoke", "identity", r, 403)
    # forged and garbled tokens: 401, never a 5xx
    body, _, sig = a.token.rpartition(".")
    other_secret = TokenSigner(os.urandom(32)).issue("ops", federation=fed, role="admin")
    forged: dict[str, bytes] = {
        "token_garbage": b"Bearer pfi1.garbage.token",
        "token_bad_signature": f"Bearer {body}.{sig[::-1]}".encode(),
        "token_other_secret_admin": f"Bearer {other_secret}".encode(),
        "token_truncated": f"Bearer {a.token[: len(a.token) // 2]}".encode(),
        "token_non_ascii": b"Bearer \xff\xfe\xc3pfi1.\xe9",
        "token_oversized": b"Bearer " + b"A" * 16000,
        "token_wrong_scheme": f"Basic {a.token}".encode(),
    }
    for name, header in forged.items():
        try:
            r = await rig.http.get(f"/v1/federations/{fed}", headers={b"Authorization": header})
            out.http(name, "identity", r, 401, *((400, 431) if name == "token_oversized" else ()))
        except httpx.HTTPError as err:  # a closed connection is a refusal too, never a 5xx
            out.add(name, "identity", "401", type(err).__name__, True)
    await enrollment_abuse(rig, out)
    # revocation: the operator revokes a client; its token (and uploads) die within seconds
    path = f"/v1/federations/{fed}"
    dh = {"Authorization": f"Bearer {doomed.token}"}
    before = (await rig.http.get(path, headers=dh)).status_code
    r = await rig.http.delete(
        f"/v1/federations/{fed}/clients/{doomed.client_id}", headers=rig.admin_headers(fed)
    )
    started = time.monotonic()
    status = before
    while time.monotonic() - started < 3 * REVOCATION_DEADLINE_S:
        status = (await rig.http.get(path, headers=dh)).status_code
        if status == 401:
            break
        await asyncio.sleep(0.05)
    took = time.monotonic() - started
    out.figures["revocation_seconds"] = round(took, 3)
    out.add(
        "revoked_client_token", "identity", f"401 within {REVOCATION_DEADLINE_S:.0f}s",
        f"{before} before, {status} after {took:.2f}s (revoke: {r.status_code})",
        before == 200 and status == 401 and took <= REVOCATION_DEADLINE_S,
    )  # fmt: skip
    env = doomed.update(random_delta(rig.shapes, 1), base_version=0)
    r = await rig.post_update(fed, encode_frame(env), doomed.token)
    out.http("revoked_client_upload", "identity", r, 401, 403)


async def enrollment_abuse(rig: Rig, out: Attacks) -> None:
    """Enrollment tokens: limited uses, one federation, a secret that must match."""
    fed, other = rig.main.name, rig.weights.name
    issued = await Enrollment(rig.redis).issue(fed, uses=1, ttl_s=600)

    async def enroll(path_fed: str, token: str, cid: str) -> httpx.Response:
        return await rig.http.post(
            f"/v1/federations/{path_fed}/enroll",
            json={"client_id": cid},
            headers={"Authorization": f"Bearer {token}"},
        )

    out.http("enroll_token_other_federation", "identity", await enroll(other, issued.token, "e-x"), 401, 403)
    fed_part, token_id, _secret = issued.token[len("pfe1.") :].rsplit(".", 2)
    wrong = f"pfe1.{fed_part}.{token_id}.{'A' * 43}"
    out.http("enroll_token_wrong_secret", "identity", await enroll(fed, wrong, "e-y"), 401)
    device = rig.signer.issue("someone", federation=fed, role="device")
    out.http("enroll_with_device_token", "identity", await enroll(fed, device, "e-z"), 401)
    first = await enroll(fed, issued.token, f"e-{uuid.uuid4().hex[:6]}")
    again = await enroll(fed, issued.token, f"e-{uuid.uuid4().hex[:6]}")
    out.add(
        "enroll_token_beyond_uses",
        "identity",
        "201 then 401",
        f"{first.status_code} then {again.status_code}",
        first.status_code == 201 and again.status_code == 401,
    )


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


async def malformed_json(rig: Rig, out: Attacks) -> None:
    fed = rig.main.name
    for route in ("generate", "score"):
        r = await rig.http.post(
            f"/v1/federations/{fed}/{route}",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        out.http(f"malformed_json_no_token_{route}", "serving", r, 401)


# -------------------------------------------------------------------------------------------- chunks


async def forged_chunks(rig: Rig, out: Attacks, victim: Device, attacker: Device) -> Pair:
    """A compromised producer injects chunks under the victim's (fed, client, update id) while the victim's
    chunked upload goes through the ingest: the victim's update is aggregated exactly once."""
    env = victim.update(random_delta(rig.shapes, 7), base_version=await rig.store.latest(rig.main.name) or 0)
    real = rig.messages(victim, env, 2048)
    fed = rig.main.name
    injected = [
        forged_chunk(real[0], key=None),
        forged_chunk(real[1], key=attacker.key),  # claims the victim's ids, signed by another key
        forged_chunk(real[0], key=attacker.key, client_id=attacker.client_id),  # its own, same update id
        forged_chunk(real[-1], key=generate_key(), index=0),
    ]
    statuses = [(await rig.post_update(fed, real[0], victim.token)).status_code]
    await rig.kafka_send(fed, injected)
    for message in real[1:]:
        statuses.append((await rig.post_update(fed, message, victim.token)).status_code)
    await rig.kafka_send(fed, [forged_chunk(real[-1], key=None)])
    pair = (fed, victim.client_id, env.data.update_id)
    if set(statuses) == {202}:
        rig.honest_sent.append(pair)
    landed = await rig.wait_seen([pair], 60.0)
    count = sum(m.update_ids.count(env.data.update_id) for m in await rig.metas(fed))
    out.add(
        "forged_chunks_into_kafka", "chunks", "victim's update aggregated once",
        f"{len(real)} real chunks ({statuses.count(202)} accepted), {len(injected) + 1} forged; "
        f"aggregated {count}x",
        landed and count == 1,
    )  # fmt: skip
    return pair


async def fake_uploads(rig: Rig, out: Attacks, victim: Device, count: int, claimed_bytes: int) -> Pair:
    """Large chunked uploads under invented client ids straight into Kafka while the victim's upload is in
    flight: each dead-lettered (signature), the victim's never evicted."""
    fed = rig.main.name
    env = victim.update(random_delta(rig.shapes, 8), base_version=await rig.store.latest(fed) or 0)
    real = rig.messages(victim, env, 2048)
    statuses = [(await rig.post_update(fed, real[0], victim.token)).status_code]
    piece = len(chunk_envelope(real[0]).data.payload)
    invented = [f"ghost-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    fakes = [
        forged_chunk(
            real[0], key=generate_key(), client_id=cid, update_id=f"u-{uuid.uuid4().hex[:12]}",
            total_size=claimed_bytes, count=max(2, claimed_bytes // piece),
        )
        for cid in invented
    ]  # fmt: skip
    await rig.kafka_send(fed, fakes)
    for message in real[1:]:
        statuses.append((await rig.post_update(fed, message, victim.token)).status_code)
    pair = (fed, victim.client_id, env.data.update_id)
    if set(statuses) == {202}:
        rig.honest_sent.append(pair)
    landed = await rig.wait_seen([pair], 60.0)
    ghosts = set(invented)
    records = await rig.wait_dead_letters(lambda rs: sum(r.client_id in ghosts for r in rs) >= count)
    reasons = Counter(str(getattr(r.reason, "value", r.reason)) for r in records if r.client_id in ghosts)
    signature = reasons.get("signature_invalid", 0)
    out.add(
        "fake_large_uploads_into_kafka", "chunks",
        f"{count} dead-lettered (signature_invalid), victim aggregated",
        f"dead-lettered {dict(reasons)}; victim {'aggregated' if landed else 'LOST'}",
        landed and signature == count,
    )  # fmt: skip
    out.figures["fake_uploads"] = {"count": count, "claimed_bytes_each": claimed_bytes}
    return pair


# ------------------------------------------------------------------------------------------- weights


async def weight_inflation(
    rig: Rig, out: Attacks, honest: list[Device], attacker: Device, rounds: int
) -> dict[str, Any]:
    """Per version 3 honest updates + 1 attacker (L2 norm 100, ``num_samples = 2**53``): how far the global
    moved from where the honest updates alone lead, vs. ``influence_bound(spec, n)``."""
    fed = rig.weights.name
    spec = rig.weights.aggregation
    undefended_spec = spec.model_copy(
        update={"weighting": "samples", "max_num_samples": MAX_NUM_SAMPLES, "max_update_norm": None}
    )
    rows: list[dict[str, Any]] = []
    for version in range(1, rounds + 1):
        base = version - 1
        deltas = [random_delta(rig.shapes, 5000 + version * 10 + i) for i in range(len(honest))]
        mean = {k: torch.stack([d[k] for d in deltas]).mean(0) for k in rig.shapes}
        poison = {k: -v * (100.0 / l2(mean)) for k, v in mean.items()}  # against the honest direction
        envs = [d.update(x, base_version=base) for d, x in zip(honest, deltas, strict=True)]
        evil = attacker.update(poison, base_version=base, num_samples=MAX_NUM_SAMPLES)
        order = [*envs[: version % 4], evil, *envs[version % 4 :]]  # the attacker anywhere in the buffer
        for env in order:
            device = attacker if env is evil else honest[envs.index(env)]
            await rig.upload(device, env, honest=env is not evil)
        reached = await rig.wait_head(fed, version, 60.0)
        if not reached:
            out.add("weight_inflation", "weighting", f"v{version} made", "no version", False)
            break
        meta = await rig.store.get_meta(fed, version)
        assert meta is not None
        before = await rig.global_state(fed, base)
        after = await rig.global_state(fed, version)
        moved = {k: after[k] - before[k] for k in before}
        sent = {e.data.update_id: (e, x) for e, x in zip([*envs, evil], [*deltas, poison], strict=True)}

        staleness = {u.update_id: u.staleness for u in meta.updates}

        def buffered(
            update_id: str, sent: dict[str, Any] = sent, staleness: dict[str, int] = staleness
        ) -> Any:
            env, delta = sent[update_id]
            return BufferedUpdate(
                update_id, env.data.client_id, delta, env.data.num_samples, staleness[update_id]
            )

        in_version = [u.update_id for u in meta.updates if u.update_id in sent]
        honest_ids = [u for u in in_version if u != evil.data.update_id]
        honest_only = aggregate(before, [buffered(u) for u in honest_ids], spec).applied_delta
        undefended = aggregate(before, [buffered(u) for u in in_version], undefended_spec).applied_delta
        n = len(meta.updates)
        bound = influence_bound(spec, n)
        shift = l2({k: moved[k] - honest_only[k] for k in moved})
        rows.append(
            {
                "version": version,
                "updates": n,
                "attacker_in_version": evil.data.update_id in in_version,
                "attacker_weight": next(
                    (u.weight for u in meta.updates if u.client_id == attacker.client_id), 0.0
                ),
                "shift_from_honest_only": shift,
                "bound": bound,
                "beyond_bound": shift > bound * (1 + 1e-4),
                "undefended_shift": l2({k: undefended[k] - honest_only[k] for k in moved}),
            }
        )
        say(
            f"  weighting v{version}: shift {shift:.3f} vs bound {bound:.3f} "
            f"(undefended {rows[-1]['undefended_shift']:.1f})"
        )
    beyond = sum(r["beyond_bound"] for r in rows)
    out.add(
        "weight_inflation_2_53_samples", "weighting", f"shift <= bound in all {rounds} versions",
        f"{beyond} of {len(rows)} versions beyond the bound; max shift "
        f"{max((r['shift_from_honest_only'] for r in rows), default=math.nan):.3f} vs bound "
        f"{max((r['bound'] for r in rows), default=math.nan):.3f}",
        beyond == 0 and len(rows) == rounds,
    )  # fmt: skip
    return {"versions": rows, "versions_beyond_bound": beyond, "weighting": spec.weighting}


async def buffer_fill(rig: Rig, out: Attacks, flooder: Device, honest: list[Device], k: int) -> None:
    """One client sends K updates in a row: at most ``max_client_updates`` of them per version."""
    fed = rig.main.name
    base = await rig.store.latest(fed) or 0
    flood = [flooder.update(random_delta(rig.shapes, 900 + i), base_version=base) for i in range(k)]
    for env in flood:
        await rig.upload(flooder, env, honest=False)
    await rig.honest_round(honest, seed=77)
    await rig.honest_round(honest, seed=78)  # the parked one enters a later buffer
    ids = {e.data.update_id for e in flood}
    per_version = [sum(u in ids for u in m.update_ids) for m in await rig.metas(fed)]
    limit = rig.main.aggregation.max_client_updates
    out.add(
        "one_client_fills_buffer", "weighting", f"<= {limit} per version",
        f"{k} sent, {sum(per_version)} aggregated, at most {max(per_version, default=0)} in one version",
        max(per_version, default=0) <= limit,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- poison, ids


async def huge_values(rig: Rig, out: Attacks, bomber: Device, honest: list[Device]) -> None:
    """A signed update with a value of 1e20: the federation still makes the next versions."""
    fed = rig.main.name
    bomb = random_delta(rig.shapes, 31)
    first = next(iter(bomb))
    bomb[first].view(-1)[0] = 1e20
    head = await rig.store.head(fed) or 0
    await rig.upload(bomber, bomber.update(bomb, base_version=await rig.store.latest(fed) or 0), honest=False)
    ok1 = bool(await rig.honest_round(honest, seed=31)) and await rig.wait_seen(
        rig.honest_sent[-len(honest) :]
    )
    await rig.honest_round(honest, seed=32)
    after = await rig.store.head(fed) or 0
    state = await rig.global_state(fed, after)
    finite = all(bool(torch.isfinite(v).all()) for v in state.values())
    out.add(
        "update_with_1e20", "poison", "next versions made, global finite",
        f"v{head} -> v{after}, finite={finite}", ok1 and after >= head + 2 and finite,
    )  # fmt: skip


async def squat(rig: Rig, out: Attacks, victim: Device, squatter: Device) -> Pair:
    """Client B sends an update under client A's next update id first: A's update still aggregates."""
    fed = rig.main.name
    shared = f"upd-{uuid.uuid4().hex[:12]}"
    base = await rig.store.latest(fed) or 0
    await rig.upload(
        squatter,
        squatter.update(random_delta(rig.shapes, 41), base_version=base, update_id=shared),
        honest=False,
    )
    env = victim.update(random_delta(rig.shapes, 42), base_version=base, update_id=shared)
    await rig.upload(victim, env)
    pair = (fed, victim.client_id, shared)
    landed = await rig.wait_seen([pair], 60.0)
    mine = sum(
        (u.client_id, u.update_id) == (victim.client_id, shared)
        for m in await rig.metas(fed)
        for u in m.updates
    )
    out.add(
        "update_id_squatting",
        "ids",
        "victim's update aggregated once",
        f"aggregated {mine}x",
        landed and mine == 1,
    )
    return pair


async def broken_federations(rig: Rig, out: Attacks, device: Device, honest: list[Device]) -> None:
    """Messages keyed with a half-created federation (spec, no v0) and an unknown one: the aggregator keeps
    running and the other federations keep making versions."""
    broken = tiny_spec(f"atkh-{rig.hexid}")
    await rig.store.put_spec(broken)
    rig._created.append(broken.name)
    unknown = f"atku-{uuid.uuid4().hex[:8]}"
    env = device.update(random_delta(rig.shapes, 51), base_version=0)
    await rig.kafka_send(broken.name, [encode_frame(env), b"garbage"])
    await rig.kafka_send(unknown, [encode_frame(env), b"\x00" * 100])
    head = await rig.store.head(rig.main.name) or 0
    sent = await rig.honest_round(honest, seed=52)
    landed = await rig.wait_seen(sent)
    alive = not rig.poll_exits()
    after = await rig.store.head(rig.main.name) or 0
    records = await rig.wait_dead_letters(lambda rs: sum(r.federation == broken.name for r in rs) >= 2)
    reasons = Counter(
        str(getattr(r.reason, "value", r.reason)) for r in records if r.federation == broken.name
    )
    out.add(
        "half_created_and_unknown_federation", "poison", "aggregator keeps running, versions made",
        f"alive={alive}, v{head} -> v{after}; half-created dead-lettered {dict(reasons)}",
        alive and landed and after > head,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- flood


async def _send_raw(port: int, head: bytes, total: int) -> tuple[str, int, float]:
    """Send ``head`` then up to ``total`` body bytes, stopping when the server answers or stops reading;
    (outcome, body bytes written, seconds until the outcome). The outcome is the HTTP status, ``reset``
    (the server closed the connection with our body unread: its RST can discard the answer before we read
    it), ``closed`` (end of stream, no answer) or ``timeout`` (no answer within 10 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(head)
    chunked = b"chunked" in head.lower()
    block = (b"%x\r\n" % MIB + b"x" * MIB + b"\r\n") if chunked else b"x" * MIB
    sent = 0
    outcome = "timeout"
    read = asyncio.create_task(reader.read(65536))
    try:
        while sent < total and not read.done():
            writer.write(block)
            sent += len(block)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break
            except (ConnectionError, OSError):
                break
        try:
            answer = await asyncio.wait_for(read, 10)
            if answer.startswith(b"HTTP/1.1 "):
                outcome = answer.split(b" ", 2)[1].decode()
            else:
                outcome = "closed" if not answer else "garbled"
        except TimeoutError:
            outcome = "timeout"
        except (ConnectionError, OSError):
            outcome = "reset"
    finally:
        if not read.done():
            read.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return outcome, sent, time.perf_counter() - started


async def flood(rig: Rig, out: Attacks, bodies: int, body_mib: int, concurrency: int) -> dict[str, Any]:
    """``bodies`` unauthenticated bodies of ``body_mib`` MiB each at the serve process (declared length,
    and chunked without a length, on the ingest and the generate routes): 413/401 fast, RSS flat."""
    fed = rig.main.name
    pid = rig.serve_pid
    rss_before = rss_bytes(pid)
    peak = rss_before
    stop = asyncio.Event()

    async def sampler() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(Exception):
                peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.05)

    gate = asyncio.Semaphore(concurrency)
    total = body_mib * MIB
    results: list[tuple[str, str, float, int]] = []

    async def one(i: int) -> None:
        route = ("updates", "generate")[i % 2]
        ctype = "application/octet-stream" if route == "updates" else "application/json"
        length = f"Content-Length: {total}" if (i // 2) % 2 == 0 else "Transfer-Encoding: chunked"
        head = (
            f"POST /v1/federations/{fed}/{route} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {ctype}\r\n{length}\r\n\r\n"
        )
        async with gate:
            outcome, sent, seconds = await _send_raw(rig.serve_port, head.encode(), total)
        results.append((outcome, length.split(":")[0], seconds, sent))

    task = asyncio.create_task(sampler())
    began = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(bodies)))
    finally:
        stop.set()
        await task
    elapsed = time.perf_counter() - began
    await asyncio.sleep(0.5)
    rss_after = rss_bytes(pid)
    statuses = Counter(r[0] for r in results)
    slowest = max((r[2] for r in results), default=0.0)
    refused = all(r[0] in REFUSED for r in results)
    fast = slowest <= FLOOD_ANSWER_S
    out.add(
        "unauthenticated_large_body_flood", "serving", f"401/413 (or reset) within {FLOOD_ANSWER_S:.0f}s",
        f"{dict(statuses)}; slowest {slowest:.2f}s; RSS +{(rss_after - rss_before) / MIB:.1f} MiB",
        refused and fast and len(results) == bodies,
    )  # fmt: skip
    return {
        "bodies": bodies,
        "body_mib": body_mib,
        "concurrency": concurrency,
        "statuses": dict(statuses),
        "slowest_answer_s": slowest,
        "elapsed_s": elapsed,
        "body_bytes_written_max": max((r[3] for r in results), default=0),
        "rss_before_mib": rss_before / MIB,
        "rss_after_mib": rss_after / MIB,
        "rss_peak_mib": peak / MIB,
        "rss_growth_mib": (rss_after - rss_before) / MIB,
        "rss_peak_growth_mib": (peak - rss_before) / MIB,
    }


# ---------------------------------------------------------------------------------------------- audit


async def audit(rig: Rig) -> dict[str, Any]:
    """Every honest upload is accepted by the ingest, then in exactly one version (and in the seen set)."""
    counts: Counter[Pair] = Counter()
    versions: dict[str, int] = {}
    for fed in (rig.main.name, rig.weights.name):
        metas = await rig.metas(fed)
        versions[fed] = len(metas)
        for meta in metas:
            for u in meta.updates:
                counts[(fed, u.client_id, u.update_id)] += 1
    sent = rig.honest_sent
    lost = [p for p in sent if counts[p] == 0]
    double = [p for p in sent if counts[p] > 1]
    unseen = [p for p in sent if not await rig.store.is_seen(*p)]
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
