"""The seen window on the real Redis (``lua/commit_version.lua``): an aggregated update is remembered for as
long as any version that may become the latest (retained ones, pinned ones, rollback targets) could still
accept it again, and forgotten after; the set of earlier releases is still read."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from schemas.records import VersionMeta
from services.store import keys
from services.store.versions import CommitConflict, VersionCommit, VersionStore
from tests.support.federations import new_federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MAX_STALENESS = 2
KEEP = 3


class Lineage:
    """Commits versions of one federation, each aggregating one update whose base is the parent."""

    def __init__(self, store: VersionStore, name: str, meta0: VersionMeta, blob0: bytes) -> None:
        self.store = store
        self.name = name
        self.meta0, self.blob0 = meta0, blob0  # every version reuses v0's (retention deletes v0's blob)
        self.members: dict[int, str] = {}  # version -> the member it aggregated

    async def commit(self, *, member: str | None = None, max_staleness: int | None = MAX_STALENESS) -> int:
        latest, head = await self.store.pointers(self.name)
        assert latest is not None
        assert head is not None
        version = head + 1
        member = member or keys.seen_member("c", f"u-{uuid.uuid4().hex[:8]}")
        await self.store.commit_version(
            VersionCommit(
                federation=self.name,
                expected_latest=latest,
                expected_head=head,
                version=version,
                blob=self.blob0,
                meta=self.meta0.model_copy(update={"version": version, "parent": latest}),
                seen_members=(member,),
                seen_bases=(latest,),
                max_staleness=max_staleness,
                keep_versions=KEEP,
            )
        )
        self.members[version] = member
        return version

    async def seen(self, version: int) -> bool:
        client, update = self.members[version].split("/")
        return await self.store.is_seen(self.name, client, update)


@pytest.fixture
async def lineage(redis_client: Redis) -> Lineage:
    store = VersionStore(redis_client)
    spec = await new_federation(store, max_staleness=MAX_STALENESS, keep_versions=KEEP)
    meta0 = await store.get_meta(spec.name, 0)
    blob0 = await store.get_blob(spec.name, 0)
    assert meta0 is not None
    assert blob0 is not None
    return Lineage(store, spec.name, meta0, blob0)


async def test_updates_too_stale_for_every_retained_version_are_forgotten(lineage: Lineage) -> None:
    for _ in range(6):
        await lineage.commit()
    # retained: v4, v5, v6 (depths 4..6); an update is accepted up to 2 versions behind, so the members
    # whose base is below depth 4 - 2 = 2 (those of v1 and v2, bases v0 and v1) can never come back.
    assert [await lineage.seen(v) for v in range(1, 7)] == [False, False, True, True, True, True]
    assert await lineage.store.seen_window_size(lineage.name) == 4
    # a forgotten update is refused as too stale wherever it comes back; a remembered one is a duplicate
    with pytest.raises(CommitConflict, match="DUPLICATE"):
        await lineage.commit(member=lineage.members[3])


async def test_a_pinned_version_keeps_what_it_could_accept(lineage: Lineage) -> None:
    await lineage.commit()
    await lineage.store.pin(lineage.name, 1)
    for _ in range(5):
        await lineage.commit()
    # v1 (depth 1) stays a rollback target: its lineage accepts bases down to depth -1: nothing forgotten
    assert all([await lineage.seen(v) for v in range(1, 7)])


async def test_after_a_rollback_the_window_follows_the_branch(lineage: Lineage) -> None:
    for _ in range(5):
        await lineage.commit()  # v1..v5, retained v3..v5
    await lineage.store.rollback(lineage.name, 3, "")
    await lineage.commit()  # v6, parent v3: depth 4
    # retained v4 (depth 4), v5 (5), v6 (4): floor 4 - 2 = 2; v3 is no longer retained
    assert [await lineage.seen(v) for v in range(1, 7)] == [False, False, True, True, True, True]
    await lineage.commit()  # v7, parent v6: depth 5; retained v5, v6, v7 (depths 5, 4, 5): floor still 2
    assert await lineage.seen(3)


async def test_without_max_staleness_or_depths_nothing_is_forgotten(
    lineage: Lineage, redis_client: Redis
) -> None:
    for _ in range(5):
        await lineage.commit(max_staleness=None)
    assert all([await lineage.seen(v) for v in range(1, 6)])
    # a federation created before depths existed (no depth for its versions): never pruned
    await redis_client.delete(keys.depths(lineage.name))
    for _ in range(4):
        await lineage.commit()
    assert all([await lineage.seen(v) for v in range(1, 10)])


async def test_members_of_earlier_releases_are_still_duplicates(
    lineage: Lineage, redis_client: Redis
) -> None:
    legacy = keys.seen_member("old-client", "old-update")
    await redis_client.sadd(keys.seen(lineage.name), legacy)
    assert await lineage.store.is_seen(lineage.name, "old-client", "old-update")
    assert await lineage.store.are_seen(
        [(lineage.name, "old-client", "old-update"), (lineage.name, "x", "y")]
    ) == [
        True,
        False,
    ]
    with pytest.raises(CommitConflict, match="DUPLICATE"):
        await lineage.commit(member=legacy)
