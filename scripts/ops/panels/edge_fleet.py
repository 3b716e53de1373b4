"""Dashboard ``pfi-edge-fleet`` as data: what the services see of the fleet (edge agents expose no
metrics): uploads the HTTPS ingest accepts or refuses, updates published, failures by reason, reported
training loss, staleness, update sizes."""

from __future__ import annotations

from grafana import FED, NS, RI, Dashboard, Item, Panel, Q, Row, Text, quantiles, var_datasource, var_query

FLEET_REASONS = "signature_invalid|spec_mismatch|shape_mismatch|non_finite|norm_exceeded|too_stale|oversized"

ITEMS: list[Item] = [
    Text(
        "About this dashboard",
        "Edge agents run on users' devices and expose no metrics. Everything here is what the "
        "services observe of the fleet: uploads the HTTPS ingest accepts or refuses, updates published "
        "to Kafka, why some are refused, the training loss clients report with each update, how stale "
        "and how large updates are.",
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
    Row("HTTPS ingest (devices' uploads, before Kafka)"),
    Panel(
        "Ingest requests by outcome",
        "Device uploads per second: accepted (produced to Kafka), refused (4xx), throttled (429: per-client "
        "quotas; 409: the same message is being stored by another request) and unavailable (503: Kafka or "
        "the client registry). Retries of a message already stored are accepted without a second copy "
        "(the dashed line); a high share means devices lose acknowledgements.",
        "reqps",
        [
            Q(f"sum by (outcome) (rate(pfi_ingest_requests_total{{{NS}}}[{RI}]))", "{{outcome}}"),
            Q(f"sum(rate(pfi_ingest_duplicates_total{{{NS}}}[{RI}]))", "retries answered (not stored again)"),
        ],
        stack=True,
        width=8,
    ),
    Panel(
        "Ingest refusals by reason",
        "Uploads not accepted, per second, by outcome and reason. A spike of bad_signature, unsigned, "
        "unknown_client or wrong_client means a client rollout with the wrong key or an attack (alert "
        "PFIIngestAuthRefusalBurst); quota reasons mean clients upload faster than their quota.",
        "reqps",
        [
            Q(
                "sum by (outcome, reason) (rate(pfi_ingest_requests_total"
                f'{{{NS}, outcome!="accepted"}}[{RI}]))',
                "{{outcome}}: {{reason}}",
            )
        ],
        stack=True,
        width=8,
    ),
    Panel(
        "Ingest produce latency (p50 / p99)",
        "From an accepted body to the Kafka acknowledgement.",
        "s",
        quantiles("pfi_ingest_produce_seconds", NS, "", (0.5, 0.99)),
        width=8,
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
        "How many versions behind the latest clients trained (how often they refresh the global adapter).",
        "short",
        quantiles("pfi_aggregator_update_staleness", FED, "federation", (0.5, 0.9)),
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
    "pfi-edge-fleet",
    "PFI / Edge fleet",
    "The fleet as the services see it: ingest uploads, updates published, failures, reported training loss.",
    VARIABLES,
    ITEMS,
)
