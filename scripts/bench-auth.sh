#!/usr/bin/env bash
# The client-credentials grant at the facade (auth-svc in a release `secd dev`) against
# panva/node-oidc-provider (npm, in-memory, ES256 JWT access tokens through resource
# indicators, one client_secret_basic client), in the same run, with the same wrk load on
# loopback. Prints both throughputs, p50/p99 and the ratio; writes target/bench/auth.json.
#
# Targets (issue 17): auth-svc ≥ 3× oidc-provider's throughput, p99 < 10 ms.
#
#   scripts/bench-auth.sh                       # -t2 -c32 -d20s each
#   BENCH_AUTH_ARGS="-t2 -c16 -d10s" scripts/bench-auth.sh
#   SECD_BIN=path/to/secd scripts/bench-auth.sh   # a prebuilt secd instead of building
#
# Needs: cargo, node + npm, wrk (tests/interop/oidc/ensure-chromium.sh installs it), curl,
# python3. The first run builds secd in release mode (minutes on 2 cores) and installs
# oidc-provider under target/node-oidc. Everything it starts is stopped on exit (trap);
# each wrk run is bounded by its -d, each start by a deadline.
set -euo pipefail

# Keep a relative CARGO_TARGET_DIR meaning what it meant where we were invoked.
if [[ -n ${CARGO_TARGET_DIR:-} && ${CARGO_TARGET_DIR} != /* ]]; then
  export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
CARGO="${CARGO:-cargo}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$TARGET/bench"
NODE_DIR="$TARGET/node-oidc"
WRK_ARGS="${BENCH_AUTH_ARGS:--t2 -c32 -d20s}"
mkdir -p "$OUT"

for tool in wrk node npm curl python3; do
  command -v "$tool" >/dev/null || { echo "bench-auth: $tool not found" >&2; exit 1; }
done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Polls $1 (a command) until it succeeds, for at most $2 seconds.
wait_for() {
  local deadline=$((SECONDS + $2))
  until eval "$1" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "bench-auth: timed out waiting for: $1" >&2
      return 1
    fi
    sleep 0.2
  done
}

if [ -n "${SECD_BIN:-}" ]; then
  SECD=$SECD_BIN # a prebuilt binary (figures only mean something for a release build)
else
  echo "== build: secd (release) =="
  "$CARGO" build --release -q -p secd
  SECD="$TARGET/release/secd"
fi

if [ ! -d "$NODE_DIR/node_modules/oidc-provider" ]; then
  echo "== npm: oidc-provider =="
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" oidc-provider@9
fi

cat >"$WORK/cc.lua" <<'LUA'
-- POST the client-credentials grant with HTTP Basic client authentication (RFC 6749 §4.4).
wrk.method = "POST"
wrk.body = "grant_type=client_credentials"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic " .. os.getenv("BENCH_BASIC")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"rps":%.1f,"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"non_2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

# One grant by curl first: it must succeed and give an ES256 JWT access token.
check_grant() {
  local url=$1 basic=$2 who=$3
  local body
  body=$(curl -sS --max-time 10 -X POST "$url" -H "Authorization: Basic $basic" \
    -H 'Content-Type: application/x-www-form-urlencoded' --data 'grant_type=client_credentials')
  python3 - "$who" "$body" <<'PY'
import base64, json, sys
who, body = sys.argv[1], sys.argv[2]
tok = json.loads(body).get("access_token")
if not tok:
    sys.exit(f"{who}: no access token: {body[:300]}")
head = json.loads(base64.urlsafe_b64decode(tok.split(".")[0] + "=="))
print(f"{who}: access token is a JWT, alg {head.get('alg')}")
if head.get("alg") != "ES256":
    sys.exit(f"{who}: expected an ES256 JWT")
PY
}

# Runs wrk against $1 with Basic $2; the JSON line goes to $3.
run_wrk() {
  local url=$1 basic=$2 out=$3
  # shellcheck disable=SC2086 # WRK_ARGS is a list of flags
  BENCH_BASIC=$basic wrk $WRK_ARGS --timeout 5s -s "$WORK/cc.lua" "$url" | tee "$WORK/wrk.txt"
  grep '^JSON ' "$WORK/wrk.txt" | sed 's/^JSON //' >"$out"
}

echo "== auth-svc: secd dev ($SECD, embedded storage, temp data dir) =="
PORT=$(free_port)
ISSUER="http://127.0.0.1:$PORT"
env_args=(
  "SEC_FACADE__HTTP_ADDR=127.0.0.1:$PORT"
  "SEC_OAUTH__ISSUER=$ISSUER"
  "SEC_TOKEN__ISSUER=$ISSUER"
  "SEC_TELEMETRY__LOG_LEVEL=warn"
)
for s in audit crypto token session auth gdpr assess; do
  S=${s^^}
  env_args+=("SEC_SERVICES__${S}__GRPC_ADDR=127.0.0.1:0" "SEC_SERVICES__${S}__ADMIN_ADDR=127.0.0.1:0")
done
env "${env_args[@]}" "$SECD" dev --data-dir "$WORK/secd" >"$WORK/secd.log" 2>&1 &
PIDS+=($!)
wait_for "curl -sf $ISSUER/.well-known/openid-configuration" 60 || { cat "$WORK/secd.log" >&2; exit 1; }
ADMIN_TOKEN=$(cat "$WORK/secd/admin.token")
# RFC 7591 registration, with the admin token as the initial access token.
reg=$(curl -sS --max-time 10 -X POST "$ISSUER/register" -H "Authorization: Bearer $ADMIN_TOKEN" \
  -H 'Content-Type: application/json' \
  -d '{"client_name":"bench","grant_types":["client_credentials"],"token_endpoint_auth_method":"client_secret_basic"}')
read -r CID CSECRET < <(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["client_id"], d["client_secret"])' "$reg") \
  || { echo "bench-auth: registration failed: $reg" >&2; exit 1; }
SEC_BASIC=$(printf '%s:%s' "$CID" "$CSECRET" | base64 -w0)
check_grant "$ISSUER/token" "$SEC_BASIC" auth-svc
run_wrk "$ISSUER/token" "$SEC_BASIC" "$OUT/auth-svc.json"
kill "${PIDS[-1]}" && wait "${PIDS[-1]}" 2>/dev/null || true

echo "== oidc-provider (node $(node --version), in-memory, ES256 JWT access tokens) =="
OIDC_NODE_DIR="$NODE_DIR" OIDC_OP_KEEP=1 NODE_ENV=production \
  node tests/interop/oidc/oidc_provider.mjs bench </dev/null >"$WORK/op.out" 2>"$WORK/op.err" &
PIDS+=($!)
wait_for "test -s $WORK/op.out" 30 || { cat "$WORK/op.err" >&2; exit 1; }
read -r OP_ISSUER OP_BASIC < <(python3 -c 'import base64, json, sys
d = json.loads(open(sys.argv[1]).readline())
print(d["issuer"], base64.b64encode((d["client_id"] + ":" + d["client_secret"]).encode()).decode())' "$WORK/op.out")
check_grant "$OP_ISSUER/token" "$OP_BASIC" oidc-provider
run_wrk "$OP_ISSUER/token" "$OP_BASIC" "$OUT/oidc-provider.json"

echo "== result =="
python3 - "$OUT/auth-svc.json" "$OUT/oidc-provider.json" "$OUT/auth.json" "$WRK_ARGS" <<'PY'
import json, os, sys
a, o = (json.load(open(p)) for p in sys.argv[1:3])
ratio = a["rps"] / o["rps"] if o["rps"] else float("inf")
ok_ratio, ok_p99 = ratio >= 3.0, a["p99_ms"] < 10.0
out = {
    "scenario": "client_credentials grant, client_secret_basic, ES256 JWT access token",
    "wrk": sys.argv[4], "cores": os.cpu_count(),
    "auth_svc": a, "oidc_provider": o, "ratio": round(ratio, 2),
    "targets": {"ratio_min": 3.0, "p99_max_ms": 10.0, "ratio_met": ok_ratio, "p99_met": ok_p99},
}
json.dump(out, open(sys.argv[3], "w"), indent=2)
print(f"{'':14} | {'req/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'non-2xx':>7}")
for name, r in (("auth-svc", a), ("oidc-provider", o)):
    print(f"{name:14} | {r['rps']:9.0f} | {r['p50_ms']:7.2f} | {r['p99_ms']:7.2f} | {r['non_2xx'] + r['socket_errors']:7d}")
print(f"ratio auth-svc / oidc-provider: {ratio:.2f}x (target >= 3x: {'met' if ok_ratio else 'NOT met'}); "
      f"auth-svc p99 {a['p99_ms']:.2f} ms (target < 10 ms: {'met' if ok_p99 else 'NOT met'})")
print(f"written: {sys.argv[3]}")
if a["non_2xx"] or a["socket_errors"] or o["non_2xx"] or o["socket_errors"]:
    sys.exit("bench-auth: some requests failed; the figures are not comparable")
PY
