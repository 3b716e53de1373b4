"""Prometheus metrics of the hierarchy's leaves and roots (registry injected; no update ids as labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UPDATE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class HierarchyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # leaf
        self.leaf_updates = Counter(
            "pfi_hierarchy_leaf_updates_total",
            "Updates validated and folded into partials",
            ["federation"],
            registry=registry,
        )
        self.leaf_rejected = Counter(
            "pfi_hierarchy_leaf_rejected_total",
            "Update messages refused by a leaf",
            ["federation", "reason"],
            registry=registry,
        )
        self.partials_emitted = Counter(
            "pfi_hierarchy_partials_emitted_total",
            "Partials committed to the partials topic",
            ["federation"],
            registry=registry,
        )
        self.partial_updates = Histogram(
            "pfi_hierarchy_partial_updates",
            "Updates per emitted partial",
            buckets=UPDATE_BUCKETS,
            registry=registry,
        )
        self.partial_bytes = Histogram(
            "pfi_hierarchy_partial_bytes",
            "Encoded size of an emitted partial",
            buckets=tuple(float(4**i) for i in range(5, 14)),
            registry=registry,
        )
        self.transactions = Counter(
            "pfi_hierarchy_leaf_transactions_total",
            "Leaf Kafka transactions by outcome",
            ["outcome"],
            registry=registry,
        )
        self.leaf_last_commit = Gauge(
            "pfi_hierarchy_leaf_last_commit_timestamp_seconds",
            "When the leaf last committed a transaction",
            registry=registry,
        )
        self.foreign_skipped = Counter(
            "pfi_hierarchy_leaf_foreign_messages_total",
            "Update messages keyed by federation only (single-topology federations): not a leaf's",
            registry=registry,
        )
        # root
        self.partials_folded = Counter(
            "pfi_hierarchy_partials_folded_total",
            "Partials folded by the root",
            ["federation"],
            registry=registry,
        )
        self.partials_refused = Counter(
            "pfi_hierarchy_partials_refused_total",
            "Partials the root refused",
            ["federation", "reason"],
            registry=registry,
        )
        self.partial_lag = Histogram(
            "pfi_hierarchy_partial_lag_seconds",
            "From a partial's emission by a leaf to its fold by the root",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.root_pending = Gauge(
            "pfi_hierarchy_root_pending_updates",
            "Updates folded, waiting for the next version",
            ["federation"],
            registry=registry,
        )
        self.root_versions = Counter(
            "pfi_hierarchy_root_versions_total",
            "Versions the root committed",
            ["federation"],
            registry=registry,
        )
        self.root_updates = Counter(
            "pfi_hierarchy_root_updates_aggregated_total",
            "Updates in versions the root committed",
            ["federation"],
            registry=registry,
        )
        self.root_stale_dropped = Counter(
            "pfi_hierarchy_root_updates_too_stale_total",
            "Updates of partials whose base version left the lineage before their version",
            ["federation"],
            registry=registry,
        )
        self.root_last_fold = Gauge(
            "pfi_hierarchy_root_last_fold_timestamp_seconds",
            "When the root last folded a partial",
            registry=registry,
        )
        self.assigned = Gauge(
            "pfi_hierarchy_assigned_partitions", "Partitions this leaf or root owns", registry=registry
        )
        self.failures = Counter(
            "pfi_hierarchy_poll_failures_total", "Poll cycles that failed and replayed", registry=registry
        )
