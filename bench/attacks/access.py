"""Transport (Kafka SASL/ACLs) and identity (tokens, scopes, enrollment, revocation) attacks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from bench.attacks.rig import Device, Rig, random_delta
from bench.attacks.shared import Attacks
from schemas.frame import encode_frame
from services.identity import Enrollment
from services.personalization.auth import TokenSigner
from services.transport import kafka_kwargs

FAST_KAFKA = {"request_timeout_ms": 5000, "retry_backoff_ms": 50}
REVOCATION_DEADLINE_S = 5.0  # "a revocation takes effect ... within seconds"


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
