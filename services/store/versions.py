"""Versioned global adapters in Redis.

Blobs are immutable per version. A new version is committed by one Lua script together with the
consumed Kafka offsets, the aggregated ``(client, update id)`` pairs (dedupe per client: one client
cannot squat another's update id), stat increments, the server optimizer state and a stream
announcement, guarded by the expected ``latest``/``head`` values (fencing: a zombie aggregator that
lost its partition, or a rollback in between, makes the commit fail with :class:`CommitConflict`
instead of forking the lineage). A federation is created (spec + v0) by one Lua script too.

Every key a commit or a seek needs is in the federation's slot (hash tag ``{fed}``), watermarks
included: each federation's ``offsets`` hash holds, per partition of the updates topic, ``safe`` and
``hwm`` (written with its commits) and ``wm``, its watermark, raised after the aggregator's Kafka group
commit succeeded. A partition's seek position is the minimum over the federations of
``max(safe, wm)`` (each a lower bound of that federation's first message not yet durable); a partition
no federation has a mark on is read from its beginning. A Redis failover that loses a federation's
latest writes thus loses its watermark with them, and the seek goes back as far as that federation
needs. (The old topic-wide ``pfi:watermarks:<topic>`` hash lived in another slot; it is no longer read.)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from schemas.errors import PFIError
from schemas.events import FederationSpec
from schemas.records import VersionMeta
from services.store import keys
from services.store.scripts import lua

log = logging.getLogger("pfi.store")


class StoreError(PFIError):
    """A Redis-side invariant refused the operation."""


class CommitConflict(StoreError):
    """The federation moved under us (another writer, or a rollback): reload and replay."""


class UnknownFederation(StoreError):
    pass


class NotReplicated(StoreError):
    """The version is committed on the primary, but fewer replicas than required acknowledged it (Redis
    ``WAIT``) after every retry: do not announce it (a failover could still lose it)."""

    def __init__(self, message: str, *, version: int, acked: int) -> None:
        super().__init__(message)
        self.version = version
        self.acked = acked


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
    seen_members: tuple[str, ...] = ()  # keys.seen_member(client_id, update_id) of the aggregated updates
    seen_bases: tuple[int, ...] = ()  # each member's base version (its seen-window score); () = unknown
    max_staleness: int | None = None  # the spec's: prunes the seen window (None: keep every member)
    stat_increments: Mapping[str, int] = field(default_factory=dict)
    optimizer_blob: bytes = b""
    accountant_json: str = ""
    keep_versions: int = 20
    event_json: str = ""


class VersionStore:
    """Async access to the Redis layout of ``services.store.keys``."""

    def __init__(
        self,
        redis: Redis,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        wait_attempts: int = 3,
    ) -> None:
        """``wait_replicas`` > 0: after each version commit, Redis ``WAIT`` (on the commit's connection)
        until that many replicas acknowledged it, ``wait_attempts`` times ``wait_timeout_ms`` at most;
        else :class:`NotReplicated`."""
        self.redis = redis
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.wait_attempts = max(1, wait_attempts)
        self._commit = redis.register_script(lua("commit_version.lua"))
        self._progress = redis.register_script(lua("commit_offsets.lua"))
        self._rollback = redis.register_script(lua("rollback.lua"))
        self._create = redis.register_script(lua("create_federation.lua"))
        self._raise_marks = redis.register_script(lua("raise_watermarks.lua"))

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

    async def create_federation(
        self, spec: FederationSpec, blob: bytes, meta: VersionMeta, event_json: str
    ) -> None:
        """Spec and v0 in one atomic step (the federation's slot); :class:`StoreError` if the name is taken.
        The name index is added first and removed again when the script refuses or fails."""
        fed = spec.name
        added = await self.redis.sadd(keys.FEDERATIONS, fed)
        try:
            await self._create(
                keys=[
                    keys.spec(fed),
                    keys.latest(fed),
                    keys.head(fed),
                    keys.adapter(fed, 0),
                    keys.meta(fed, 0),
                    keys.retained(fed),
                    keys.events(fed),
                    keys.depths(fed),
                ],
                args=[spec.model_dump_json(), blob, meta.model_dump_json(), event_json],
            )
        except ResponseError as err:
            if added:
                await self.redis.srem(keys.FEDERATIONS, fed)
            if str(err).startswith("EXISTS"):
                raise StoreError(f"federation {fed!r} already exists") from None
            raise StoreError(str(err)) from None
        except BaseException:
            if added:
                with contextlib.suppress(Exception):
                    await self.redis.srem(keys.FEDERATIONS, fed)
            raise

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
            keys.adapter_prefix(fed),
            c.event_json,
            str(len(c.offsets)),
        ]
        for name, value in c.offsets.items():
            argv += [name, str(value)]
        bases = c.seen_bases if len(c.seen_bases) == len(c.seen_members) else (-1,) * len(c.seen_members)
        argv.append(str(len(c.seen_members)))
        for member, base in zip(c.seen_members, bases, strict=True):
            argv += [member, str(base)]
        argv.append(str(len(c.stat_increments)))
        for name, inc in c.stat_increments.items():
            argv += [name, str(inc)]
        argv.append("" if c.max_staleness is None else str(c.max_staleness))
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
            keys.seen_window(fed),
            keys.depths(fed),
        ]
        if self.wait_replicas <= 0:
            try:
                return int(await self._commit(keys=script_keys, args=argv))
            except ResponseError as err:
                raise _translate(err) from None
        # WAIT counts the writes of its own connection: pin one for the commit and the WAIT.
        async with self.redis.client() as conn:
            try:
                version = int(await self._commit(keys=script_keys, args=argv, client=conn))
            except ResponseError as err:
                raise _translate(err) from None
            acked = 0
            for attempt in range(1, self.wait_attempts + 1):
                acked = int(await conn.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms))  # type: ignore[no-untyped-call]
                if acked >= self.wait_replicas:
                    return version
                log.warning(
                    "%s v%d: %d of %d Redis replica(s) acknowledged within %d ms (try %d of %d)",
                    fed,
                    version,
                    acked,
                    self.wait_replicas,
                    self.wait_timeout_ms,
                    attempt,
                    self.wait_attempts,
                )
        raise NotReplicated(
            f"{fed} v{version}: {acked} of {self.wait_replicas} replica(s) acknowledged the commit",
            version=version,
            acked=acked,
        )

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

    async def is_seen(self, fed: str, client_id: str, update_id: str) -> bool:
        """Whether ``client_id``'s update ``update_id`` is in a committed version of ``fed`` (and could
        still be accepted: the seen window forgets updates too stale for any version that may become the
        latest; see ``commit_version.lua``)."""
        return (await self.are_seen([(fed, client_id, update_id)]))[0]

    async def are_seen(self, triples: Sequence[tuple[str, str, str]]) -> list[bool]:
        """``is_seen`` of many (federation, client id, update id) in one round trip (a pipeline, no MULTI):
        the seen window, and the set of releases before it (read only)."""
        if not triples:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for fed, client_id, update_id in triples:
            member = keys.seen_member(client_id, update_id)
            pipe.zscore(keys.seen_window(fed), member)
            pipe.sismember(keys.seen(fed), member)
        answers = await pipe.execute()
        return [answers[i] is not None or bool(answers[i + 1]) for i in range(0, len(answers), 2)]

    async def seen_window_size(self, fed: str) -> int:
        """Members in ``fed``'s seen window: how many aggregated updates the dedupe still remembers."""
        return int(await self.redis.zcard(keys.seen_window(fed)))

    async def get_stats(self, fed: str) -> dict[str, int]:
        raw = await self.redis.hgetall(keys.stats(fed))
        return {_text(k): int(v) for k, v in raw.items()}

    async def get_optimizer(self, fed: str) -> bytes | None:
        return _blob(await self.redis.get(keys.optimizer(fed)))

    async def get_accountant(self, fed: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.accountant(fed))
        return None if raw is None else dict(json.loads(raw))

    async def federation_marks(
        self, topic: str, feds: Iterable[str] | None = None
    ) -> dict[str, dict[int, int]]:
        """Per federation (all of them unless ``feds``), per partition of ``topic`` it has a mark on:
        ``max(safe, wm)``, below which all its messages are durable. One pipelined round trip."""
        names = list(dict.fromkeys(feds)) if feds is not None else await self.list_federations()
        if not names:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for fed in names:
            pipe.hgetall(keys.offsets(fed))
        out: dict[str, dict[int, int]] = {}
        for fed, raw in zip(names, await pipe.execute(), strict=True):
            marks: dict[int, int] = {}
            for name, value in raw.items():
                partition = _partition_of(topic, _text(name))
                if partition is not None:
                    marks[partition] = max(marks.get(partition, 0), int(value))
            if marks:
                out[fed] = marks
        return out

    async def get_watermarks(self, topic: str, feds: Iterable[str] | None = None) -> dict[int, int]:
        """Partition -> seek position: the minimum over the federations of :meth:`federation_marks`
        (partitions absent: no federation has a mark there; read them from the beginning)."""
        out: dict[int, int] = {}
        for marks in (await self.federation_marks(topic, feds)).values():
            for partition, offset in marks.items():
                out[partition] = min(out.get(partition, offset), offset)
        return out

    async def raise_watermarks(self, topic: str, marks: Mapping[str, Mapping[int, int]]) -> None:
        """Monotonically raise the watermarks of each federation (``fed -> partition -> offset``), each in
        its own slot, pipelined. A lower bound: a lost write only means a longer replay."""
        pipe = self.redis.pipeline(transaction=False)
        queued = False
        for fed, partitions in marks.items():
            args: list[Any] = []
            for partition, offset in partitions.items():
                args += [keys.watermark_field(topic, partition), str(offset)]
            if args:
                await self._raise_marks(keys=[keys.offsets(fed)], args=args, client=pipe)
                queued = True
        if queued:
            await pipe.execute()

    async def set_live(self, fed: str, fields: Mapping[str, str | int | float]) -> None:
        pipe = self.redis.pipeline(transaction=False)  # one round trip
        pipe.hset(keys.live(fed), mapping=cast(Any, dict(fields)))
        pipe.expire(keys.live(fed), 300)
        await pipe.execute()

    async def get_live(self, fed: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.live(fed))
        return {_text(k): _text(v) for k, v in raw.items()}


def _partition_of(topic: str, name: str) -> int | None:
    """The partition of an ``offsets`` field of ``topic`` that bounds replay (``safe`` or ``wm``)."""
    if not name.startswith(f"{topic}:"):
        return None
    rest = name[len(topic) + 1 :]
    number = rest.removesuffix(":wm")
    return int(number) if number.isdigit() else None


def _translate(err: ResponseError) -> StoreError:
    text = str(err)
    if text.startswith("CONFLICT") or text.startswith("OFFSET_REGRESSION") or text.startswith("DUPLICATE"):
        return CommitConflict(text)
    return StoreError(text)
