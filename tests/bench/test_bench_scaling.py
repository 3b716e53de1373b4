"""``pfi bench scaling --quick`` against the real local stack: structure, not timings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import scaling as bench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_bench_scaling_runs_end_to_end(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFI_REDIS_URL", redis_url)  # the test database, not the default one
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "scaling.json"
    result = bench.run(
        parser.parse_args(["--quick", "--partitions", "2", "--settle", "1", "--out", str(out)])
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert [row["leaves"] for row in result["curve"]] == [1, 2]
    for row in result["curve"]:
        assert row["updates_in_window"] >= result["updates"]  # every update folded in each run
        assert row["updates_per_s"] > 0
    assert set(result["ratios"]) == {"leaves_2_vs_1", "cpu_efficiency_2_vs_1"}
    assert all(row["leaf_cpu_s"] > 0 for row in result["curve"])
    assert result["ratios"]["leaves_2_vs_1"] > 0
    assert "leaves_2_vs_1" in bench.table(result)
