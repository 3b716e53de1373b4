"""Prometheus metrics of the ingest route (``pfi_ingest_`` prefix; never client ids as labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 2 << 20, 4 << 20, 16 << 20, 64 << 20)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "pfi_ingest"
        self.requests = Counter(
            f"{ns}_requests_total",
            "Ingest requests by outcome (accepted, refused, throttled, unavailable) and reason",
            ["outcome", "reason"],
            registry=registry,
        )
        self.messages = Counter(
            f"{ns}_messages_total",
            "Messages produced to the updates topic, by kind (update, chunk)",
            ["kind"],
            registry=registry,
        )
        self.bytes = Histogram(
            f"{ns}_message_bytes",
            "Size of ingested message bodies, by outcome",
            ["outcome"],
            buckets=BYTES_BUCKETS,
            registry=registry,
        )
        self.produce_seconds = Histogram(
            f"{ns}_produce_seconds",
            "Time from accepted body to Kafka acknowledgement",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duplicates = Counter(
            f"{ns}_duplicates_total",
            "Messages already stored (a device's retry): answered with their first position, not produced",
            registry=registry,
        )
        self.in_flight = Gauge(f"{ns}_in_flight", "Ingest requests being handled", registry=registry)
