"""Dashboard ``pfi-serving`` as data: SLO burn, RED per route, model queue and batches, personal
adapter cache and loads, global version served and its freshness."""

from __future__ import annotations

from grafana import FED, NS, RI, Dashboard, Item, Panel, Q, Row, quantiles, var_datasource, var_query

API = f'{NS}, route=~"$route"'

ITEMS: list[Item] = [
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
    Panel(
        "Refused at the gate: 413 and 429",
        "Per second: bodies refused with 413 before authentication (declared: Content-Length over the "
        "limit; streamed: counted while reading) and requests refused with 429 (queue_full: the model "
        "queue bound; user_limit: one user's share of it).",
        "reqps",
        [
            Q(f"sum by (reason) (rate(pfi_serve_body_rejections_total{{{NS}}}[{RI}]))", "413 {{reason}}"),
            Q(f"sum by (reason) (rate(pfi_serve_overload_rejections_total{{{NS}}}[{RI}]))", "429 {{reason}}"),
        ],
        stack=True,
    ),
    Panel(
        "Request body bytes read",
        "Bytes of request bodies read from clients past the body-size and authentication gate, per replica.",
        "Bps",
        [Q(f"sum by (instance) (rate(pfi_serve_request_body_bytes_total{{{NS}}}[{RI}]))", "{{instance}}")],
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
    Row("Private retrieval (users' documents)"),
    Panel(
        "Retrieval latency (p50 / p99)",
        "One retrieval from a user's documents by mode: generation check in Redis, index build on a "
        "cache miss, query embedding (MiniLM), search.",
        "s",
        quantiles("pfi_serve_retrieval_duration_seconds", NS, "mode", (0.5, 0.99)),
        width=12,
    ),
    Panel(
        "Documents and chunks stored, index builds",
        "Documents added / deleted and chunks embedded per second; index builds (cache misses) per "
        "second; bytes of in-memory indexes per replica on the right axis.",
        "ops",
        [
            Q(f"sum by (op) (rate(pfi_serve_documents_total{{{NS}}}[{RI}]))", "documents {{op}}"),
            Q(f"sum(rate(pfi_serve_document_chunks_total{{{NS}}}[{RI}]))", "chunks embedded"),
            Q(
                f"sum(rate(pfi_serve_retrieval_index_build_duration_seconds_count{{{NS}}}[{RI}]))",
                "index builds",
            ),
        ],
        width=12,
    ),
    Row("OpenAI-compatible API (/v1/completions, /v1/chat/completions)"),
    Panel(
        "Streams by outcome",
        "Streamed completions per second: completed, cancelled (the client went away: generation "
        "stops), error, timeout. Requests and errors of these routes are in the per-route panels above.",
        "reqps",
        [Q(f"sum by (outcome) (rate(pfi_serve_openai_streams_total{{{NS}}}[{RI}]))", "{{outcome}}")],
        stack=True,
        width=8,
    ),
    Panel(
        "Time to first token (p50 / p99)",
        "Streamed completions: request start to the first token leaving the model thread (queue wait "
        "+ prompt).",
        "s",
        quantiles("pfi_serve_openai_time_to_first_token_seconds", NS, "", (0.5, 0.99)),
        width=8,
    ),
    Panel(
        "Streamed tokens",
        "Tokens per second generated for streamed completions, counted on the model thread.",
        "none",
        [Q(f"sum(rate(pfi_serve_openai_stream_tokens_total{{{NS}}}[{RI}]))", "tokens/s")],
        width=8,
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

VARIABLES = [
    var_datasource(),
    var_query("namespace", "Namespace", "label_values(pfi_serve_requests_total, namespace)"),
    var_query("route", "Route", 'label_values(pfi_serve_requests_total{namespace=~"$namespace"}, route)'),
    var_query(
        "federation",
        "Federation",
        'label_values(pfi_serve_global_version{namespace=~"$namespace"}, federation)',
    ),
]

DASHBOARD = Dashboard(
    "pfi-serving",
    "PFI / Serving",
    "Personalization service: SLOs, RED per route, model thread, personal adapters, global version.",
    VARIABLES,
    ITEMS,
)
