"""Prometheus metrics of the personalization service (registry injected; ``pfi_serve_`` prefix, base
units). Labels never carry user ids: routes are the route templates, federations are names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SWAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "pfi_serve"
        self.registry = registry
        # -- RED per route ------------------------------------------------------------------------
        self.requests = Counter(
            f"{ns}_requests_total",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_errors = Counter(
            f"{ns}_request_errors_total",
            "HTTP requests answered with an error, by route and error code",
            ["route", "method", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            f"{ns}_request_duration_seconds",
            "HTTP request latency by route template",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{ns}_requests_in_flight", "HTTP requests being handled", ["route"], registry=registry
        )
        self.auth_failures = Counter(
            f"{ns}_auth_failures_total", "Refused credentials by reason", ["reason"], registry=registry
        )
        self.body_bytes = Counter(
            f"{ns}_request_body_bytes_total",
            "Request body bytes read from clients (past the body-size and authentication gate)",
            registry=registry,
        )
        self.body_rejections = Counter(
            f"{ns}_body_rejections_total",
            "Bodies refused with 413 by the gate: declared (Content-Length) or streamed (counted)",
            ["reason"],
            registry=registry,
        )
        self.overload_rejections = Counter(
            f"{ns}_overload_rejections_total",
            "Requests refused with 429: queue_full (model queue bound) or user_limit (per-user bound)",
            ["reason"],
            registry=registry,
        )
        # -- model work -----------------------------------------------------------------------------
        self.tokens_generated = Counter(
            f"{ns}_tokens_generated_total", "Tokens generated", ["federation"], registry=registry
        )
        self.prompt_tokens = Counter(
            f"{ns}_prompt_tokens_total",
            "Prompt tokens processed by generate",
            ["federation"],
            registry=registry,
        )
        self.scored_tokens = Counter(
            f"{ns}_scored_tokens_total",
            "Tokens scored (predicted positions)",
            ["federation"],
            registry=registry,
        )
        self.batch_rows = Histogram(
            f"{ns}_batch_rows",
            "Rows per model batch (micro-batching across requests)",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            f"{ns}_batch_requests",
            "Requests per model batch",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_adapters = Histogram(
            f"{ns}_batch_personal_adapters",
            "Distinct personal adapters per model batch",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            f"{ns}_batch_duration_seconds",
            "Model time of one batch",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            f"{ns}_queue_wait_seconds",
            "Time a request waited for the model thread",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            f"{ns}_queue_depth", "Requests waiting for the model thread", registry=registry
        )
        self.slot_binds = Counter(
            f"{ns}_adapter_slot_binds_total",
            "Personal adapters bound to a PEFT adapter slot of a merged model (slot misses)",
            registry=registry,
        )
        # -- personal adapter cache -------------------------------------------------------------------
        self.cache_hits = Counter(
            f"{ns}_adapter_cache_hits_total", "Personal adapter cache hits", registry=registry
        )
        self.cache_misses = Counter(
            f"{ns}_adapter_cache_misses_total",
            "Personal adapter cache misses (Redis lookups)",
            registry=registry,
        )
        self.cache_evictions = Counter(
            f"{ns}_adapter_cache_evictions_total",
            "Personal adapters dropped from the cache, by reason",
            ["reason"],
            registry=registry,
        )
        self.cache_bytes = Gauge(
            f"{ns}_adapter_cache_bytes", "Bytes of cached personal adapters", registry=registry
        )
        self.cache_entries = Gauge(
            f"{ns}_adapter_cache_entries", "Cached personal adapters", registry=registry
        )
        self.cache_budget = Gauge(
            f"{ns}_adapter_cache_budget_bytes", "Byte budget of the personal adapter cache", registry=registry
        )
        self.adapter_load_seconds = Histogram(
            f"{ns}_adapter_load_duration_seconds",
            "Loading a personal adapter on a cache miss (Redis read, decode, validation)",
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.adapter_uploads = Counter(
            f"{ns}_adapter_uploads_total",
            "Personal adapter uploads by outcome",
            ["outcome"],
            registry=registry,
        )
        self.adapter_deletes = Counter(
            f"{ns}_adapter_deletes_total", "Personal adapters erased", registry=registry
        )
        self.invalidations = Counter(
            f"{ns}_adapter_invalidations_total",
            "Cache invalidations applied, by origin (this replica or another one via Redis)",
            ["origin"],
            registry=registry,
        )
        # -- global adapter --------------------------------------------------------------------------
        self.global_version = Gauge(
            f"{ns}_global_version",
            "Global adapter version served by default",
            ["federation"],
            registry=registry,
        )
        self.swap_seconds = Histogram(
            f"{ns}_global_swap_duration_seconds",
            "Building a merged base+global copy (background) until it serves",
            ["federation"],
            buckets=SWAP_BUCKETS,
            registry=registry,
        )
        self.swaps = Counter(
            f"{ns}_global_swaps_total",
            "Atomic swaps to a new default global version",
            ["federation"],
            registry=registry,
        )
        self.swap_failures = Counter(
            f"{ns}_global_swap_failures_total", "Failed merged-copy builds", ["federation"], registry=registry
        )
        self.freshness = Histogram(
            f"{ns}_global_freshness_seconds",
            "Seconds from a global version's publication to the first request served on it",
            ["federation"],
            buckets=FRESHNESS_BUCKETS,
            registry=registry,
        )
        self.last_freshness = Gauge(
            f"{ns}_global_last_freshness_seconds",
            "Freshness of the most recently first-served global version",
            ["federation"],
            registry=registry,
        )
        self.stale_global_copies = Counter(
            f"{ns}_global_stale_copies_total",
            "Merged copies dropped because their version's content (digest) changed under the same number",
            ["federation"],
            registry=registry,
        )
        self.merged_copies = Gauge(
            f"{ns}_merged_copies", "Merged base+global copies in memory", ["federation"], registry=registry
        )
        self.announcements = Counter(
            f"{ns}_announcements_total",
            "Stream entries read by the subscriber, by kind",
            ["kind"],
            registry=registry,
        )
        self.subscriber_errors = Counter(
            f"{ns}_subscriber_errors_total", "Subscriber read failures (reconnects)", registry=registry
        )
        self.subscriber_last_read = Gauge(
            f"{ns}_subscriber_last_success_timestamp_seconds",
            "Unix time of the subscriber's last successful read",
            registry=registry,
        )
