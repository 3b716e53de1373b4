"""Versioned global adapters in Redis.

Blobs are immutable per version. A new version is committed by one Lua script together with the
consumed Kafka offsets, the aggregated update ids (dedupe), stat increments, the server optimizer
state and a stream announcement, guarded by the expected ``latest``/``head`` values (fencing: a
zombie aggregator that lost its partition, or a rollback in between, makes the commit fail with
:class:`CommitConflict` instead of forking the lineage).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from schemas.errors import PFIError
from schemas.events import FederationSpec
from schemas.records import VersionMeta
from services.store import keys


class StoreError(PFIError):
    """A Redis-side invariant refused the operation."""


class CommitConflict(StoreError):
    """The federation moved under us (another writer, or a rollback): reload and replay."""


class UnknownFederation(StoreError):
    pass


def _script(name: str) -> str:
    return resources.files("services.store").joinpath("lua", name).read_text()


def _opt_int(raw: Any) -> int | None:
    return None if raw is None else int(raw)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _blob(raw: bytes | str | None) -> bytes | None:
    if raw is None:
        return None
    return raw if isinstance(raw, bytes) else raw.encode()


@dataclass(frozen=True)
class VersionCommit:
    """Everything written atomically with a new version."""

    federation: str
    expected_latest: int | None
    expected_head: int | None
    version: int
    blob: bytes
    meta: VersionMeta
    offsets: Mapping[str, int] = field(default_factory=dict)
    update_ids: tuple[str, ...] = ()
    stat_increments: Mapping[str, int] = field(default_factory=dict)
    optimizer_blob: bytes = b""
    accountant_json: str = ""
    keep_versions: int = 20
    event_json: str = ""


class VersionStore:
    """Async access to the Redis layout of ``services.store.keys``."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._commit = redis.register_script(_script("commit_version.lua"))
        self._progress = redis.register_script(_script("commit_offsets.lua"))
        self._rollback = redis.register_script(_script("rollback.lua"))

    # -- federations ---------------------------------------------------------------------------
    async def list_federations(self) -> list[str]:
        names = await self.redis.smembers(keys.FEDERATIONS)
        return sorted(_text(n) for n in names)

    async def get_spec(self, fed: str) -> FederationSpec | None:
        raw = await self.redis.get(keys.spec(fed))
        return None if raw is None else FederationSpec.model_validate_json(raw)

    async def require_spec(self, fed: str) -> FederationSpec:
        spec = await self.get_spec(fed)
        if spec is None:
            raise UnknownFederation(f"federation {fed!r} does not exist")
        return spec

    async def put_spec(self, spec: FederationSpec) -> bool:
        """Store a new federation's spec; False if the name is taken."""
        created = await self.redis.set(keys.spec(spec.name), spec.model_dump_json(), nx=True)
        if created:
            await self.redis.sadd(keys.FEDERATIONS, spec.name)
        return bool(created)

    # -- versions ------------------------------------------------------------------------------
    async def latest(self, fed: str) -> int | None:
        return _opt_int(await self.redis.get(keys.latest(fed)))

    async def head(self, fed: str) -> int | None:
        return _opt_int(await self.redis.get(keys.head(fed)))

    async def pointers(self, fed: str) -> tuple[int | None, int | None]:
        latest, head = await self.redis.mget(keys.latest(fed), keys.head(fed))
        return _opt_int(latest), _opt_int(head)

    async def get_blob(self, fed: str, version: int) -> bytes | None:
        return _blob(await self.redis.get(keys.adapter(fed, version)))

    async def get_meta(self, fed: str, version: int) -> VersionMeta | None:
        raw = await self.redis.get(keys.meta(fed, version))
        return None if raw is None else VersionMeta.model_validate_json(raw)

    async def retained_versions(self, fed: str) -> list[int]:
        return [int(_text(cast(bytes, v))) for v in await self.redis.zrange(keys.retained(fed), 0, -1)]

    async def pin(self, fed: str, version: int, pinned: bool = True) -> None:
        if pinned:
            await self.redis.sadd(keys.pinned(fed), str(version))
        else:
            await self.redis.srem(keys.pinned(fed), str(version))

    async def pinned_versions(self, fed: str) -> list[int]:
        return sorted(int(v) for v in await self.redis.smembers(keys.pinned(fed)))

    async def commit_version(self, c: VersionCommit) -> int:
        fed = c.federation
        argv: list[Any] = [
            "" if c.expected_latest is None else str(c.expected_latest),
            "" if c.expected_head is None else str(c.expected_head),
            str(c.version),
            c.blob,
            c.meta.model_dump_json(),
            c.optimizer_blob,
            c.accountant_json,
            str(c.keep_versions),
            keys.prefix(fed) + "adapter:",
            c.event_json,
            str(len(c.offsets)),
        ]
        for name, value in c.offsets.items():
            argv += [name, str(value)]
        argv += [str(len(c.update_ids)), *c.update_ids, str(len(c.stat_increments))]
        for name, inc in c.stat_increments.items():
            argv += [name, str(inc)]
        script_keys = [
            keys.latest(fed),
            keys.head(fed),
            keys.adapter(fed, c.version),
            keys.meta(fed, c.version),
            keys.offsets(fed),
            keys.seen(fed),
            keys.retained(fed),
            keys.stats(fed),
            keys.optimizer(fed),
            keys.accountant(fed),
            keys.events(fed),
            keys.pinned(fed),
        ]
        try:
            return int(await self._commit(keys=script_keys, args=argv))
        except ResponseError as err:
            raise _translate(err) from None

    async def commit_progress(
        self,
        fed: str,
        expected_latest: int | None,
        offsets: Mapping[str, int],
        stat_increments: Mapping[str, int],
    ) -> None:
        """Offsets and stat increments of a federation without a new version (idle, rejections only)."""
        argv: list[Any] = ["" if expected_latest is None else str(expected_latest), str(len(offsets))]
        for name, value in offsets.items():
            argv += [name, str(value)]
        argv.append(str(len(stat_increments)))
        for name, inc in stat_increments.items():
            argv += [name, str(inc)]
        try:
            await self._progress(keys=[keys.offsets(fed), keys.stats(fed), keys.latest(fed)], args=argv)
        except ResponseError as err:
            raise _translate(err) from None

    async def rollback(self, fed: str, to: int, event_json: str) -> int | None:
        try:
            previous = await self._rollback(
                keys=[keys.latest(fed), keys.retained(fed), keys.optimizer(fed), keys.events(fed)],
                args=[str(to), event_json],
            )
        except ResponseError as err:
            if str(err).startswith("NOT_RETAINED"):
                raise StoreError(
                    f"version {to} of {fed!r} is not retained (see `pfi federation status`)"
                ) from None
            raise
        return _opt_int(previous)

    # -- progress and dedupe -------------------------------------------------------------------
    async def get_offsets(self, fed: str) -> dict[str, int]:
        raw = await self.redis.hgetall(keys.offsets(fed))
        return {_text(k): int(v) for k, v in raw.items()}

    async def is_seen(self, fed: str, update_id: str) -> bool:
        return bool(await self.redis.sismember(keys.seen(fed), update_id))

    async def are_seen(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """``is_seen`` of many (federation, update id) pairs in one round trip (a pipeline, no MULTI)."""
        if not pairs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for fed, update_id in pairs:
            pipe.sismember(keys.seen(fed), update_id)
        return [bool(answer) for answer in await pipe.execute()]

    async def get_stats(self, fed: str) -> dict[str, int]:
        raw = await self.redis.hgetall(keys.stats(fed))
        return {_text(k): int(v) for k, v in raw.items()}

    async def get_optimizer(self, fed: str) -> bytes | None:
        return _blob(await self.redis.get(keys.optimizer(fed)))

    async def get_accountant(self, fed: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.accountant(fed))
        return None if raw is None else dict(json.loads(raw))

    async def get_watermarks(self, topic: str) -> dict[int, int]:
        raw = await self.redis.hgetall(keys.partition_watermarks(topic))
        return {int(k): int(v) for k, v in raw.items()}

    async def raise_watermarks(self, topic: str, marks: Mapping[int, int]) -> None:
        """Monotonically raise partition watermarks (a lower bound, so a lost write is harmless)."""
        if not marks:
            return
        current = await self.get_watermarks(topic)
        update = {str(p): str(o) for p, o in marks.items() if o > current.get(p, -1)}
        if update:
            await self.redis.hset(keys.partition_watermarks(topic), mapping=cast(Any, update))

    async def set_live(self, fed: str, fields: Mapping[str, str | int | float]) -> None:
        pipe = self.redis.pipeline(transaction=False)  # one round trip
        pipe.hset(keys.live(fed), mapping=cast(Any, dict(fields)))
        pipe.expire(keys.live(fed), 300)
        await pipe.execute()

    async def get_live(self, fed: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.live(fed))
        return {_text(k): _text(v) for k, v in raw.items()}


def _translate(err: ResponseError) -> StoreError:
    text = str(err)
    if text.startswith("CONFLICT") or text.startswith("OFFSET_REGRESSION") or text.startswith("DUPLICATE"):
        return CommitConflict(text)
    return StoreError(text)
