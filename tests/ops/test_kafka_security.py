"""Kafka security of the rendered overlays: TLS + SCRAM on every listener, ACL authorization, KafkaUsers
whose ACLs mirror the local stack's (services/stack/acls.py), and each Deployment authenticating as its
own principals over SASL_SSL with the cluster CA."""

from __future__ import annotations

from typing import Any

import pytest

from services.settings import PFISettings
from services.stack import acls
from tests.ops.promql import OVERLAYS
from tests.ops.test_manifests import env_of, named, of_kind

Overlays = dict[str, list[dict[str, Any]]]

#: Local principal -> KafkaUser of the same role.
USERS = {"User:aggregator": "pfi-aggregator", "User:ingest": "pfi-ingest", "User:serving": "pfi-serving"}
OPERATIONS = {acls.OP_READ: "Read", acls.OP_WRITE: "Write"}
RESOURCE = {
    acls.RESOURCE_TOPIC: "topic",
    acls.RESOURCE_GROUP: "group",
    acls.RESOURCE_TRANSACTIONAL_ID: "transactionalId",
}
PATTERN = {acls.PATTERN_LITERAL: "literal", acls.PATTERN_PREFIXED: "prefix"}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, overlays: Overlays) -> tuple[str, list[dict[str, Any]]]:
    return request.param, overlays[request.param]


def _grants(user: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """(resource type, name, pattern, operation) of a KafkaUser, Describe left out (Read/Write imply it)."""
    out = set()
    for acl in user["spec"]["authorization"]["acls"]:
        res = acl["resource"]
        assert acl.get("type", "allow") == "allow"
        for op in acl["operations"]:
            if op != "Describe":
                out.add((res["type"], res["name"], res.get("patternType", "literal"), op))
    return out


def test_every_listener_uses_tls_and_scram_and_acls_decide(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    (kafka,) = of_kind(docs, "Kafka")
    spec = kafka["spec"]["kafka"]
    for listener in spec["listeners"]:
        assert listener["tls"] is True, f"{name}: listener {listener['name']} without TLS"
        assert listener["authentication"]["type"] == "scram-sha-512", f"{name}: {listener['name']}"
    assert spec["authorization"]["type"] == "simple"
    assert not spec["authorization"].get("superUsers"), "no PFI principal is a super user"
    assert spec["config"].get("allow.everyone.if.no.acl.found", False) in (False, "false")
    assert kafka["spec"]["entityOperator"]["userOperator"]["watchedNamespace"] == "pfi"


def test_kafka_users_mirror_the_local_acls(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    users = {u["metadata"]["name"]: u for u in of_kind(docs, "KafkaUser")}
    assert set(users) == {*USERS.values(), "pfi-keda"}, name
    prefix = env_of(
        named(docs, "Deployment", "pfi-aggregator")["spec"]["template"]["spec"]["containers"][0], docs
    )
    settings = PFISettings(topic_prefix=prefix["PFI_TOPIC_PREFIX"])
    expected: dict[str, set[tuple[str, str, str, str]]] = {u: set() for u in USERS.values()}
    for rule in acls.group_acls() + acls.topic_acls(settings):
        expected[USERS[rule.principal]].add(
            (
                RESOURCE[rule.resource_type],
                rule.resource_name,
                PATTERN[rule.pattern_type],
                OPERATIONS[rule.operation],
            )
        )
    for user_name, grants in expected.items():
        user = users[user_name]
        assert user["metadata"]["namespace"] == "pfi"
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == "pfi"
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert _grants(user) == grants, f"{name}: {user_name}"
    assert {op for acl in users["pfi-keda"]["spec"]["authorization"]["acls"] for op in acl["operations"]} == {
        "Describe"
    }


def test_deployments_authenticate_as_their_principals(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    wanted = {"pfi-aggregator": {"SASL": "pfi-aggregator"}, "pfi-personalization": {
        "SERVING": "pfi-serving", "INGEST": "pfi-ingest"}}  # fmt: skip
    for wl_name, principals in wanted.items():
        pod = named(docs, "Deployment", wl_name)["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0], docs)
        assert env["PFI_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL", f"{name}: {wl_name}"
        assert env["PFI_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        for key, user in principals.items():
            assert env[f"PFI_KAFKA_{key}_USERNAME"] == user
            assert env[f"PFI_KAFKA_{key}_PASSWORD"]["secretKeyRef"] == {"name": user, "key": "password"}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        secrets = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
        assert secrets["kafka-ca"] == "pfi-cluster-ca-cert"
        assert env["PFI_KAFKA_SSL_CAFILE"].startswith(mounts["kafka-ca"] + "/")
    (trigger,) = named(docs, "ScaledObject", "pfi-aggregator")["spec"]["triggers"]
    auth = named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
    params = {r["parameter"] for r in auth["secretTargetRef"] + auth["configMapTargetRef"]}
    assert {"sasl", "tls", "username", "password", "ca"} <= params
