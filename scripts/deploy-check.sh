#!/usr/bin/env bash
# make deploy-check: the Kubernetes manifests, container build, alerts, dashboard and
# runbook in deploy/ are valid and in step with the code. See deploy/README.md
# ("make deploy-check") for what each step checks.
#
#   scripts/deploy-check.sh
#   SECD_BIN=path/to/secd SECCTL_BIN=path/to/secctl scripts/deploy-check.sh
#
# Installs what it needs: kubernetes-validate and checkov (pinned, PyPI) into a venv under
# ~/.cache (DEPLOY_CHECK_VENV), promtool from Debian's `prometheus` package. Needs kubectl
# (kustomize), python3 (3.11+), openssl and curl-free network access to PyPI/Debian only on
# the first run. secd/secctl: SECD_BIN / SECCTL_BIN, else the ones beside each other or in
# ${CARGO_TARGET_DIR:-target}/debug, built with `cargo build -p …` only when absent
# (DEPLOY_CHECK_NO_BUILD=1: never build; a missing secctl then skips, loudly, the runbook's
# secctl lines). Service binaries (<name>-svc) are used when beside secd or in
# target/debug (`make test` builds them); without them their runbook lines are skipped.
set -euo pipefail

# Keep a relative CARGO_TARGET_DIR meaning what it meant where we were invoked.
if [[ -n ${CARGO_TARGET_DIR:-} && ${CARGO_TARGET_DIR} != /* ]]; then
  export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi
for v in SECD_BIN SECCTL_BIN; do
  if [[ -n ${!v:-} && ${!v} != /* ]]; then export "$v=$PWD/${!v}"; fi
done
cd "$(dirname "$0")/.."
ROOT=$PWD
CARGO="${CARGO:-cargo}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="${DEPLOY_CHECK_VENV:-$HOME/.cache/sec-deploy-check/venv}"
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
# Kubernetes versions the manifests are validated against: the oldest we support and the
# newest kubernetes-validate knows.
K8S_VERSIONS=(1.30.0 1.37.0)
OUT="$TARGET/deploy-check"
mkdir -p "$OUT"

passed=()
pass() { passed+=("$1"); echo "ok: $1"; }
step() { echo; echo "== $1 =="; }
die() { echo "deploy-check: $*" >&2; exit 1; }

command -v kubectl >/dev/null || die "kubectl not found (it renders the overlays: kubectl kustomize)"
command -v python3 >/dev/null || die "python3 not found"
command -v openssl >/dev/null || die "openssl not found (throwaway TLS files for check-config)"

step "tools"
if [[ ! -x $VENV/bin/checkov || ! -x $VENV/bin/kubernetes-validate ]] \
  || [[ $("$VENV/bin/checkov" --version 2>/dev/null) != "$CHECKOV_VERSION" ]] \
  || [[ $("$VENV/bin/kubernetes-validate" --version 2>/dev/null) != "$KUBERNETES_VALIDATE_VERSION" ]]; then
  echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and checkov $CHECKOV_VERSION into $VENV"
  python3 -m venv "$VENV"
  timeout 900 "$VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "checkov==$CHECKOV_VERSION"
fi
if ! command -v promtool >/dev/null; then
  echo "installing promtool (Debian package prometheus)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d exit 101: the package must not start a Prometheus server here (only when
  # the machine has no policy of its own, which is then left alone).
  own_policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  timeout 600 $SUDO apt-get update -qq
  timeout 900 $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [[ -z $own_policy ]] || $SUDO rm -f /usr/sbin/policy-rc.d
fi
PY="$VENV/bin/python"
echo "kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p' | sed 's/^/(kustomize /;s/$/)/'), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), checkov $("$VENV/bin/checkov" --version), $(promtool --version 2>&1 | head -n1)"

step "generated manifests"
python3 deploy/k8s/generate.py --check
pass "deploy/k8s/generate.py --check: per-service manifests match the services' specs"

step "render"
for o in base overlays/dev overlays/prod; do
  name=${o##*/}
  kubectl kustomize "deploy/k8s/$o" >"$OUT/$name.yaml"
  echo "$o: $(grep -c '^kind:' "$OUT/$name.yaml") objects -> $OUT/$name.yaml"
done
pass "kubectl kustomize renders base, overlays/dev, overlays/prod"

step "schemas (kubernetes-validate --strict)"
for v in "${K8S_VERSIONS[@]}"; do
  for name in base dev prod; do
    log="$OUT/validate-$name-$v.log"
    if ! timeout 300 "$VENV/bin/kubernetes-validate" --strict -k "$v" "$OUT/$name.yaml" >"$log" 2>&1; then
      grep -v '^INFO' "$log" >&2
      die "$name does not validate against Kubernetes $v"
    fi
    # Only custom resources may lack a schema (checked by promtool and manifests.py).
    if grep '^WARN' "$log" | grep -v -E 'kind (Certificate|Issuer) with api version cert-manager.io/v1|kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1' >&2; then
      die "$name: unexpected warnings from kubernetes-validate"
    fi
    echo "$name @ $v: $(grep -c '^INFO.*passed' "$log") objects valid, $(grep -c '^WARN' "$log") custom resources without a schema"
  done
done
pass "kubernetes-validate --strict: base, dev, prod valid against Kubernetes ${K8S_VERSIONS[*]}"

step "checkov"
ck="$OUT/checkov"
rm -rf "$ck" && mkdir -p "$ck"
cp "$OUT/dev.yaml" "$OUT/prod.yaml" "$ck/"
# --skip-download: no Prisma Cloud calls; the built-in policies only.
if ! timeout 600 "$VENV/bin/checkov" -d "$ck" --framework kubernetes --skip-download --compact --quiet >"$OUT/checkov-k8s.txt" 2>&1; then
  cat "$OUT/checkov-k8s.txt" >&2
  die "checkov found failing checks in the rendered overlays"
fi
grep -E '^(Passed|Failed)' "$OUT/checkov-k8s.txt" | sed 's/^/kubernetes (dev + prod): /'
"$PY" - "$ck" <<'PY'
import glob, sys, yaml
# Every skip is an annotation with a reason, in the manifest.
bad = []
for f in glob.glob(sys.argv[1] + "/*.yaml"):
    for d in yaml.safe_load_all(open(f)):
        for k, v in ((d or {}).get("metadata", {}).get("annotations") or {}).items():
            if k.startswith("checkov.io/skip"):
                check, _, reason = v.partition("=")
                if not check.startswith("CKV") or len(reason.strip()) < 20:
                    bad.append(f"{d['kind']}/{d['metadata']['name']}: {k}: {v}")
if bad:
    sys.exit("checkov skips without a written reason:\n  " + "\n  ".join(bad))
PY
if ! timeout 300 "$VENV/bin/checkov" -f Dockerfile --framework dockerfile --skip-download --compact --quiet >"$OUT/checkov-docker.txt" 2>&1; then
  cat "$OUT/checkov-docker.txt" >&2
  die "checkov found failing checks in the Dockerfile"
fi
grep -E '^(Passed|Failed)' "$OUT/checkov-docker.txt" | sed 's/^/Dockerfile: /'
pass "checkov: 0 failed checks (rendered dev + prod, Dockerfile); skips only by annotation with a reason"

step "alert rules (promtool)"
"$PY" - "$OUT/prod.yaml" "$OUT/rules.yaml" <<'PY'
import sys, yaml
rules = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
assert len(rules) == 1, f"expected one PrometheusRule, found {len(rules)}"
yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
PY
timeout 60 promtool check rules "$OUT/rules.yaml"
pass "promtool check rules: $(grep -c -- '- alert:' "$OUT/rules.yaml") alerts"

step "binaries"
if [[ -z ${SECD_BIN:-} ]]; then
  SECD_BIN="$TARGET/debug/secd"
  if [[ ! -x $SECD_BIN ]]; then
    [[ ${DEPLOY_CHECK_NO_BUILD:-} == 1 ]] && die "no $SECD_BIN and DEPLOY_CHECK_NO_BUILD=1: set SECD_BIN"
    echo "building secd (cargo build -p secd)"
    "$CARGO" build -q -p secd
  fi
fi
[[ -x $SECD_BIN ]] || die "SECD_BIN=$SECD_BIN is not an executable"
BINDIR=$(dirname "$SECD_BIN")
if [[ -z ${SECCTL_BIN:-} ]]; then
  if [[ -x $BINDIR/secctl ]]; then
    SECCTL_BIN="$BINDIR/secctl"
  else
    SECCTL_BIN="$TARGET/debug/secctl"
    if [[ ! -x $SECCTL_BIN && ${DEPLOY_CHECK_NO_BUILD:-} == 1 ]]; then
      SECCTL_BIN=""
    elif [[ ! -x $SECCTL_BIN ]]; then
      echo "building secctl (cargo build -p secctl)"
      "$CARGO" build -q -p secctl
    fi
  fi
fi
[[ -z $SECCTL_BIN || -x $SECCTL_BIN ]] || die "SECCTL_BIN=$SECCTL_BIN is not an executable"
echo "secd: $SECD_BIN"
echo "secctl: ${SECCTL_BIN:-*** none (DEPLOY_CHECK_NO_BUILD=1)}"

step "manifests: services, Pod Security, identities, secrets, check-config"
timeout 300 "$PY" deploy/check/manifests.py --secd "$SECD_BIN" prod="$OUT/prod.yaml" dev="$OUT/dev.yaml"
pass "every service has its Deployment; restricted Pod Security Standard; mTLS identities; configurations pass check-config"

step "metrics: alerts and dashboard against a running secd dev"
timeout 180 "$PY" deploy/check/metrics.py "$SECD_BIN" "$OUT/prod.yaml" "$OUT/dev.yaml" \
  deploy/k8s/base/observability/grafana-dashboard.json
pass "every metric in the alerts and the dashboard is served by secd dev"

step "runbook: command lines parse with the real CLIs"
bins=("secd=$SECD_BIN")
allow=""
if [[ -n $SECCTL_BIN ]]; then bins+=("secctl=$SECCTL_BIN"); else allow="secctl"; fi
for s in $(sed -n 's/^\s*&\([a-z]*\)_svc::SPEC,/\1/p' crates/secd/src/lib.rs); do
  b="$BINDIR/$s-svc"
  [[ -x $b ]] || b="$TARGET/debug/$s-svc"
  if [[ -x $b ]]; then bins+=("$s-svc=$b"); else allow+=" $s-svc"; fi
done
ALLOW_MISSING="$allow" "$PY" deploy/check/runbook.py deploy/README.md "${bins[@]}" | tee "$OUT/runbook.txt"
if grep -q 'SKIPPED' "$OUT/runbook.txt"; then
  pass "deploy/README.md: the command lines of the binaries at hand parse ($(grep -c SKIPPED "$OUT/runbook.txt") program(s) *** SKIPPED, see above)"
else
  pass "deploy/README.md: every secd/secctl/<svc> command line parses"
fi

echo
echo "deploy-check passed:"
printf '  - %s\n' "${passed[@]}"
