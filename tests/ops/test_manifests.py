"""Policy checks on the rendered Kubernetes overlays (``kustomize build k8s/overlays/{dev,prod}``).

Schema validity is kubeconform's job (``make ops-check``); these tests check what a schema cannot:
the restricted security context, probes, resources, grace periods against the services' shutdown
timeouts, KafkaTopics equal to what the services create locally, KEDA within the partition count,
NetworkPolicies covering every pod, secrets only referenced, and environment variables the settings
really read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from services.settings import AggregatorSettings, PFISettings, ServeSettings
from services.stack.topics import topic_specs
from tests.ops.promql import K8S, OVERLAYS, ROOT

Overlays = dict[str, list[dict[str, Any]]]
APP_NAMESPACE = "pfi"
PFI_WORKLOADS = {"pfi-aggregator", "pfi-personalization"}


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    maps = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("pfi-config")]
    assert len(maps) == 1, "one pfi-config ConfigMap per overlay"
    data: dict[str, str] = maps[0]["data"]
    return data


def env_of(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's environment: ConfigMap values overridden by explicit env entries."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(named(docs, "ConfigMap", name)["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, overlays: Overlays) -> tuple[str, list[dict[str, Any]]]:
    return request.param, overlays[request.param]


def test_every_pod_runs_restricted(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    problems = []
    for wl in workloads(docs):
        where = f"{name}: {wl['kind']} {wl['metadata']['name']}"
        pod = wl["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{where}: uses host namespaces")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            csc = c.get("securityContext", {})
            cw = f"{where} / {c['name']}"
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation is not false")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem is not true")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                problems.append(f"{cw}: capabilities do not drop ALL")
            if csc.get("capabilities", {}).get("add"):
                problems.append(f"{cw}: adds capabilities")
            if csc.get("privileged"):
                problems.append(f"{cw}: privileged")
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(c.get("resources", {}).get(kind, {}))
                if missing:
                    problems.append(f"{cw}: no {kind} for {sorted(missing)}")
            image = c["image"]
            if image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
                problems.append(f"{cw}: image {image!r} is not pinned to a tag or digest")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{cw}: no emptyDir on /tmp (the root filesystem is read-only)")
    assert not problems, "\n".join(problems)


def test_probes_readiness_checks_dependencies_liveness_does_not(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    for wl_name in PFI_WORKLOADS:
        c = named(docs, "Deployment", wl_name)["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"] for p in c["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, f"{name}: {wl_name} has no {probe}"
            assert c[probe]["httpGet"]["port"] in ports, f"{name}: {wl_name} {probe} names an unknown port"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def uvicorn_graceful_shutdown_s() -> float:
    source = (ROOT / "services" / "personalization" / "commands.py").read_text(encoding="utf-8")
    match = re.search(r"timeout_graceful_shutdown\s*=\s*([\d.]+)", source)
    assert match, "services/personalization/commands.py: timeout_graceful_shutdown not found"
    return float(match.group(1))


def test_grace_periods_exceed_the_services_shutdown_timeouts(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    agg = named(docs, "Deployment", "pfi-aggregator")["spec"]["template"]["spec"]
    env = env_of(agg["containers"][0], docs)
    shutdown = float(env.get("PFI_AGGREGATOR_SHUTDOWN_TIMEOUT_S", AggregatorSettings().shutdown_timeout_s))
    assert agg["terminationGracePeriodSeconds"] > shutdown + 5, (
        f"{name}: aggregator grace {agg['terminationGracePeriodSeconds']}s <= shutdown {shutdown}s + margin"
    )
    serve = named(docs, "Deployment", "pfi-personalization")["spec"]["template"]["spec"]
    pre_stop = (
        serve["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    )
    needed = pre_stop + uvicorn_graceful_shutdown_s()
    assert serve["terminationGracePeriodSeconds"] > needed, (
        f"{name}: personalization grace {serve['terminationGracePeriodSeconds']}s <= preStop + uvicorn "
        f"graceful shutdown ({needed}s)"
    )


def settings_of(docs: list[dict[str, Any]]) -> PFISettings:
    data = config(docs)
    fields = {k.removeprefix("PFI_").lower(): v for k, v in data.items() if k.startswith("PFI_")}
    return PFISettings(**{k: v for k, v in fields.items() if k in PFISettings.model_fields})


def test_kafka_topics_match_what_the_services_create(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    settings = settings_of(docs)
    topics = {t["spec"]["topicName"]: t for t in of_kind(docs, "KafkaTopic")}
    specs = {s.name: s for s in topic_specs(settings)}
    assert set(topics) == set(specs), f"{name}: KafkaTopics {sorted(topics)} != topics {sorted(specs)}"
    for topic_name, spec in specs.items():
        topic = topics[topic_name]
        assert topic["apiVersion"] == "kafka.strimzi.io/v1", "Strimzi's v1 API (Strimzi 0.49+)"
        assert topic["metadata"]["namespace"] == "kafka"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "pfi"
        assert topic["spec"]["partitions"] == spec.partitions, f"{name}: {topic_name} partitions"
        cfg = {k: str(v) for k, v in topic["spec"]["config"].items()}
        expected = {k: v for k, v in spec.configs.items() if k != "min.insync.replicas"}
        assert {k: cfg.get(k) for k in expected} == expected, f"{name}: {topic_name} configs differ"
        replicas, min_isr = topic["spec"]["replicas"], int(cfg["min.insync.replicas"])
        assert min_isr <= replicas, f"{name}: {topic_name}: min.insync.replicas above replicas"
        assert replicas == 1 or min_isr < replicas, (
            f"{name}: {topic_name}: min.insync.replicas {min_isr} with {replicas} replicas blocks writes on "
            "the first broker outage"
        )


def test_keda_scales_aggregators_within_the_partition_count(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    data = config(docs)
    settings = settings_of(docs)
    scaled = named(docs, "ScaledObject", "pfi-aggregator")["spec"]
    partitions = {t["spec"]["topicName"]: t["spec"]["partitions"] for t in of_kind(docs, "KafkaTopic")}
    assert scaled["scaleTargetRef"]["name"] == "pfi-aggregator"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= partitions[settings.updates_topic], (
        f"{name}: KEDA may run {scaled['maxReplicaCount']} aggregators for "
        f"{partitions[settings.updates_topic]} partitions"
    )
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == settings.updates_topic
    assert trigger["metadata"]["consumerGroup"] == data["PFI_AGGREGATOR_GROUP_ID"]
    assert trigger["metadata"]["bootstrapServers"] == data["PFI_KAFKA_BOOTSTRAP_SERVERS"]
    assert int(data["PFI_UPDATE_PARTITIONS"]) == partitions[settings.updates_topic]


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    hpa = named(docs, "HorizontalPodAutoscaler", "pfi-personalization")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "pfi-personalization",
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    for wl_name in PFI_WORKLOADS:
        assert "replicas" not in named(docs, "Deployment", wl_name)["spec"], (
            f"{name}: {wl_name} sets replicas"
        )


def test_disruption_budgets_cover_the_services(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    covered = {
        p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for p in of_kind(docs, "PodDisruptionBudget")
    }
    assert covered >= PFI_WORKLOADS, f"{name}: PDBs cover {covered}"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert "maxUnavailable" in pdb["spec"], "maxUnavailable keeps single replicas drainable"


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {
        wl["metadata"]["name"]: wl["spec"]["template"]["metadata"]["labels"]
        for wl in workloads(docs)
        if wl["metadata"].get("namespace") == APP_NAMESPACE
    }


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
    return True


def test_network_policies_default_deny_and_cover_every_pod(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    policies = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == APP_NAMESPACE]
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, f"{name}: no default-deny NetworkPolicy in {APP_NAMESPACE}"
    for wl_name, labels in pod_labels(docs).items():
        own = [
            p
            for p in policies
            if p["spec"]["podSelector"] != {} and selects(p["spec"]["podSelector"], labels)
        ]
        assert own, f"{name}: no NetworkPolicy allows the flows of {wl_name}"
    ports = {
        "pfi-aggregator": 9108,
        "pfi-personalization": 8080,
    }
    for wl_name, port in ports.items():
        policy = named(docs, "NetworkPolicy", wl_name)["spec"]
        allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        assert port in allowed, f"{name}: {wl_name} does not admit Prometheus on {port}"
        egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
        assert {9093, 6379} <= egress_ports, f"{name}: {wl_name} cannot reach Kafka (TLS) and Redis"


def test_pod_monitors_scrape_both_services(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for wl_name in PFI_WORKLOADS:
        monitor = named(docs, "PodMonitor", wl_name)["spec"]
        c = named(docs, "Deployment", wl_name)["spec"]["template"]["spec"]["containers"][0]
        (endpoint,) = monitor["podMetricsEndpoints"]
        assert endpoint["port"] in {p["name"] for p in c["ports"]}
        assert endpoint["path"] == "/metrics"
        assert monitor["jobLabel"] == "app.kubernetes.io/name", "the rules expect job=<app name>"


def test_secrets_are_referenced_never_committed(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    assert not of_kind(docs, "Secret"), f"{name}: a Secret would put secret values into git"
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    for wl in workloads(docs):
        for c in wl["spec"]["template"]["spec"]["containers"]:
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in readme, f"k8s/README.md does not explain Secret {ref['name']}"
                elif re.search(r"SECRET|KEY|PASSWORD|TOKEN", entry["name"]):
                    pytest.fail(f"{name}: {entry['name']} has a literal value")
    for key, value in config(docs).items():
        assert not re.search(r"SECRET|PASSWORD|TOKEN|MASTER_KEY", key), f"{name}: {key} in a ConfigMap"
        assert not re.search(r"://[^/@]*:[^/@]*@", value), f"{name}: {key} carries credentials"


def known_env() -> set[str]:
    names = set()
    for model, prefix in (
        (PFISettings, "PFI_"),
        (AggregatorSettings, "PFI_AGGREGATOR_"),
        (ServeSettings, "PFI_SERVE_"),
    ):
        names |= {prefix + f.upper() for f in model.model_fields}
    return names


def test_environment_variables_are_ones_the_settings_read(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    known = known_env()
    for wl_name in PFI_WORKLOADS:
        env = env_of(named(docs, "Deployment", wl_name)["spec"]["template"]["spec"]["containers"][0], docs)
        unknown = {k for k in env if k.startswith("PFI_") and k not in known}
        assert not unknown, f"{name}: {wl_name} sets variables no settings model reads: {sorted(unknown)}"
        for var in ("PFI_KAFKA_BOOTSTRAP_SERVERS", "PFI_REDIS_URL"):
            assert var in env, f"{name}: {wl_name} lacks {var}: it would use the local stack's address"
        host = env.get("PFI_AGGREGATOR_HOST" if wl_name == "pfi-aggregator" else "PFI_SERVE_HOST")
        assert host == "0.0.0.0", f"{name}: {wl_name} must listen on all interfaces for probes"


def test_namespace_enforces_the_restricted_pod_security_standard(overlays: Overlays) -> None:
    for name, docs in overlays.items():
        ns = named(docs, "Namespace", APP_NAMESPACE)
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted", name
