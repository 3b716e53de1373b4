"""Helpers of the ops tests: the queries of the dashboards and rules, the metric names they use, the
names a ``/metrics`` page exports, and the rendered Kubernetes overlays."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
RULES_FILE = K8S / "prometheus" / "pfi.rules.yaml"
RULE_TESTS = sorted((K8S / "prometheus" / "tests").glob("*.yaml"))
DASHBOARD_DIR = K8S / "base" / "grafana" / "dashboards"
OVERLAYS = ("dev", "prod")
INSTALL = ROOT / "scripts" / "ops" / "install.sh"

#: Series Prometheus makes itself; the only non-PFI names a query may use.
PROMETHEUS_BUILTIN = frozenset({"up"})

#: Grafana's built-in variables, replaced by a value before a query goes to Prometheus.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"inf", "nan", "atan2"}
)
_TOKEN = re.compile(
    r"""(?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)
      | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?
    """,
    re.VERBOSE,
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.DOTALL)


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana variables: built-ins by a value, dashboard variables by ``.*`` (they only
    appear inside regex label matchers)."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return GRAFANA_BUILTINS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names a PromQL expression selects."""
    match = _LABEL_VALUES.match(expr)
    if match:
        expr = match.group(1)
    text = _STRING.sub('""', grafana_to_promql(expr))
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers (strings are gone already)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries
    previous = None
    while previous != text:  # nested grouping clauses are flat, but be safe
        previous, text = text, _GROUPING.sub(" ", text)
    names = set()
    for token in _TOKEN.finditer(text):
        ident = token.group("ident")
        if ident is None or token.group("call") or ident in _KEYWORDS:
            continue
        names.add(ident)
    return names


# -- rules ----------------------------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def alert_names() -> list[str]:
    return [rule["alert"] for rule in load_rules() if "alert" in rule]


# -- dashboards -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def iter_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def dashboard_queries() -> list[DashboardQuery]:
    out = []
    for name, board in load_dashboards().items():
        for panel in iter_panels(board):
            for target in panel.get("targets", []):
                out.append(DashboardQuery(name, panel["title"], target["refId"], target["expr"]))
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                out.append(DashboardQuery(name, f"variable ${var['name']}", "var", query))
    return out


def referenced_names() -> dict[str, set[str]]:
    """``{metric name: {where it is used}}`` over every dashboard query and rule expression."""
    used: dict[str, set[str]] = {}
    for q in dashboard_queries():
        for name in metric_names(q.expr):
            used.setdefault(name, set()).add(f"dashboard {q.dashboard} / {q.panel}")
    for rule in load_rules():
        where = f"rule {rule.get('record') or rule.get('alert')}"
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(where)
    return used


# -- /metrics -------------------------------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def exported_names(text: str) -> dict[str, str]:
    """``{series name: family type}`` of an exposition page, including the series names of families that
    have no samples yet (a labelled counter nobody incremented still declares its name)."""
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.type
        for sample in family.samples:
            names[sample.name] = family.type
    return names


def series_names(text: str) -> set[str]:
    """Names of the series with at least one sample on the page."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


# -- tools and overlays -------------------------------------------------------------------------------


def ops_tools() -> dict[str, str]:
    """Paths of the validation tools (scripts/ops/install.sh: idempotent, cached outside the repo)."""
    out = subprocess.run(
        ["bash", str(INSTALL), "--env"], capture_output=True, text=True, timeout=1800, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"scripts/ops/install.sh failed:\n{out.stderr[-3000:]}")
    tools = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        tools[key] = shlex.split(value)[0] if value else ""
    return tools


def build_overlay(kustomize: str, overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kustomize, "build", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise AssertionError(f"kustomize build k8s/overlays/{overlay} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
