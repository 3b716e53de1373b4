"""Dashboard ``pfi-federation-overview`` as data: versions, updates by result, staleness, aggregation
latency, buffers, consumer lag, dead letters, aggregator health."""

from __future__ import annotations

from grafana import FED, NS, RI, Dashboard, Item, Panel, Q, Row, quantiles, var_datasource, var_query

ITEMS: list[Item] = [
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
        "Share of updates rejected to the dead-letter topic (recording rule). Alert: PFIDeadLetterRatioHigh.",
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
                f"sum by (federation) (rate(pfi_aggregator_versions_published_total{{{FED}}}[{RI}])) * 60",
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
        "Bytes of incomplete chunked uploads held, and bytes reserved for them (their whole sizes) of "
        "the process-wide bound PFI_MAX_INFLIGHT_CHUNK_BYTES.",
        "bytes",
        [
            Q(f"sum by (instance) (pfi_aggregator_chunk_bytes_in_flight_bytes{{{NS}}})", "held {{instance}}"),
            Q(
                f"sum by (instance) (pfi_aggregator_reassembly_reserved_bytes{{{NS}}})",
                "reserved {{instance}}",
            ),
        ],
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
    Panel(
        "Internal errors, poll failures, unloadable federations",
        "Per minute: messages whose handling failed unexpectedly (dead-lettered as internal_error), poll "
        "cycles that failed outside any one message (state dropped and replayed), and federations that "
        "exist but could not be loaded (their messages are dead-lettered meanwhile). Alerts "
        "PFIAggregatorInternalErrors and PFIAggregatorPollFailures.",
        "opm",
        [
            Q(
                f"sum by (instance) (rate(pfi_aggregator_internal_errors_total{{{NS}}}[{RI}])) * 60",
                "internal errors {{instance}}",
            ),
            Q(
                f"sum by (instance) (rate(pfi_aggregator_poll_failures_total{{{NS}}}[{RI}])) * 60",
                "poll failures {{instance}}",
            ),
            Q(
                f"sum by (federation) (rate(pfi_aggregator_federation_load_failures_total{{{FED}}}[{RI}]))"
                " * 60",
                "load failures {{federation}}",
            ),
        ],
    ),
    Panel(
        "Unreplicated versions",
        "Versions committed but not acknowledged by PFI_REDIS_WAIT_REPLICAS Redis replicas, per minute: "
        "they are served but not announced on Kafka, and a failover of the Redis primary could lose "
        "them. Alert PFIVersionsUnreplicated.",
        "opm",
        [
            Q(
                f"sum by (federation) (rate(pfi_aggregator_unreplicated_versions_total{{{FED}}}[{RI}])) * 60",
                "{{federation}}",
            )
        ],
    ),
    # Issue 15: hierarchical federations (leaves fold partials, one root per federation makes versions).
    Row("Hierarchical aggregation (partials)"),
    Panel(
        "Partials emitted and folded",
        "Per second: partial aggregates the leaves committed (Kafka transactions) and the roots folded. "
        "Emitted without folded: alert PFIPartialsStuck.",
        "ops",
        [
            Q(
                f"sum by (federation) (rate(pfi_hierarchy_partials_emitted_total{{{FED}}}[{RI}]))",
                "emitted {{federation}}",
            ),
            Q(
                f"sum by (federation) (rate(pfi_hierarchy_partials_folded_total{{{FED}}}[{RI}]))",
                "folded {{federation}}",
            ),
        ],
        width=8,
    ),
    Panel(
        "Partial lag",
        "From a leaf's commit of a partial to the root's fold (alert PFIPartialLagHigh above 60 s at p90).",
        "s",
        quantiles("pfi_hierarchy_partial_lag_seconds", NS, ""),
        width=8,
    ),
    Panel(
        "Updates per partial",
        "How many updates one partial carries (PFI_AGGREGATOR_PARTIAL_MAX_UPDATES at most).",
        "short",
        quantiles("pfi_hierarchy_partial_updates", NS, ""),
        width=8,
    ),
    Panel(
        "Root: updates waiting for the next version",
        "Updates folded by the root since its last version, per federation (a version at K).",
        "short",
        [Q(f"max by (federation) (pfi_hierarchy_root_pending_updates{{{FED}}})", "{{federation}}")],
        width=8,
    ),
    Panel(
        "Leaf transactions",
        "Per second, by outcome: a failed one is aborted and its partition replayed from the last commit.",
        "ops",
        [
            Q(
                f"sum by (outcome) (rate(pfi_hierarchy_leaf_transactions_total{{{NS}}}[{RI}]))",
                "{{outcome}}",
            )
        ],
        width=8,
    ),
    Panel(
        "Leaf rejections and refused partials",
        "Per minute: updates refused by the leaves, by reason (dead-lettered), and partials the roots "
        "refused (malformed, or repeating aggregated updates).",
        "opm",
        [
            Q(
                f"sum by (reason) (rate(pfi_hierarchy_leaf_rejected_total{{{FED}}}[{RI}])) * 60",
                "leaf {{reason}}",
            ),
            Q(
                f"sum by (reason) (rate(pfi_hierarchy_partials_refused_total{{{FED}}}[{RI}])) * 60",
                "root {{reason}}",
            ),
        ],
        width=8,
    ),
]

VARIABLES = [
    var_datasource(),
    var_query("namespace", "Namespace", "label_values(pfi_aggregator_assigned_partitions, namespace)"),
    var_query(
        "federation",
        "Federation",
        'label_values(pfi_aggregator_updates_received_total{namespace=~"$namespace"}, federation)',
    ),
]

DASHBOARD = Dashboard(
    "pfi-federation-overview",
    "PFI / Federation overview",
    "Aggregators: updates in, versions out, staleness, buffers, lag and dead letters.",
    VARIABLES,
    ITEMS,
)
