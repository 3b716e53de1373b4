"""Pure parts of the service's private retrieval: placing context tokens, parsing a user's stored chunks,
and the per-replica index cache (generation checks, byte bound, one build per miss)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from modeling.base import ByteTokenizer
from services.personalization.augment import SEPARATOR, with_context
from services.personalization.document_index import IndexCache, UserIndex
from services.personalization.documents import Snapshot, parse_snapshot


class Codec:
    """A TokenCodec over the byte tokenizer, with or without BOS."""

    def __init__(self, bos: bool) -> None:
        self.tokenizer = ByteTokenizer()
        self.bos = bos
        self.max_positions = 512

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.bos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def test_context_goes_after_bos_and_context_len_marks_its_targets() -> None:
    codec = Codec(bos=True)
    text = codec.encode("hello")
    ids, context_len, count = with_context(codec, text, "ctx", max_tokens=100, room=100)
    expected_ctx = list(("ctx" + SEPARATOR).encode())
    assert ids == [256, *expected_ctx, *b"hello"]
    assert count == len(expected_ctx)
    assert context_len == len(expected_ctx)  # targets ids[1 : 1 + context_len] are the context
    assert ids[1 + context_len] == ord("h")  # the first scored target is the text's first token


def test_without_bos_the_same_text_tokens_are_scored_as_without_context() -> None:
    """Without BOS the text's first token is never a target without context (nothing predicts it), so
    it is not scored with context either: the scored targets (and TextScore.tokens) are the same."""
    codec = Codec(bos=False)
    ids, context_len, count = with_context(codec, codec.encode("hi"), "ab", max_tokens=100, room=100)
    assert ids == [*b"ab\n\nhi"]
    assert count == 4
    assert ids[1 + context_len] == ord("i")  # the first scored target, as without context
    assert len(ids) - 1 - context_len == len(codec.encode("hi")) - 1


def test_context_is_cut_to_the_limit_keeping_the_separator() -> None:
    codec = Codec(bos=True)
    ids, context_len, count = with_context(codec, codec.encode("x"), "abcdefgh", max_tokens=5, room=50)
    assert count == 5
    assert ids == [256, *b"abc\n\nx"]
    assert context_len == 5
    _, _, count = with_context(codec, codec.encode("x"), "abcdefgh", max_tokens=50, room=4)
    assert count == 4


@pytest.mark.parametrize(("context", "room"), [("", 50), ("abc", 0), ("abc", -3), ("abc", 2)])
def test_no_context_when_empty_or_no_room(context: str, room: int) -> None:
    codec = Codec(bos=True)
    text = codec.encode("x")
    assert with_context(codec, text, context, max_tokens=50, room=room) == (text, 0, 0)


def test_a_snapshot_orders_chunks_by_document_and_index_and_reads_vectors() -> None:
    vec = {
        f"v:{d}:{i}": np.full(3, float(n), dtype=np.float32).tobytes()
        for n, (d, i) in enumerate([("b", 0), ("a", 1), ("a", 0)])
    }
    raw = {
        b"g": b"7",
        b"n": b"3",
        b"d:a": b"{}",
        b"t:b:0": b"b zero",
        b"t:a:1": "a one \u00e9".encode(),
        b"t:a:0": b"a zero",
        **{k.encode(): v for k, v in vec.items()},
    }
    snap = parse_snapshot(raw, 3)
    assert snap.generation == 7
    assert snap.refs == [("a", 0), ("a", 1), ("b", 0)]
    assert snap.texts == ["a zero", "a one \u00e9", "b zero"]
    assert snap.vectors[:, 0].tolist() == [2.0, 1.0, 0.0]
    assert parse_snapshot({}, 3).generation == 0


def entry(user: str, generation: int, chunks: int = 1) -> UserIndex:
    snap = Snapshot(
        generation, [("d", i) for i in range(chunks)], ["t"] * chunks, np.zeros((chunks, 4), np.float32)
    )
    return UserIndex("fed", user, snap, None)


def test_the_cache_serves_an_index_only_at_its_generation() -> None:
    cache = IndexCache(budget_bytes=1 << 20)
    cache.put(entry("alice", 3))
    assert cache.get("fed", "alice", 3) is not None
    assert cache.get("fed", "alice", 4) is None  # changed (a delete): the stale index is dropped
    assert len(cache) == 0
    assert cache.get("fed", "bob", 3) is None
    cache.put(entry("alice", 5))
    cache.put(entry("alice", 4))  # an older build landing late never replaces a newer one
    found = cache.get("fed", "alice", 5)
    assert found is not None
    assert found.generation == 5


def test_the_cache_stays_within_its_byte_budget_evicting_least_recently_used() -> None:
    one = entry("u0", 1, chunks=10).nbytes
    cache = IndexCache(budget_bytes=3 * one)
    for i in range(3):
        cache.put(entry(f"u{i}", 1, chunks=10))
    assert cache.get("fed", "u0", 1) is not None  # u0 is now the most recently used
    cache.put(entry("u3", 1, chunks=10))
    assert cache.get("fed", "u1", 1) is None
    assert cache.get("fed", "u0", 1) is not None
    assert cache.nbytes <= 3 * one
    cache.put(entry("huge", 1, chunks=100))  # larger than the whole budget: not kept
    assert cache.get("fed", "huge", 1) is None
    assert cache.nbytes <= 3 * one


async def test_concurrent_misses_share_one_build() -> None:
    cache = IndexCache(budget_bytes=1 << 20)
    builds = 0

    async def build() -> UserIndex:
        nonlocal builds
        builds += 1
        await asyncio.sleep(0.01)
        return entry("alice", 2)

    results = await asyncio.gather(*(cache.get_or_build("fed", "alice", 2, build) for _ in range(5)))
    assert builds == 1
    assert all(r[0].generation == 2 for r in results)
    again, hit = await cache.get_or_build("fed", "alice", 2, build)
    assert hit
    assert builds == 1
    assert again.generation == 2


async def test_a_failed_build_is_not_cached() -> None:
    cache = IndexCache(budget_bytes=1 << 20)

    async def broken() -> UserIndex:
        raise RuntimeError("redis went away")

    with pytest.raises(RuntimeError):
        await cache.get_or_build("fed", "alice", 1, broken)
    assert cache.get("fed", "alice", 1) is None
