"""The PFI Grafana dashboards (uid = file name in k8s/base/grafana/dashboards/), rendered by opsgen.py.

* ``pfi-federation-overview`` (:mod:`panels.federation_overview`): versions, updates by result,
  staleness, aggregation latency, buffers, consumer lag, dead letters;
* ``pfi-serving`` (:mod:`panels.serving`): SLO burn, RED per route, model queue and batches, personal
  adapter cache and loads, global version served and its freshness;
* ``pfi-edge-fleet`` (:mod:`panels.edge_fleet`): what the aggregators see of the fleet (edge agents
  expose no metrics): updates published, failures by reason, reported training loss, staleness, update
  sizes;
* ``pfi-personalization-quality`` (:mod:`panels.personalization_quality`): client-reported
  personalization gain, the share of clients it harms and the share a new global makes worse.

The panels are data (scripts/ops/panels/); the vocabulary and the renderer are :mod:`grafana`. Every
query uses only metrics the services export or recording rules of k8s/prometheus/pfi.rules.yaml
(tests/ops checks that against a live /metrics scrape and a real Prometheus).
"""

from __future__ import annotations

from typing import Any

from grafana import Dashboard, render_dashboard
from panels import edge_fleet, federation_overview, personalization_quality, serving

DASHBOARDS: list[Dashboard] = [
    federation_overview.DASHBOARD,
    serving.DASHBOARD,
    edge_fleet.DASHBOARD,
    personalization_quality.DASHBOARD,
]


def build_all() -> dict[str, dict[str, Any]]:
    boards = [render_dashboard(board) for board in DASHBOARDS]
    return {board["uid"]: board for board in boards}
