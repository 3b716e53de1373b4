"""The vocabulary and renderer of the PFI Grafana dashboards: panels described as data (:class:`Panel`,
:class:`Row`, :class:`Text`, queries :class:`Q`) rendered to dashboard JSON (schemaVersion 39) with the
same datasource variable, units, legends and layout rules everywhere.

The dashboards themselves are data in :mod:`panels` (one module per dashboard); :mod:`dashboards`
lists them and opsgen.py writes them to k8s/base/grafana/dashboards/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
FED = f'{NS}, federation=~"$federation"'
RI = "$__rate_interval"


@dataclass
class Q:
    """One query: PromQL, legend and (heatmaps) format."""

    expr: str
    legend: str = ""
    fmt: str = "time_series"


@dataclass
class Panel:
    title: str
    description: str
    unit: str
    queries: list[Q]
    kind: str = "timeseries"  # timeseries | stat | heatmap
    width: int = 12
    height: int = 8
    stack: bool = False
    minimum: float | None = None
    maximum: float | None = None
    thresholds: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Row:
    title: str


@dataclass
class Text:
    title: str
    content: str
    width: int = 24
    height: int = 3


Item = Panel | Row | Text


@dataclass
class Dashboard:
    """One dashboard as data: its uid (= file name), title, description, variables and items."""

    uid: str
    title: str
    description: str
    variables: list[dict[str, Any]]
    items: list[Item]


def quantiles(metric: str, selector: str, by: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[Q]:
    extra = f", {by}" if by else ""
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [
        Q(
            f"histogram_quantile({q}, sum by (le{extra}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
            f"p{round(q * 100)}{legend_by}",
        )
        for q in qs
    ]


def var_datasource() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def var_query(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
        "regex": "",
        "sort": 1,
    }


def _thresholds(steps: list[tuple[float, str]]) -> dict[str, Any]:
    base: list[dict[str, Any]] = [{"color": "green", "value": None}]
    return {"mode": "absolute", "steps": base + [{"color": c, "value": v} for v, c in steps]}


def render_panel(panel: Panel, pid: int, grid: dict[str, int]) -> dict[str, Any]:
    targets = [
        {
            "datasource": DS,
            "editorMode": "code",
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "range": True,
            "instant": False,
            "format": q.fmt,
            "refId": chr(ord("A") + i),
        }
        for i, q in enumerate(panel.queries)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit, "thresholds": _thresholds(panel.thresholds)}
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": grid,
        "targets": targets,
    }
    if panel.kind == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 5,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "dashed" if panel.thresholds else "off"},
        }
        out["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
        }
    elif panel.kind == "heatmap":
        out["options"] = {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5},
            "yAxis": {"axisPlacement": "left", "unit": panel.unit},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
            "legend": {"show": True},
            "filterValues": {"le": 1e-9},
        }
        out["maxDataPoints"] = 60
    else:
        raise ValueError(f"unknown panel kind {panel.kind!r}")
    out["fieldConfig"] = {"defaults": defaults, "overrides": []}
    return out


def render(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], items: list[Item]
) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = row_height = 0
    pid = 1
    for item in items:
        if isinstance(item, Row):
            if x:
                y, x, row_height = y + row_height, 0, 0
            panels.append(
                {
                    "id": pid,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
        else:
            if x + item.width > 24:
                y, x, row_height = y + row_height, 0, 0
            grid = {"h": item.height, "w": item.width, "x": x, "y": y}
            if isinstance(item, Text):
                panels.append(
                    {
                        "id": pid,
                        "type": "text",
                        "title": item.title,
                        "gridPos": grid,
                        "options": {"mode": "markdown", "content": item.content},
                    }
                )
            else:
                panels.append(render_panel(item, pid, grid))
            x += item.width
            row_height = max(row_height, item.height)
        pid += 1
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "title": "PFI dashboards",
                "type": "dashboards",
                "tags": ["pfi"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["pfi"],
        "templating": {"list": variables},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def render_dashboard(board: Dashboard) -> dict[str, Any]:
    return render(board.uid, board.title, board.description, board.variables, board.items)
