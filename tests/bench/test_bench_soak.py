"""``pfi bench soak`` for a few seconds: the short variant of the 30-minute soak.

Real ``pfi aggregator`` and ``pfi serve`` processes, a steady update rate and a request loop; checks
the exactly-once audit (nothing lost or double counted), that every sample has both services' RSS and
the lag, that requests were served, and that the JSON and the plot are written. Memory growth is a
figure of the long run, not asserted here.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bench import soak

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_soak_short(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFI_REDIS_URL", redis_url)
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    out = tmp_path / "soak.json"
    argv = ["--minutes", "0.3", "--rate", "4", "--request-rate", "4", "--sample-s", "1", "--buffer-size", "4"]
    args = parser.parse_args([*argv, "--out", str(out), "--workdir", str(tmp_path / "logs")])
    soak.run(args)

    saved = json.loads(out.read_text())
    audit = saved["audit"]
    assert audit["sent"] > 20
    assert audit["lost"] == 0
    assert audit["double_counted"] == 0
    assert audit["aggregated"] == audit["sent"]
    assert audit["rejected"].get("total", 0) == 0
    assert audit["versions"] >= audit["sent"] // 4
    assert saved["requests"]["ok"] > 10
    assert saved["requests"]["error"] == 0
    assert len(saved["samples"]) >= 10
    for row in saved["samples"]:
        assert row["rss_aggregator"] > 0
        assert row["rss_serve"] > 0
        assert row["lag_messages"] >= 0
    assert all(math.isfinite(v) for v in saved["ratios"].values())
    assert Path(saved["plot"]).stat().st_size > 0
