"""``pfi bench retrieval`` at tiny sizes against the real Redis: every stage runs, the figures and
ratios exist and are finite and positive, the table ends with the ratios, the JSON lands where it was
asked to and the benchmark's user leaves nothing behind. No timing thresholds (a smoke run on a shared
machine)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bench import retrieval

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RATIOS = (
    "store_hybrid_p50_ms",
    "store_hybrid_p99_ms",
    "store_lexical_p50_ms",
    "store_vs_index_lexical_p50",
    "score_p50_retrieval_vs_none",
    "generate_p50_retrieval_vs_none",
)


async def _leftovers(redis_url: str) -> list[bytes]:
    client = Redis.from_url(redis_url)
    try:
        return [key async for key in client.scan_iter(match=f"*{retrieval.USER}*")]
    finally:
        await client.aclose()


def test_retrieval_bench_tiny(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PFI_REDIS_URL", redis_url)
    out = tmp_path / "nested" / "retrieval.json"
    result = retrieval.run_retrieval_bench(quick=True, out=out, sizes=retrieval.TINY_SIZES)

    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "retrieval"
    assert saved["ratios"] == result["ratios"]
    assert list(saved["ratios"]) == list(RATIOS)
    for name in RATIOS:
        value = saved["ratios"][name]
        assert isinstance(value, int | float), name
        assert math.isfinite(value), name
        assert value > 0, (name, value)
    assert saved["index"]["chunks"] == retrieval.TINY_SIZES["chunks"]
    for kind in ("score", "generate"):
        assert saved["serving"][kind]["n"] == retrieval.TINY_SIZES["rounds"]
        assert saved["serving"][kind]["context_tokens_mean"] > 0  # retrieval really added context
    assert saved["store"]["cached_index_bytes"] > 0

    table = capsys.readouterr().out.rstrip().splitlines()
    tail = table[table.index("ratios:") + 1 :]
    assert [line.split()[0] for line in tail] == list(RATIOS)

    assert asyncio.run(_leftovers(redis_url)) == []
