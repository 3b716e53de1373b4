"""Idempotent uploads: a message the ingest already stored in the update log is acknowledged again with its
original position, never produced a second time.

Devices retry (a lost 202, an outbox replayed after a reboot), so the same signed message can arrive many
times. Before this ledger each copy went to Kafka and the aggregators deduplicated it; with the hierarchy
(issue 15) a copy that reaches a leaf *after a leaf restart* and *before the root made a version of the
first copy* is not caught there, and the root must then refuse the whole partial holding it (a sum cannot
be taken apart), losing the other updates folded with it. Deduplicating at the front door closes that
path for every retry that goes through the ingest (the only producer of the updates topic).

One Redis key per message, ``pfi:{fed}:ingested:<client>/<update id>/<part>`` (:func:`message_part`: ``u``
or the chunk index, and the first 16 hex digits of the payload's verified SHA-256, so only the same
content under the same ids is a retry; the client is the token's subject and the message's signer, so no
device can claim another's ids):

* :meth:`UploadLedger.claim` sets it to ``pending:<nonce>`` (``SET NX``, expiring after ``pending_ttl_s``)
  or answers what is there: ``done:<partition>:<offset>`` (a duplicate: the caller answers 202 with that
  position) or ``pending:…`` (the same message is being produced by another request: 409, retry soon);
* :meth:`UploadLedger.settle` records the position after Kafka acknowledged (kept ``ttl_s``);
* :meth:`UploadLedger.release` deletes the caller's own pending claim when producing failed, so a retry
  produces (compare-and-delete: never someone else's claim).

What this cannot catch, and the aggregators still do (``seen``, a leaf's emitted set): a copy produced
after a claim expired (a crash between Kafka's acknowledgement and :meth:`settle`, or a retry after
``ttl_s``), and a produce that timed out but was stored (its claim is released; the retry produces again).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from schemas.events import AdapterUpdate, AdapterUpdateChunk
from services.store import keys

_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def message_part(data: AdapterUpdate | AdapterUpdateChunk) -> str:
    """The part of an update a message is, with its content: ``u.<digest>`` or ``<index>.<digest>``."""
    if isinstance(data, AdapterUpdateChunk):
        return f"{data.index}.{data.chunk_sha256[:16]}"
    return f"u.{data.payload_sha256[:16]}"


@dataclass(frozen=True)
class Claim:
    """What :meth:`UploadLedger.claim` found: ``new`` (the caller produces, then settles or releases),
    ``done`` (already stored at ``partition``/``offset``) or ``pending`` (another request is producing)."""

    state: Literal["new", "done", "pending"]
    key: str
    token: str = ""
    partition: int = -1
    offset: int = -1


class UploadLedger:
    """The ingest's record of the messages it stored, per federation, client, update and part."""

    def __init__(self, redis: Redis, *, ttl_s: int, pending_ttl_s: int) -> None:
        self.redis = redis
        self.ttl_ms = ttl_s * 1000
        self.pending_ttl_ms = pending_ttl_s * 1000
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, fed: str, client_id: str, update_id: str, part: str) -> Claim:
        """Claim a message for producing (``part``: :func:`message_part`)."""
        key = keys.ingested(fed, client_id, update_id, part)
        token = "pending:" + secrets.token_hex(8)
        held = await self._claim(keys=[key], args=[token, self.pending_ttl_ms])
        if not held:
            return Claim("new", key, token)
        text = held.decode() if isinstance(held, bytes) else str(held)
        kind, _, rest = text.partition(":")
        if kind == "done":
            partition, _, offset = rest.partition(":")
            if partition.lstrip("-").isdigit() and offset.lstrip("-").isdigit():
                return Claim("done", key, partition=int(partition), offset=int(offset))
        return Claim("pending", key)

    async def settle(self, claim: Claim, partition: int, offset: int) -> None:
        """Record where the claimed message was stored (answers its duplicates from now on)."""
        await self.redis.set(claim.key, f"done:{partition}:{offset}", px=self.ttl_ms)

    async def release(self, claim: Claim) -> None:
        """Give up the caller's claim (producing failed): a retry may produce."""
        await self._release(keys=[claim.key], args=[claim.token])
