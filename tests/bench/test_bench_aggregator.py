"""``pfi bench aggregator`` at tiny sizes against the real local stack: structure, not timings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bench import aggregator as bench
from services.settings import PFISettings
from services.stack.topics import describe_topics
from services.store import keys as store_keys
from tests.conftest import run_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_bench_aggregator_runs_end_to_end(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFI_REDIS_URL", redis_url)  # the test database, not the default one
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "aggregator.json"
    # 16 KiB: one message per update; 96 KiB with 32 KiB chunks: 4 messages per update (chunked).
    args = parser.parse_args(
        [
            "--sizes", "16K,96K", "--updates", "4", "--buffer-size", "2", "--chunk-bytes", "32768",
            "--fold-updates", "2", "--repeats", "1", "--timeout", "60", "--out", str(out),
        ]
    )  # fmt: skip
    result = bench.run(args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    rows = {row["size"]: row for row in result["sizes"]}
    assert set(rows) == {"16k", "96k"}
    assert rows["16k"]["messages_per_update"] == 1
    assert rows["96k"]["messages_per_update"] > 1  # travelled chunked
    for row in rows.values():
        agg = row["aggregator"]
        # Every produced update aggregated exactly once (from the federation's status), none rejected.
        assert agg["aggregated_total"] == row["updates"] == 4
        assert agg["distinct_ids"] == 4
        assert agg["rejected_total"] == 0
        assert agg["versions"] == 2  # K = 2
        assert agg["exactly_once"] is True
        assert row["raw"]["messages"] == row["messages"] == row["updates"] * row["messages_per_update"]
        assert row["flower"]["max_abs_diff"] < 1e-5  # the two folds compute the same mean
        assert row["stages"]["stages"]
        costs = row["costs_us"]  # the per-update breakdown of the capacity model (issue 15)
        for name in ("receive", "verify", "decode", "validate", "fold", "commit"):
            assert 0 <= costs[name] < costs["end_to_end"], (name, costs)
        assert costs["end_to_end"] == pytest.approx(1e6 * agg["seconds"] / row["updates"])
        assert len(row["raw"]["seconds_before_after"]) == 2
    ratios = result["ratios"]
    for name in ("vs_raw_consumer", "vs_flower", "vs_flower_from_wire", "vs_flower_validated"):
        assert isinstance(ratios[name], float), name
        assert ratios[name] > 0, name
    for size in rows:
        assert ratios[f"vs_raw_consumer_{size}"] > 0
        assert ratios[f"vs_flower_{size}"] > 0
    assert "vs_raw_consumer = " in bench.table(result)
    assert "cost per update (µs)" in bench.table(result)

    # Cleaned up: no keys of the run's federations, none of its topics.
    feds = [row["federation"] for row in result["sizes"]]

    async def leftovers() -> tuple[list[bytes], dict[str, object]]:
        client = Redis.from_url(redis_url)
        try:
            found = [k for fed in feds async for k in client.scan_iter(match=store_keys.prefix(fed) + "*")]
            found += [f.encode() for f in feds if await client.sismember(store_keys.FEDERATIONS, f)]
        finally:
            await client.aclose()
        topics = await describe_topics(PFISettings(), [f"{fed}.adapter-updates" for fed in feds])
        return found, dict(topics)

    assert run_in_thread(leftovers()) == ([], {})
