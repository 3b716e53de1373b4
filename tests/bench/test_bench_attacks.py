"""``pfi bench attacks --quick``: the short variant of the attack benchmark (issue 12, "Evidence").

Real ``pfi aggregator`` and ``pfi serve`` processes on the local stack (Kafka with SASL/SCRAM + ACLs,
Redis), devices enrolled through the enrollment route. Checks the structure of the result and the zero
counts (every attack refused, no version beyond the influence bound, no honest upload lost or counted
twice, no process exit), never timings: the serve RSS growth under the flood is a figure, not asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.attacks import command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

GROUPS = {"kafka", "identity", "ingest", "serving", "chunks", "ids", "weighting", "poison"}
NAMED = {
    "unauthenticated_producer",
    "wrong_sasl_password",
    "ingest_principal_reads_updates",
    "device_token_other_federation",
    "device_token_as_other_user",
    "device_token_admin_list_clients",
    "revoked_client_token",
    "token_garbage",
    "ingest_client_id_not_token",
    "ingest_bad_signature",
    "ingest_unsigned_chunk",
    "ingest_garbage_frame",
    "ingest_oversized_declared",
    "ingest_client_quota",
    "forged_chunks_into_kafka",
    "fake_large_uploads_into_kafka",
    "weight_inflation_2_53_samples",
    "one_client_fills_buffer",
    "update_with_1e20",
    "update_id_squatting",
    "half_created_and_unknown_federation",
    "unauthenticated_large_body_flood",
    "malformed_json_no_token_generate",
}


def test_attacks_quick(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFI_REDIS_URL", redis_url)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "attacks.json"
    args = parser.parse_args(["--quick", "--out", str(out), "--workdir", str(tmp_path / "logs")])
    result = command.run(args)

    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "attacks"
    rows = saved["attacks"]
    names = {r["name"] for r in rows}
    assert names >= NAMED, NAMED - names
    assert {r["group"] for r in rows} == GROUPS
    for row in rows:
        assert set(row) == {"name", "group", "expected", "observed", "ok"}
    assert [r["name"] for r in rows if not r["ok"]] == []
    ratios = saved["ratios"]
    assert ratios["attacks_tried"] == len(rows)
    assert ratios["attacks_not_refused"] == 0
    assert ratios["versions_beyond_bound"] == 0
    assert ratios["legit_uploads_lost"] == 0
    assert ratios["process_exits"] == 0
    assert isinstance(ratios["serve_rss_growth_mib"], float)
    audit = saved["audit"]
    assert audit["honest_sent"] > 10
    assert audit["aggregated"] == audit["honest_sent"]
    assert audit["lost"] == audit["double_counted"] == audit["refused"] == audit["not_in_seen_set"] == 0
    weighting = saved["weighting"]
    assert len(weighting["versions"]) == args.weight_rounds
    for version in weighting["versions"]:
        assert version["attacker_in_version"]
        assert version["shift_from_honest_only"] <= version["bound"] * (1 + 1e-4)
        assert version["undefended_shift"] > version["bound"]  # the check could fail
    flood = saved["flood"]
    assert flood["bodies"] == args.flood_bodies
    assert set(flood["statuses"]) <= {"401", "413", "reset"}
    assert sum(flood["statuses"].values()) == args.flood_bodies
    assert saved["unexpected_exits"] == {}
    assert not command.failed(result)
    assert "ratios:" in command.table(result)
