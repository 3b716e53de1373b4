"""The PFI Grafana dashboards as data: panel lists rendered to dashboard JSON (schemaVersion 39).

Three dashboards (uid = file name in k8s/base/grafana/dashboards/):

* ``pfi-federation-overview``: versions, updates by result, staleness, aggregation latency, buffers,
  consumer lag, dead letters;
* ``pfi-serving``: SLO burn, RED per route, model queue and batches, personal adapter cache and
  loads, global version served and its freshness;
* ``pfi-edge-fleet``: what the aggregators see of the fleet (edge agents expose no metrics):
  updates published, failures by reason, reported training loss, staleness, update sizes.

Every query uses only metrics the services export or recording rules of k8s/prometheus/pfi.rules.yaml
(tests/ops checks that against a live /metrics scrape and a real Prometheus). Rendered by opsgen.py.
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


# -- Federation overview --------------------------------------------------------------------------------


def federation_overview() -> dict[str, Any]:
    items: list[Item] = [
        Row("Global versions"),
        Panel(
            "Global version",
            "Newest global version committed, per federation (highest over aggregator instances).",
            "none",
            [Q(f"max by (federation) (pfi_aggregator_global_version{{{FED}}})", "{{federation}}")],
            kind="stat",
            width=6,
            height=5,
        ),
        Panel(
            "Time since last version",
            "Seconds since each federation's last committed version. Buffers flush when full or after "
            "flush_timeout_s, so this stays small while updates arrive.",
            "s",
            [
                Q(
                    f"time() - max by (federation) (pfi_aggregator_last_version_timestamp_seconds{{{FED}}})",
                    "{{federation}}",
                )
            ],
            kind="stat",
            width=6,
            height=5,
            thresholds=[(300, "orange"), (900, "red")],
        ),
        Panel(
            "Consumer lag",
            "Messages of the updates topic not yet processed (highest report per partition, summed).",
            "short",
            [Q(f"sum(max by (partition) (pfi_aggregator_consumer_lag_messages{{{NS}}}))", "lag")],
            kind="stat",
            width=6,
            height=5,
            thresholds=[(100, "orange"), (1000, "red")],
        ),
        Panel(
            "Dead-letter ratio (5m)",
            "Share of updates rejected to the dead-letter topic (recording rule). "
            "Alert: PFIDeadLetterRatioHigh.",
            "percentunit",
            [Q(f"federation:pfi_aggregator_dead_letter_ratio:rate5m{{{FED}}}", "{{federation}}")],
            kind="stat",
            width=6,
            height=5,
            thresholds=[(0.01, "orange"), (0.05, "red")],
        ),
        Panel(
            "Versions per minute",
            "Global versions committed per minute. Flat at zero while updates arrive means a stall "
            "(alert PFIAggregatorStalled).",
            "opm",
            [
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_versions_published_total{{{FED}}}[{RI}]))"
                    " * 60",
                    "{{federation}}",
                )
            ],
        ),
        Panel(
            "Aggregation latency (merge + commit)",
            "Time to merge a full buffer and commit the version to Redis.",
            "s",
            quantiles("pfi_aggregator_aggregation_duration_seconds", FED, "federation"),
        ),
        Row("Updates"),
        Panel(
            "Updates by result",
            "Complete updates per second: accepted into a buffer, merged into a version, rejected "
            "(dead-lettered).",
            "ops",
            [
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_updates_accepted_total{{{FED}}}[{RI}]))",
                    "accepted {{federation}}",
                ),
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_updates_aggregated_total{{{FED}}}[{RI}]))",
                    "aggregated {{federation}}",
                ),
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_updates_rejected_total{{{FED}}}[{RI}]))",
                    "rejected {{federation}}",
                ),
            ],
        ),
        Panel(
            "Dead letters by reason",
            "Rejections per second by reason code. signature_invalid / spec_mismatch / shape_mismatch "
            "spikes usually follow a client rollout with the wrong key or spec; duplicate means replays.",
            "ops",
            [
                Q(
                    f"sum by (reason) (rate(pfi_aggregator_updates_rejected_total{{{FED}}}[{RI}]))",
                    "{{reason}}",
                )
            ],
            stack=True,
        ),
        Panel(
            "Staleness of accepted updates",
            "Distribution of staleness (versions between an update's base and the latest version) over time.",
            "short",
            [
                Q(
                    f"sum by (le) (increase(pfi_aggregator_update_staleness_bucket{{{FED}}}[{RI}]))",
                    "{{le}}",
                    "heatmap",
                )
            ],
            kind="heatmap",
        ),
        Panel(
            "Staleness p50 / p90",
            "Versions behind the latest, per federation. Alert PFIUpdateStalenessHigh: p90 > 8 for 15 min.",
            "short",
            quantiles("pfi_aggregator_update_staleness", FED, "federation", (0.5, 0.9)),
            thresholds=[(8, "red")],
        ),
        Row("Buffers and lag"),
        Panel(
            "Buffer fill",
            "Updates waiting for the next version, as a share of the buffer size K.",
            "percentunit",
            [
                Q(
                    f"max by (federation) (pfi_aggregator_buffer_updates{{{FED}}})"
                    f" / max by (federation) (pfi_aggregator_buffer_capacity_updates{{{FED}}})",
                    "{{federation}}",
                )
            ],
            minimum=0,
            maximum=1,
        ),
        Panel(
            "Consumer lag by partition",
            "High watermark minus position per partition of the updates topic (alert PFIConsumerLagGrowing).",
            "short",
            [
                Q(
                    f"max by (partition) (pfi_aggregator_consumer_lag_messages{{{NS}}})",
                    "partition {{partition}}",
                )
            ],
            stack=True,
        ),
        Panel(
            "Partitions per instance",
            "Partitions of the updates topic each aggregator owns (KEDA never runs more aggregators "
            "than partitions).",
            "short",
            [Q(f"pfi_aggregator_assigned_partitions{{{NS}}}", "{{instance}}")],
            width=8,
        ),
        Panel(
            "Chunked uploads in flight",
            "Incomplete chunked uploads held for reassembly.",
            "short",
            [Q(f"sum by (instance) (pfi_aggregator_chunked_uploads_in_flight{{{NS}}})", "{{instance}}")],
            width=8,
        ),
        Panel(
            "Reassembly memory",
            "Bytes of incomplete chunked uploads (bounded by PFI_MAX_INFLIGHT_CHUNK_BYTES).",
            "bytes",
            [Q(f"sum by (instance) (pfi_aggregator_chunk_bytes_in_flight_bytes{{{NS}}})", "{{instance}}")],
            width=8,
        ),
        Row("Aggregator health"),
        Panel(
            "Commit conflicts and flush failures",
            "Version commits refused by fencing (another owner moved the federation: reload + replay) and "
            "internal flush failures (state dropped and replayed).",
            "ops",
            [
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_commit_conflicts_total{{{FED}}}[{RI}]))",
                    "conflicts {{federation}}",
                ),
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_flush_failures_total{{{FED}}}[{RI}]))",
                    "failures {{federation}}",
                ),
            ],
            width=8,
        ),
        Panel(
            "Validation latency",
            "Decode + validate time of one update (worker threads).",
            "s",
            quantiles("pfi_aggregator_validation_duration_seconds", NS, ""),
            width=8,
        ),
        Panel(
            "Time since last poll cycle",
            "Per instance. Alert PFIAggregatorLoopStuck above 2 minutes.",
            "s",
            [Q(f"time() - pfi_aggregator_last_success_timestamp_seconds{{{NS}}}", "{{instance}}")],
            width=8,
            thresholds=[(120, "red")],
        ),
        Panel(
            "Updates being validated",
            "Updates in the decode/validate worker threads right now.",
            "short",
            [Q(f"sum by (instance) (pfi_aggregator_updates_in_flight{{{NS}}})", "{{instance}}")],
            width=8,
        ),
        Panel(
            "Replayed messages skipped",
            "Messages skipped after a restart or rebalance because they are already durable.",
            "ops",
            [
                Q(
                    f"sum by (instance) (rate(pfi_aggregator_replayed_messages_skipped_total{{{NS}}}[{RI}]))",
                    "{{instance}}",
                )
            ],
            width=8,
        ),
        Panel(
            "Server-side DP budget spent (epsilon)",
            "Privacy budget spent by server-side Gaussian noise, per federation (only with DP enabled).",
            "none",
            [Q(f"max by (federation) (pfi_aggregator_dp_epsilon{{{FED}}})", "{{federation}}")],
            width=8,
        ),
    ]
    variables = [
        var_datasource(),
        var_query("namespace", "Namespace", "label_values(pfi_aggregator_assigned_partitions, namespace)"),
        var_query(
            "federation",
            "Federation",
            'label_values(pfi_aggregator_updates_received_total{namespace=~"$namespace"}, federation)',
        ),
    ]
    return render(
        "pfi-federation-overview",
        "PFI / Federation overview",
        "Aggregators: updates in, versions out, staleness, buffers, lag and dead letters.",
        variables,
        items,
    )


# -- Serving ------------------------------------------------------------------------------------------------

API = f'{NS}, route=~"$route"'


def serving() -> dict[str, Any]:
    items: list[Item] = [
        Row("SLOs (30 days: 99.5 % of /v1 requests without 5xx; 99 % of generate/score under 5 s)"),
        Panel(
            "Error ratio (1h)",
            "Share of /v1 requests answered with 5xx over the last hour (budget: 0.5 %).",
            "percentunit",
            [Q(f"namespace:pfi_serve_request_errors:ratio_rate1h{{{NS}}}", "{{namespace}}")],
            kind="stat",
            width=6,
            height=5,
            thresholds=[(0.005, "orange"), (0.072, "red")],
        ),
        Panel(
            "Slow inference ratio (1h)",
            "Share of generate/score requests slower than 5 s over the last hour (budget: 1 %).",
            "percentunit",
            [Q(f"namespace:pfi_serve_request_slow:ratio_rate1h{{{NS}}}", "{{namespace}}")],
            kind="stat",
            width=6,
            height=5,
            thresholds=[(0.01, "orange"), (0.144, "red")],
        ),
        Panel(
            "Error-budget burn rate",
            "How many times faster than sustainable the budgets burn. Fast-burn alerts page at 14.4x (1 h "
            "and 5 min) and 6x (6 h and 30 min); slow-burn alerts at 3x (1 d and 2 h) and 1x (3 d and 6 h).",
            "suffix:x",
            [
                Q(f"namespace:pfi_serve_request_errors:ratio_rate1h{{{NS}}} / 0.005", "errors 1h"),
                Q(f"namespace:pfi_serve_request_errors:ratio_rate6h{{{NS}}} / 0.005", "errors 6h"),
                Q(f"namespace:pfi_serve_request_slow:ratio_rate1h{{{NS}}} / 0.01", "latency 1h"),
                Q(f"namespace:pfi_serve_request_slow:ratio_rate6h{{{NS}}} / 0.01", "latency 6h"),
            ],
            thresholds=[(6, "orange"), (14.4, "red")],
        ),
        Row("Requests, errors, duration (per route)"),
        Panel(
            "Requests by route",
            "Requests per second by route template (never user ids).",
            "reqps",
            [Q(f"sum by (route) (rate(pfi_serve_requests_total{{{API}}}[{RI}]))", "{{route}}")],
            stack=True,
        ),
        Panel(
            "Errors by route",
            "Error responses per second by route and error code (4xx codes are the client's, 5xx ours).",
            "reqps",
            [
                Q(
                    f"sum by (route, code) (rate(pfi_serve_request_errors_total{{{API}}}[{RI}]))",
                    "{{route}} {{code}}",
                )
            ],
            stack=True,
        ),
        Panel(
            "5xx ratio by route",
            "Share of requests per route answered with a 5xx status.",
            "percentunit",
            [
                Q(
                    f'sum by (route) (rate(pfi_serve_requests_total{{{API}, status=~"5.."}}[{RI}]))'
                    f" / sum by (route) (rate(pfi_serve_requests_total{{{API}}}[{RI}]))",
                    "{{route}}",
                )
            ],
        ),
        Panel(
            "Latency by route (p50 / p95 / p99)",
            "Request duration by route template, from the moment the request reached the app.",
            "s",
            quantiles("pfi_serve_request_duration_seconds", API, "route", (0.5, 0.95, 0.99)),
        ),
        Panel(
            "Requests in flight",
            "Requests being handled right now, per route.",
            "short",
            [Q(f"sum by (route) (pfi_serve_requests_in_flight{{{API}}})", "{{route}}")],
            width=8,
        ),
        Panel(
            "Auth failures by reason",
            "Refused bearer tokens per second (missing, malformed, forged, expired).",
            "reqps",
            [Q(f"sum by (reason) (rate(pfi_serve_auth_failures_total{{{NS}}}[{RI}]))", "{{reason}}")],
            width=8,
        ),
        Panel(
            "Tokens per second",
            "Tokens generated, prompt tokens processed and tokens scored.",
            "suffix:tok/s",
            [
                Q(f"sum(rate(pfi_serve_tokens_generated_total{{{NS}}}[{RI}]))", "generated"),
                Q(f"sum(rate(pfi_serve_prompt_tokens_total{{{NS}}}[{RI}]))", "prompt"),
                Q(f"sum(rate(pfi_serve_scored_tokens_total{{{NS}}}[{RI}]))", "scored"),
            ],
            width=8,
        ),
        Row("Model thread"),
        Panel(
            "Queue wait (p50 / p99)",
            "Time a request waited for the model thread, by kind of work.",
            "s",
            quantiles("pfi_serve_queue_wait_seconds", NS, "kind", (0.5, 0.99)),
            width=8,
        ),
        Panel(
            "Batch model time (p50 / p99)",
            "Model time of one micro-batch, by kind of work.",
            "s",
            quantiles("pfi_serve_batch_duration_seconds", NS, "kind", (0.5, 0.99)),
            width=8,
        ),
        Panel(
            "Queue depth and batch rows",
            "Requests waiting for the model thread, and the mean rows per batch (batching across users).",
            "short",
            [
                Q(f"sum by (instance) (pfi_serve_queue_depth{{{NS}}})", "queued {{instance}}"),
                Q(
                    f"sum by (kind) (rate(pfi_serve_batch_rows_sum{{{NS}}}[{RI}]))"
                    f" / sum by (kind) (rate(pfi_serve_batch_rows_count{{{NS}}}[{RI}]))",
                    "rows per batch ({{kind}})",
                ),
            ],
            width=8,
        ),
        Row("Personal adapters"),
        Panel(
            "Adapter cache hit ratio",
            "Personal adapter lookups answered from the in-memory cache.",
            "percentunit",
            [
                Q(
                    f"sum(rate(pfi_serve_adapter_cache_hits_total{{{NS}}}[{RI}]))"
                    f" / (sum(rate(pfi_serve_adapter_cache_hits_total{{{NS}}}[{RI}]))"
                    f" + sum(rate(pfi_serve_adapter_cache_misses_total{{{NS}}}[{RI}])))",
                    "hit ratio",
                )
            ],
            width=8,
            minimum=0,
            maximum=1,
        ),
        Panel(
            "Adapter load latency (p50 / p99)",
            "Loading a personal adapter on a cache miss: Redis read, decode, validation. Failed loads "
            "surface as 503s on generate/score (alert PFIPersonalAdapterLoadFailures).",
            "s",
            quantiles("pfi_serve_adapter_load_duration_seconds", NS, "", (0.5, 0.99)),
            width=8,
        ),
        Panel(
            "Adapter cache memory",
            "Bytes of cached personal adapters against the budget (PFI_SERVE_CACHE_BYTES), per replica.",
            "bytes",
            [
                Q(f"sum by (instance) (pfi_serve_adapter_cache_bytes{{{NS}}})", "cached {{instance}}"),
                Q(f"max(pfi_serve_adapter_cache_budget_bytes{{{NS}}})", "budget"),
            ],
            width=8,
        ),
        Panel(
            "Cache evictions, uploads, invalidations",
            "Evictions by reason, uploads by outcome and invalidations by origin, per second.",
            "ops",
            [
                Q(
                    f"sum by (reason) (rate(pfi_serve_adapter_cache_evictions_total{{{NS}}}[{RI}]))",
                    "evicted: {{reason}}",
                ),
                Q(
                    f"sum by (outcome) (rate(pfi_serve_adapter_uploads_total{{{NS}}}[{RI}]))",
                    "upload: {{outcome}}",
                ),
                Q(
                    f"sum by (origin) (rate(pfi_serve_adapter_invalidations_total{{{NS}}}[{RI}]))",
                    "invalidated: {{origin}}",
                ),
            ],
            width=24,
        ),
        Row("Global adapter"),
        Panel(
            "Global version served",
            "Version served by default (oldest and newest replica) against the newest version the "
            "aggregators committed. Alert PFIServingVersionBehind when a replica trails for 15 min.",
            "none",
            [
                Q(
                    f"min by (federation) (pfi_serve_global_version{{{FED}}})",
                    "served, oldest replica {{federation}}",
                ),
                Q(
                    f"max by (federation) (pfi_serve_global_version{{{FED}}})",
                    "served, newest replica {{federation}}",
                ),
                Q(
                    f"max by (federation) (pfi_aggregator_global_version{{{FED}}})",
                    "committed {{federation}}",
                ),
            ],
        ),
        Panel(
            "Freshness: publication to first request served",
            "Seconds from a global version's publication to the first request served on it.",
            "s",
            quantiles(
                "pfi_serve_global_freshness_seconds",
                FED,
                "federation",
                (0.5, 0.9),
            ),
        ),
        Panel(
            "Hot-swap duration (p50 / p90)",
            "Building a merged base+global copy in the background until it serves.",
            "s",
            quantiles(
                "pfi_serve_global_swap_duration_seconds",
                FED,
                "federation",
                (0.5, 0.9),
            ),
            width=8,
        ),
        Panel(
            "Swaps and swap failures",
            "Atomic swaps to a new default version and failed merged-copy builds, per minute.",
            "opm",
            [
                Q(
                    f"sum by (federation) (rate(pfi_serve_global_swaps_total{{{FED}}}[{RI}])) * 60",
                    "swaps {{federation}}",
                ),
                Q(
                    f"sum by (federation) (rate(pfi_serve_global_swap_failures_total{{{FED}}}[{RI}])) * 60",
                    "failures {{federation}}",
                ),
            ],
            width=8,
        ),
        Panel(
            "Subscriber: time since last read",
            "Seconds since each replica's announcement subscriber last read Redis successfully.",
            "s",
            [Q(f"time() - pfi_serve_subscriber_last_success_timestamp_seconds{{{NS}}}", "{{instance}}")],
            width=8,
            thresholds=[(60, "orange"), (300, "red")],
        ),
    ]
    variables = [
        var_datasource(),
        var_query("namespace", "Namespace", "label_values(pfi_serve_requests_total, namespace)"),
        var_query("route", "Route", 'label_values(pfi_serve_requests_total{namespace=~"$namespace"}, route)'),
        var_query(
            "federation",
            "Federation",
            'label_values(pfi_serve_global_version{namespace=~"$namespace"}, federation)',
        ),
    ]
    return render(
        "pfi-serving",
        "PFI / Serving",
        "Personalization service: SLOs, RED per route, model thread, personal adapters, global version.",
        variables,
        items,
    )


# -- Edge fleet ---------------------------------------------------------------------------------------------

FLEET_REASONS = "signature_invalid|spec_mismatch|shape_mismatch|non_finite|norm_exceeded|too_stale|oversized"


def edge_fleet() -> dict[str, Any]:
    items: list[Item] = [
        Text(
            "About this dashboard",
            "Edge agents run on users' devices and expose no metrics. Everything here is what the "
            "aggregators observe of the fleet: updates published to Kafka, why some are refused, the "
            "training loss clients report with each update, how stale and how large updates are.",
        ),
        Row("Published"),
        Panel(
            "Updates published",
            "Complete updates (whole or reassembled from chunks) the aggregators received, per federation.",
            "ops",
            [
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_updates_received_total{{{FED}}}[{RI}]))",
                    "{{federation}}",
                )
            ],
            stack=True,
        ),
        Panel(
            "Kafka messages by kind",
            "Messages read from the updates topic: whole updates, chunks of large ones, unknown.",
            "ops",
            [Q(f"sum by (kind) (rate(pfi_aggregator_messages_received_total{{{NS}}}[{RI}]))", "{{kind}}")],
            stack=True,
        ),
        Panel(
            "Accepted share",
            "Share of received updates that passed validation.",
            "percentunit",
            [
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_updates_accepted_total{{{FED}}}[{RI}]))"
                    f" / sum by (federation) (rate(pfi_aggregator_updates_received_total{{{FED}}}[{RI}]))",
                    "{{federation}}",
                )
            ],
            minimum=0,
            maximum=1,
            width=8,
        ),
        Panel(
            "Update size (p50 / p99)",
            "Framed size of complete updates (all federations).",
            "bytes",
            quantiles("pfi_aggregator_update_size_bytes", NS, "", (0.5, 0.99)),
            width=8,
        ),
        Panel(
            "Clipped updates",
            "Updates whose norm the server clipped to the bound, per second.",
            "ops",
            [
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_updates_clipped_total{{{FED}}}[{RI}]))",
                    "{{federation}}",
                )
            ],
            width=8,
        ),
        Row("Failures"),
        Panel(
            "Failures by reason",
            "Rejected updates per second by reason code (all reasons).",
            "ops",
            [
                Q(
                    f"sum by (reason) (rate(pfi_aggregator_updates_rejected_total{{{FED}}}[{RI}]))",
                    "{{reason}}",
                )
            ],
            stack=True,
        ),
        Panel(
            "Client-side failures by federation",
            "Rejections caused by the clients themselves (wrong key or spec, bad tensors, too stale, too "
            "large): the signal of a bad client rollout.",
            "ops",
            [
                Q(
                    "sum by (federation, reason) (rate(pfi_aggregator_updates_rejected_total"
                    f'{{{FED}, reason=~"{FLEET_REASONS}"}}[{RI}]))',
                    "{{federation}} {{reason}}",
                )
            ],
        ),
        Row("Training"),
        Panel(
            "Reported training loss (p50 / p90)",
            "Loss after local training, as reported by clients with each accepted update. A falling "
            "median means the global adapter helps clients start from a better point.",
            "none",
            quantiles("pfi_aggregator_client_train_loss", FED, "federation", (0.5, 0.9)),
        ),
        Panel(
            "Reported training loss distribution",
            "Distribution of the loss clients report (all selected federations).",
            "none",
            [
                Q(
                    f"sum by (le) (increase(pfi_aggregator_client_train_loss_bucket{{{FED}}}[{RI}]))",
                    "{{le}}",
                    "heatmap",
                )
            ],
            kind="heatmap",
        ),
        Panel(
            "Mean reported loss",
            "Mean of the loss clients report, per federation.",
            "none",
            [
                Q(
                    f"sum by (federation) (rate(pfi_aggregator_client_train_loss_sum{{{FED}}}[{RI}]))"
                    f" / sum by (federation) (rate(pfi_aggregator_client_train_loss_count{{{FED}}}[{RI}]))",
                    "{{federation}}",
                )
            ],
        ),
        Panel(
            "Client staleness (p50 / p90)",
            "How many versions behind the latest clients trained (how often they refresh the global "
            "adapter).",
            "short",
            quantiles("pfi_aggregator_update_staleness", FED, "federation", (0.5, 0.9)),
        ),
    ]
    variables = [
        var_datasource(),
        var_query("namespace", "Namespace", "label_values(pfi_aggregator_assigned_partitions, namespace)"),
        var_query(
            "federation",
            "Federation",
            'label_values(pfi_aggregator_updates_received_total{namespace=~"$namespace"}, federation)',
        ),
    ]
    return render(
        "pfi-edge-fleet",
        "PFI / Edge fleet",
        "The fleet as the aggregators see it: updates published, failures, reported training loss.",
        variables,
        items,
    )


def build_all() -> dict[str, dict[str, Any]]:
    boards = [federation_overview(), serving(), edge_fleet()]
    return {board["uid"]: board for board in boards}
