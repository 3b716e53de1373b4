"""Every metric the dashboards and alert rules name exists on the services' live ``/metrics`` pages.

The services run for real (tests/ops/live.py), so a renamed or removed metric fails here instead of
leaving an empty panel or an alert that can never fire. Names may be used with the exposition
suffixes of their type (``_total`` of counters; ``_bucket``/``_sum``/``_count`` of histograms).
"""

from __future__ import annotations

import urllib.request

import pytest

from tests.ops.live import Endpoints
from tests.ops.promql import exported_names, referenced_names

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode("utf-8")


def test_every_aggregator_metric_used_by_dashboards_and_rules_is_exported(live: Endpoints) -> None:
    exported = exported_names(scrape(live.aggregator))
    used = {n: w for n, w in referenced_names().items() if n.startswith("pfi_aggregator_")}
    missing = {n: sorted(w) for n, w in used.items() if n not in exported}
    assert not missing, f"aggregator metrics used but not exported by /metrics: {missing}"
    assert used, "no aggregator metric referenced at all?"


def test_every_serving_metric_used_by_dashboards_and_rules_is_exported(live: Endpoints) -> None:
    """Serving and its HTTPS ingest (``pfi_ingest_``: the ingest route is part of the service)."""
    if live.serving is None:
        pytest.skip(f"personalization service not available: {live.serving_skip}")
    exported = exported_names(scrape(live.serving))
    used = {n: w for n, w in referenced_names().items() if n.startswith(("pfi_serve_", "pfi_ingest_"))}
    missing = {n: sorted(w) for n, w in used.items() if n not in exported}
    assert not missing, f"serving metrics used but not exported by /metrics: {missing}"
    assert used, "no serving metric referenced at all?"
