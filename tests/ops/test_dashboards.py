"""Static checks of the Grafana dashboards (k8s/base/grafana/dashboards/*.json).

The live checks (names against /metrics, queries against a real Prometheus) are in
test_metrics_live.py and test_prometheus_live.py.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pytest

from tests.ops.promql import (
    GRAFANA_BUILTINS,
    PROMETHEUS_BUILTIN,
    ROOT,
    dashboard_queries,
    iter_panels,
    load_dashboards,
    recording_rule_names,
    referenced_names,
)

DATA_PANELS = {"timeseries", "stat", "heatmap", "gauge", "bargauge", "table"}

# What issue 7 asks each dashboard to show (panel titles, case-insensitive substrings).
REQUIRED_PANELS = {
    "pfi-federation-overview": [
        "updates by result",
        "staleness of accepted updates",
        "versions per minute",
        "aggregation latency",
        "buffer fill",
        "consumer lag",
        "dead letters by reason",
        "unreplicated versions",
        "internal errors",
    ],
    "pfi-serving": [
        "requests by route",
        "errors by route",
        "latency by route",
        "cache hit ratio",
        "adapter load latency",
        "global version served",
        "freshness",
        "413 and 429",
    ],
    "pfi-edge-fleet": [
        "updates published",
        "failures by reason",
        "training loss",
        "ingest refusals by reason",
    ],
    # issue 16: what clients report about personalization quality
    "pfi-personalization-quality": [
        "personalization gain distribution",
        "harmed by personalization",
        "global-regression share",
        "loss change under the new global",
    ],
}


@pytest.fixture(scope="module")
def boards() -> dict[str, dict[str, Any]]:
    return load_dashboards()


def test_generated_files_are_up_to_date() -> None:
    sys.path.insert(0, str(ROOT / "scripts" / "ops"))
    try:
        import opsgen
    finally:
        sys.path.pop(0)
    stale = [str(p.relative_to(ROOT)) for p, text in opsgen.generated().items() if p.read_text() != text]
    assert not stale, f"run `.venv/bin/python scripts/ops/opsgen.py`: {stale} differ from their sources"


def test_uids_and_titles_are_unique_and_files_are_named_by_uid(boards: dict[str, dict[str, Any]]) -> None:
    assert set(boards) == set(REQUIRED_PANELS)
    uids = [b["uid"] for b in boards.values()]
    titles = [b["title"] for b in boards.values()]
    assert len(set(uids)) == len(uids), f"duplicate uids: {uids}"
    assert len(set(titles)) == len(titles), f"duplicate titles: {titles}"
    for stem, board in boards.items():
        assert board["uid"] == stem, f"{stem}.json has uid {board['uid']}"
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"]), "Grafana uids: 40 characters at most"
        assert "pfi" in board["tags"]
        assert board["id"] is None, "exported dashboards must not carry a database id"


def test_panels_have_units_datasource_queries_and_legends(boards: dict[str, dict[str, Any]]) -> None:
    problems = []
    for stem, board in boards.items():
        ids = [p["id"] for p in iter_panels(board)]
        if len(set(ids)) != len(ids):
            problems.append(f"{stem}: duplicate panel ids")
        for panel in iter_panels(board):
            if panel["type"] not in DATA_PANELS:
                continue
            where = f"{stem} / {panel['title']}"
            if not panel["fieldConfig"]["defaults"].get("unit"):
                problems.append(f"{where}: no unit")
            if panel.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                problems.append(f"{where}: datasource is not the $datasource variable")
            if not panel.get("description"):
                problems.append(f"{where}: no description (it is the panel's help text)")
            refs = [t["refId"] for t in panel["targets"]]
            if not refs or len(set(refs)) != len(refs):
                problems.append(f"{where}: no targets or duplicate refIds")
            for t in panel["targets"]:
                if not t.get("expr") or not t.get("legendFormat"):
                    problems.append(f"{where} / {t['refId']}: empty expr or legend")
                if t.get("datasource") != panel["datasource"]:
                    problems.append(f"{where} / {t['refId']}: target datasource differs")
                if panel["type"] == "heatmap" and t.get("format") != "heatmap":
                    problems.append(f"{where}: heatmap target not in heatmap format")
    assert not problems, "\n".join(problems)


def test_layout_fits_the_grid_without_overlaps(boards: dict[str, dict[str, Any]]) -> None:
    for stem, board in boards.items():
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            g = panel["gridPos"]
            assert g["x"] >= 0, f"{stem} / {panel['title']} leaves the grid"
            assert g["x"] + g["w"] <= 24, f"{stem} / {panel['title']} leaves the grid"
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & area, f"{stem} / {panel['title']} overlaps another panel"
            cells |= area


def test_variables_are_defined_and_datasource_is_templated(boards: dict[str, dict[str, Any]]) -> None:
    for stem, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        used = set()
        for q in dashboard_queries():
            if q.dashboard == stem:
                used |= set(re.findall(r"\$\{?(\w+)", q.expr))
        undefined = used - set(variables) - set(GRAFANA_BUILTINS)
        assert not undefined, f"{stem}: queries use undefined variables {undefined}"


def test_rate_functions_only_take_counters_and_quantiles_only_buckets() -> None:
    problems = []
    for q in dashboard_queries():
        for fn, metric in re.findall(r"\b(rate|irate|increase)\((\w+)", q.expr):
            if not metric.endswith(("_total", "_bucket", "_sum", "_count")):
                problems.append(f"{q.dashboard} / {q.panel}: {fn}() over {metric}, not a counter")
        for inner in re.findall(r"histogram_quantile\([^,]+,(.*)", q.expr):
            if "_bucket" not in inner or not re.search(r"by \((?:[\w, ]*\b)?le\b", inner):
                problems.append(f"{q.dashboard} / {q.panel}: histogram_quantile() without buckets by le")
    assert not problems, "\n".join(problems)


def test_required_panels_are_there(boards: dict[str, dict[str, Any]]) -> None:
    for stem, wanted in REQUIRED_PANELS.items():
        titles = [p["title"].lower() for p in iter_panels(boards[stem])]
        missing = [w for w in wanted if not any(w in t for t in titles)]
        assert not missing, f"{stem}: no panel for {missing}"
    staleness = [
        p for p in iter_panels(boards["pfi-federation-overview"]) if "staleness of" in p["title"].lower()
    ]
    assert staleness[0]["type"] == "heatmap"


def test_queries_name_only_pfi_metrics_recording_rules_and_up() -> None:
    """The names themselves are checked against live /metrics pages in test_metrics_live.py."""
    records = recording_rule_names()
    foreign = {
        n: sorted(w)
        for n, w in referenced_names().items()
        if not n.startswith(("pfi_aggregator_", "pfi_serve_", "pfi_ingest_", "pfi_hierarchy_"))
        and n not in records
        and n not in PROMETHEUS_BUILTIN
    }
    assert not foreign, f"queries name metrics the PFI services do not export: {foreign}"


def test_dashboards_are_provisioned_by_configmaps_with_the_sidecar_label(
    overlays: dict[str, list[dict[str, Any]]], boards: dict[str, dict[str, Any]]
) -> None:
    for name, docs in overlays.items():
        maps = [
            d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("pfi-dashboard-")
        ]
        provisioned = {}
        for cm in maps:
            assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert cm["metadata"]["namespace"] == "monitoring"
            size = sum(len(v) for v in cm["data"].values())
            # `kubectl apply` keeps a copy in an annotation, and annotations are limited to 256 KiB.
            assert size < 120 * 1024, f"{name}: {cm['metadata']['name']} is {size} bytes"
            for key, text in cm["data"].items():
                provisioned[key.removesuffix(".json")] = json.loads(text)
        assert provisioned == boards, f"{name}: the ConfigMaps do not carry the dashboard files"
