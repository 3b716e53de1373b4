"""``pfi bench serving`` at tiny sizes: every stage runs against the real Redis, the headline ratios
exist, are finite and positive, the table ends with them and the JSON lands where it was asked to.
No timing thresholds: the figures of a smoke run on a shared machine mean nothing."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bench import serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HEADLINE = ("p50_vs_base", "throughput_vs_per_request_load", "freshness_p99_s", "stream_ttft_vs_native")


def test_serving_bench_tiny(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PFI_REDIS_URL", redis_url)
    out = tmp_path / "nested" / "serving.json"
    result = serving.run_serving_bench(quick=True, model="tiny", out=out, sizes=serving.TINY_SIZES)

    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "serving"
    assert saved["model"] == "pfi/tiny-llama"
    ratios = saved["ratios"]
    for name in HEADLINE:
        assert isinstance(ratios[name], int | float), name
        assert math.isfinite(ratios[name]), name
        assert ratios[name] > 0, (name, ratios[name])
    assert ratios == result["ratios"]
    assert set(saved["goals"]) == set(HEADLINE)
    assert set(saved["goals_met"]) == set(HEADLINE)
    assert all(isinstance(v, bool) for v in saved["goals_met"].values())
    assert saved["freshness"]["never_served"] == []
    assert saved["freshness"]["request_errors"] == 0
    thr = saved["throughput"]
    assert thr["users"] == serving.TINY_SIZES["users"]
    assert thr["service_rps"] > 0
    assert thr["per_request_load_rps"] > 0
    assert thr["service_cache_hit_rate"] == 1.0  # after the fill, every user is served from the cache
    for kind in ("score", "generate"):
        for mode in ("base", "global", "personal"):
            assert saved["latency"][kind][mode]["n"] == serving.TINY_SIZES["latency_rounds"]

    table = capsys.readouterr().out.rstrip().splitlines()
    assert "ratios:" in table
    tail = table[table.index("ratios:") + 1 :]
    assert [line.split()[0] for line in tail] == list(ratios)
    for name in HEADLINE:
        line = next(line for line in tail if line.split()[0] == name)
        assert "goal" in line
        assert line.endswith((": met", ": NOT met"))


def test_serving_cli_accepts_out_and_models() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serving.register(sub)
    args = parser.parse_args(["serving", "--quick", "--model", "smollm2", "--out", "x.json"])
    assert (args.quick, args.model, args.out) == (True, "smollm2", "x.json")
    with pytest.raises(SystemExit):
        parser.parse_args(["serving", "--model", "nope"])
