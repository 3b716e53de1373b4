"""Static checks of the alerting rules: the PrometheusRule equals the plain rules file, every alert
issue 7 asks for exists, carries severity and help, and has a promtool unit test that makes it fire
and one that keeps it silent. (``promtool check rules`` / ``promtool test rules`` run in
``make ops-check``; a real Prometheus evaluates the rules in test_prometheus_live.py.)"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.ops.promql import K8S, RULE_TESTS, RULES_FILE, alert_names, load_rules

REQUIRED_ALERTS = {
    "PFIAggregatorStalled",  # updates arriving, no new version
    "PFIDeadLetterRatioHigh",
    "PFIUpdateStalenessHigh",  # staleness p90
    "PFIConsumerLagGrowing",
    "PFIServingErrorBudgetFastBurn",  # multi-window multi-burn-rate, errors
    "PFIServingErrorBudgetSlowBurn",
    "PFIServingLatencyBudgetFastBurn",  # ... and latency
    "PFIServingLatencyBudgetSlowBurn",
    "PFIServingVersionBehind",
    "PFIPersonalAdapterLoadFailures",
    # issue 12: untrusted edge devices
    "PFIVersionsUnreplicated",
    "PFIAggregatorInternalErrors",
    "PFIAggregatorPollFailures",
    "PFIIngestAuthRefusalBurst",
    # issue 16: a new global version makes most reporting clients worse
    "PFIGlobalVersionHarmsClients",
}


def test_prometheus_rule_carries_exactly_the_rules_file() -> None:
    plain = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    resource = yaml.safe_load((K8S / "base" / "app" / "prometheusrule.yaml").read_text(encoding="utf-8"))
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == plain["groups"], "regenerate: .venv/bin/python scripts/ops/opsgen.py"


def test_the_overlays_deploy_the_rules(overlays: dict[str, list[dict[str, Any]]]) -> None:
    plain = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    for name, docs in overlays.items():
        rules = [d for d in docs if d["kind"] == "PrometheusRule"]
        assert len(rules) == 1, name
        assert rules[0]["spec"]["groups"] == plain["groups"], name


def test_required_alerts_exist_with_severity_help_and_a_for_clause() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), "alert names must be unique"
    assert set(names) >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - set(names)}"
    for rule in load_rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]
        assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


def test_recording_rules_follow_the_naming_convention() -> None:
    for rule in load_rules():
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:pfi_[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_every_alert_has_a_firing_and_a_silent_promtool_test() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert [str((path.parent / f).resolve()) for f in doc["rule_files"]] == [str(RULES_FILE)], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = set(alert_names())
    assert names <= firing, f"alerts without a test that makes them fire: {sorted(names - firing)}"
    assert names <= silent, f"alerts without a test that keeps them silent: {sorted(names - silent)}"
