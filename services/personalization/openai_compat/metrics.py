"""Metrics of the OpenAI-compatible routes (on the service's registry; request counts, latencies and
errors per route come from the service's own per-route middleware like every other route)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.personalization.metrics import LATENCY_BUCKETS


class OpenAIMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "pfi_serve_openai"
        self.streams = Counter(
            f"{ns}_streams_total",
            "streamed completions by outcome (completed, cancelled: the client went away, error, timeout)",
            ["outcome"],
            registry=registry,
        )
        self.stream_tokens = Counter(
            f"{ns}_stream_tokens_total",
            "tokens generated for streamed completions, counted on the model thread as they are chosen",
            registry=registry,
        )
        self.first_token = Histogram(
            f"{ns}_time_to_first_token_seconds",
            "streamed completions: request start to the first token leaving the model thread",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
