"""``pfi bench async-sync --quick``: the short variant of the benchmark, on the tiny model.

Checks what the benchmark's figures rest on (never the figures themselves): the three runs sent what
their design says (sync: every client every round; sync_k: K sampled clients per round, as many
updates; async: stopped at the target or its budget), versions match, the time-to-target bookkeeping
is consistent with the curves, and the JSON and the plot are written.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bench import async_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_async_sync_quick(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFI_REDIS_URL", redis_url)
    parser = argparse.ArgumentParser()
    async_sync.add_arguments(parser)
    out = tmp_path / "async-sync.json"
    args = parser.parse_args(["--quick", "--out", str(out), "--workdir", str(tmp_path / "work")])
    result = async_sync.run(args)

    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "async-sync"
    assert isinstance(saved["ratios"], dict)
    assert Path(saved["plot"]).stat().st_size > 0
    cfg = saved["config"]
    users, rounds, k = result["users"], cfg["rounds"], cfg["async_buffer"]
    total = users * rounds
    runs = saved["runs"]
    assert runs["sync"]["updates"] == total
    assert runs["sync"]["versions"] == rounds
    assert runs["sync"]["buffer_size"] == users
    assert runs["sync_k"]["updates"] == math.ceil(total / k) * k
    assert runs["sync_k"]["versions"] == math.ceil(total / k)
    assert runs["sync_k"]["buffer_size"] == k
    assert runs["async"]["updates"] <= math.ceil(cfg["async_budget"] * total)
    for run in runs.values():
        times = [p["virtual_s"] for p in run["curve"]]
        assert times == sorted(times)
        assert times[0] == 0.0
        assert [p["version"] for p in run["curve"]] == list(range(len(run["curve"])))
    found = saved["time_to_target"]
    assert found["target_nll"] == max(found["best_nll"]["sync"], found["best_nll"]["sync_k"])
    for mode, hit in found["runs"].items():
        if hit is not None:  # the first version at or below the target, as the curve says
            first = next(p for p in runs[mode]["curve"] if p["nll"] <= found["target_nll"] + 1e-9)
            assert (hit["version"], hit["virtual_s"]) == (first["version"], first["virtual_s"])
    if "async_vs_sync" in saved["ratios"]:
        a = found["runs"]["async"]["virtual_s"]
        best_sync = min(h["virtual_s"] for m, h in found["runs"].items() if m != "async" and h is not None)
        assert saved["ratios"]["async_vs_sync"] == pytest.approx(best_sync / a)
    else:
        assert found.get("reason")
