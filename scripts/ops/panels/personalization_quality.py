"""Dashboard ``pfi-personalization-quality`` as data (issue 16): what clients report about their own
held-out loss with each update: how much their personal adapter helps (gain distribution), the share it
harms, how new global versions move clients' loss and the share they make worse (alert
PFIGlobalVersionHarmsClients). Client-reported numbers, monitoring only (services/aggregator/quality.py)."""

from __future__ import annotations

from grafana import FED, NS, RI, Dashboard, Item, Panel, Q, Row, Text, quantiles, var_datasource, var_query

GAIN = "pfi_aggregator_personalization_gain_ratio"
CHANGE = "pfi_aggregator_global_loss_change_ratio"

ITEMS: list[Item] = [
    Text(
        "About this dashboard",
        "Edge agents report, with each update, their loss on a sample of their own held-out text under the "
        "global version they trained from, with their personal adapter added, and under the global they "
        "had before. Numbers only; the aggregator never weighs updates by them. Shares count each recent "
        "client once (its latest report, last hour, up to 256 clients per aggregator), so one client "
        "flooding reports moves them by one client at most; an enrolled client can still lie about its "
        "own numbers. Gain > 0: the personal adapter lowers the loss; change > 0: the new global raised it.",
        height=4,
    ),
    Row("Personalization"),
    Panel(
        "Personalization gain distribution",
        "Relative loss reduction by the personal adapter, (global - personal) / global, of the reports "
        "received (clamped to +-100 %). Mass below 0 means personal adapters that hurt their users.",
        "percentunit",
        [Q(f"sum by (le) (increase({GAIN}_bucket{{{FED}}}[{RI}]))", "{{le}}", "heatmap")],
        kind="heatmap",
    ),
    Panel(
        "Personalization gain (p10 / p50 / p90)",
        "Quantiles of the reported gain per federation: the median user's gain and the tails.",
        "percentunit",
        quantiles(GAIN, FED, "federation", (0.1, 0.5, 0.9)),
    ),
    Panel(
        "Share of clients harmed by personalization",
        "Of the recent reporting clients (each once), the share whose personal adapter raised their "
        "held-out loss by more than 1 %. A gated agent can set its gate to 0, so this should stay near 0.",
        "percentunit",
        [Q(f"federation:pfi_aggregator_personalization_harmed:ratio{{{FED}}}", "{{federation}}")],
        minimum=0,
        maximum=1,
        thresholds=[(0.2, "orange"), (0.5, "red")],
    ),
    Panel(
        "Reporting clients (window)",
        "Distinct recent clients behind the shares (each counted once): personalization reports, and "
        "reports that judge a new global against the previous one (the alert needs at least 5).",
        "short",
        [
            Q(
                f"federation:pfi_aggregator_personalization_reporting_clients:sum{{{FED}}}",
                "personalization {{federation}}",
            ),
            Q(
                f"federation:pfi_aggregator_global_change_reporting_clients:sum{{{FED}}}",
                "global change {{federation}}",
            ),
        ],
        minimum=0,
    ),
    Row("Global versions"),
    Panel(
        "Global-regression share: clients made worse by the new global",
        "Of the recent clients that moved to a newer global (each once), the share whose held-out loss it "
        "raised by more than 1 % over their previous global. Above 50 % with 5+ clients for 15 minutes: "
        "alert PFIGlobalVersionHarmsClients.",
        "percentunit",
        [Q(f"federation:pfi_aggregator_global_regressed:ratio{{{FED}}}", "{{federation}}")],
        minimum=0,
        maximum=1,
        thresholds=[(0.3, "orange"), (0.5, "red")],
    ),
    Panel(
        "Loss change under the new global (distribution)",
        "Relative change of clients' held-out loss from their previous global to the new one, "
        "(new - previous) / previous, of the reports received (clamped to +-100 %). Mass above 0: worse.",
        "percentunit",
        [Q(f"sum by (le) (increase({CHANGE}_bucket{{{FED}}}[{RI}]))", "{{le}}", "heatmap")],
        kind="heatmap",
    ),
    Panel(
        "Loss change under the new global (p10 / p50 / p90)",
        "Quantiles of the reported change per federation; a median above 0 means the typical client got "
        "worse.",
        "percentunit",
        quantiles(CHANGE, FED, "federation", (0.1, 0.5, 0.9)),
        width=8,
    ),
    Panel(
        "Global version",
        "Newest global version committed, per federation: line a regression up with the version behind it "
        "(`pfi federation rollback FED --to N`).",
        "none",
        [Q(f"max by (federation) (pfi_aggregator_global_version{{{FED}}})", "{{federation}}")],
        width=8,
    ),
    Panel(
        "Quality reports by outcome",
        "Reports of accepted updates per second: used, absent (older agents), invalid (malformed or absurd: "
        "ignored, the update is still aggregated), repeat (a client's report on a version it already "
        "judged), error (a bug: see the aggregator logs).",
        "ops",
        [
            Q(
                f"sum by (outcome) (rate(pfi_aggregator_quality_reports_total{{{FED}}}[{RI}]))",
                "{{outcome}}",
            )
        ],
        stack=True,
        width=8,
    ),
]

VARIABLES = [
    var_datasource(),
    var_query("namespace", "Namespace", "label_values(pfi_aggregator_assigned_partitions, namespace)"),
    var_query(
        "federation",
        "Federation",
        f"label_values(pfi_aggregator_quality_reports_total{{{NS}}}, federation)",
    ),
]

DASHBOARD = Dashboard(
    "pfi-personalization-quality",
    "PFI / Personalization quality",
    "Client-reported personalization gain, harmed share and global-version regressions per federation.",
    VARIABLES,
    ITEMS,
)
