"""Prometheus metrics of the aggregator (registry injected; ``pfi_aggregator_`` prefix, base units)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SIZE_BUCKETS = tuple(float(2**k) for k in range(10, 28, 2))  # 1 KiB .. 128 MiB
LOSS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 15, 20)


@dataclass(frozen=True)
class FederationMetrics:
    """The labelled children one accepted update touches, looked up once per federation."""

    received: Any
    accepted: Any
    version: Any
    staleness: Any
    train_loss: Any
    buffered: Any
    capacity: Any


class AggregatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "pfi_aggregator"
        self._federations: dict[str, FederationMetrics] = {}
        self.messages_received = Counter(
            f"{ns}_messages_received_total",
            "Kafka messages read from the updates topic",
            ["kind"],
            registry=registry,
        )
        self.updates_received = Counter(
            f"{ns}_updates_received_total",
            "Complete updates (whole or reassembled) seen",
            ["federation"],
            registry=registry,
        )
        self.updates_accepted = Counter(
            f"{ns}_updates_accepted_total",
            "Updates that passed validation into the buffer",
            ["federation"],
            registry=registry,
        )
        self.updates_rejected = Counter(
            f"{ns}_updates_rejected_total",
            "Messages rejected (dead-lettered) by reason",
            ["federation", "reason"],
            registry=registry,
        )
        self.updates_aggregated = Counter(
            f"{ns}_updates_aggregated_total",
            "Updates merged into a committed version",
            ["federation"],
            registry=registry,
        )
        self.updates_clipped = Counter(
            f"{ns}_updates_clipped_total",
            "Updates whose norm was clipped to the bound",
            ["federation"],
            registry=registry,
        )
        self.replayed_skipped = Counter(
            f"{ns}_replayed_messages_skipped_total",
            "Messages skipped on replay (already durable)",
            [],
            registry=registry,
        )
        self.hierarchical_skipped = Counter(
            f"{ns}_hierarchical_messages_skipped_total",
            "Messages keyed federation/client (a hierarchical federation's): its leaves own them",
            [],
            registry=registry,
        )
        self.staleness = Histogram(
            f"{ns}_update_staleness",
            "Staleness (versions behind) of accepted updates",
            ["federation"],
            buckets=STALENESS_BUCKETS,
            registry=registry,
        )
        self.client_train_loss = Histogram(
            f"{ns}_client_train_loss",
            "Training loss after local steps, as reported by clients (accepted updates that carry one)",
            ["federation"],
            buckets=LOSS_BUCKETS,
            registry=registry,
        )
        self.update_bytes = Histogram(
            f"{ns}_update_size_bytes",
            "Framed size of complete updates",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.buffer_updates = Gauge(
            f"{ns}_buffer_updates", "Updates buffered for the next version", ["federation"], registry=registry
        )
        self.buffer_capacity = Gauge(
            f"{ns}_buffer_capacity_updates",
            "Buffer size K of the federation",
            ["federation"],
            registry=registry,
        )
        self.inflight_uploads = Gauge(
            f"{ns}_chunked_uploads_in_flight",
            "Incomplete chunked uploads held for reassembly",
            registry=registry,
        )
        self.inflight_chunk_bytes = Gauge(
            f"{ns}_chunk_bytes_in_flight_bytes", "Bytes of incomplete chunked uploads", registry=registry
        )
        self.decode_seconds = Histogram(
            f"{ns}_validation_duration_seconds", "Decode + validate time of one update", registry=registry
        )
        self.aggregation_seconds = Histogram(
            f"{ns}_aggregation_duration_seconds",
            "Merge + commit time of one version",
            ["federation"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.versions_published = Counter(
            f"{ns}_versions_published_total", "Global versions committed", ["federation"], registry=registry
        )
        self.global_version = Gauge(
            f"{ns}_global_version",
            "Latest global version this aggregator knows",
            ["federation"],
            registry=registry,
        )
        self.last_version_ts = Gauge(
            f"{ns}_last_version_timestamp_seconds",
            "Unix time of the last committed version",
            ["federation"],
            registry=registry,
        )
        self.last_success_ts = Gauge(
            f"{ns}_last_success_timestamp_seconds",
            "Unix time of the last successful poll cycle",
            registry=registry,
        )
        self.commit_conflicts = Counter(
            f"{ns}_commit_conflicts_total",
            "Version commits refused by fencing (reload + replay)",
            ["federation"],
            registry=registry,
        )
        self.flush_failures = Counter(
            f"{ns}_flush_failures_total",
            "Version commits that failed internally (state dropped and replayed)",
            ["federation"],
            registry=registry,
        )
        self.store_outages = Counter(
            f"{ns}_store_outages_total",
            "Redis failures that made the aggregator drop its in-memory state and replay",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            f"{ns}_consumer_lag_messages",
            "High watermark minus position, per assigned partition",
            ["partition"],
            registry=registry,
        )
        self.assigned_partitions = Gauge(
            f"{ns}_assigned_partitions",
            "Partitions of the updates topic owned by this instance",
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{ns}_updates_in_flight", "Updates being decoded/validated right now", registry=registry
        )
        self.reassembly_reserved = Gauge(
            f"{ns}_reassembly_reserved_bytes",
            "Bytes reserved by incomplete chunked uploads (whole sizes), of the process-wide bound",
            registry=registry,
        )
        self.federations_unavailable = Counter(
            f"{ns}_federation_load_failures_total",
            "Federations that exist but could not be loaded (their messages are dead-lettered meanwhile)",
            ["federation"],
            registry=registry,
        )
        self.internal_errors = Counter(
            f"{ns}_internal_errors_total",
            "Messages whose handling failed unexpectedly (dead-lettered as internal_error)",
            registry=registry,
        )
        self.poll_failures = Counter(
            f"{ns}_poll_failures_total",
            "Poll cycles that failed outside any one message (state dropped and replayed)",
            registry=registry,
        )
        self.unreplicated_versions = Counter(
            f"{ns}_unreplicated_versions_total",
            "Versions committed but not acknowledged by PFI_REDIS_WAIT_REPLICAS replicas (not announced)",
            ["federation"],
            registry=registry,
        )
        self.dp_epsilon = Gauge(
            f"{ns}_dp_epsilon",
            "Privacy budget spent by server-side DP noise (at dp_delta)",
            ["federation"],
            registry=registry,
        )

    def of(self, federation: str) -> FederationMetrics:
        """Per-update hot path: the federation's children without a ``labels()`` lookup each time."""
        found = self._federations.get(federation)
        if found is None:
            if len(self._federations) > 10_000:
                self._federations.clear()
            found = self._federations[federation] = FederationMetrics(
                received=self.updates_received.labels(federation),
                accepted=self.updates_accepted.labels(federation),
                version=self.global_version.labels(federation),
                staleness=self.staleness.labels(federation),
                train_loss=self.client_train_loss.labels(federation),
                buffered=self.buffer_updates.labels(federation),
                capacity=self.buffer_capacity.labels(federation),
            )
        return found
