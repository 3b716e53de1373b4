#!/usr/bin/env bash
# `make ops-check`: every offline validation of the deployment, alerting and dashboards.
#
#   1. kustomize build of each overlay (k8s/overlays/dev, k8s/overlays/prod)
#   2. kubeconform -strict on every rendered resource: Kubernetes schemas of the oldest supported and
#      a current version, plus the Strimzi (KafkaTopic v1), KEDA and prometheus-operator CRD schemas
#   3. promtool check rules + promtool test rules (one unit test per alert)
#   4. generated files in sync with their sources (PrometheusRule, dashboards: scripts/ops/opsgen.py)
#   5. hadolint on the Dockerfile, shellcheck on these scripts
#   6. the offline pytest checks: manifests policy, dashboards, alerts (tests/ops, no services needed)
#
# Tools come from scripts/ops/install.sh (cached outside the checkout; the first run downloads,
# later runs are offline). Every step runs; the summary lists what failed. Exit status 1 on failure.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || { echo "ops-check: $PYTHON not found (run make setup)" >&2; exit 1; }

env_lines="$(bash scripts/ops/install.sh --env)" || { echo "ops-check: tool installation failed" >&2; exit 1; }
eval "$env_lines"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
started=$SECONDS

step() {  # name command...
    local name="$1"
    shift
    printf '\n== %s\n' "$name"
    if "$@"; then
        printf -- '-- ok: %s\n' "$name"
    else
        printf -- '-- FAILED: %s\n' "$name"
        failed+=("$name")
    fi
}

build_overlays() {
    local ok=0 overlay
    for overlay in k8s/overlays/*/; do
        overlay="${overlay%/}"
        if "$KUSTOMIZE" build "$overlay" >"$work/$(basename "$overlay").yaml" 2>"$work/kustomize.err"; then
            echo "$overlay: $(grep -c '^kind:' "$work/$(basename "$overlay").yaml") resources"
        else
            echo "$overlay: kustomize build failed:"
            cat "$work/kustomize.err"
            ok=1
        fi
    done
    return $ok
}

validate_schemas() {
    local ok=0 schemas rendered
    for schemas in $K8S_SCHEMAS; do
        for rendered in "$work"/*.yaml; do
            echo "${rendered##*/} against ${schemas##*/} + CRDs:"
            "$KUBECONFORM" -strict -summary -output text \
                -schema-location "$schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
                -schema-location "$CRD_SCHEMAS/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json" \
                "$rendered" || ok=1
        done
    done
    return $ok
}

step "kustomize build (dev, prod)" build_overlays
step "kubeconform (Kubernetes + Strimzi/KEDA/prometheus-operator CRD schemas)" validate_schemas
step "promtool check rules" "$PROMTOOL" check rules k8s/prometheus/pfi.rules.yaml
step "promtool test rules" "$PROMTOOL" test rules k8s/prometheus/tests/*.yaml
step "generated files up to date (opsgen --check)" "$PYTHON" scripts/ops/opsgen.py --check
step "hadolint Dockerfile" "$HADOLINT" Dockerfile
step "shellcheck scripts/ops" "$SHELLCHECK" scripts/ops/*.sh
step "pytest: manifests, dashboards, alerts (offline)" "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/ops/test_manifests.py tests/ops/test_kafka_security.py tests/ops/test_dashboards.py tests/ops/test_alerts.py

echo
if ((${#failed[@]})); then
    echo "ops-check: FAILED after $((SECONDS - started))s:"
    printf '  - %s\n' "${failed[@]}"
    exit 1
fi
echo "ops-check: all checks passed in $((SECONDS - started))s"
