#!/usr/bin/env bash
# `make bench`: criterion micro-benches of sec-common, crypto-svc and sec-edge, then the end-to-end load run
# (sec-load: the whole platform in-process on loopback), then one combined table and
# target/bench/summary.json.
#
# Also session-svc's Redis memory per session (scripts/bench-session-memory.sh, 1M
# sessions into its own scratch redis-server, a few minutes; SESSION_MEMORY_SESSIONS=N
# to change) and the `session_get` sec-load scenario.
#
# Duration: about 3 minutes of measurement (criterion: 3 benches x ~10 s, and the local
# token verifier 12 x 5 s; sec-load: every scenario x (1 s warm-up + 5 s) plus start/stop;
# token_issue and token_validate give token-svc's issue throughput and ValidateToken p99).
# The first run also compiles the
# workspace in release mode, which takes several minutes on a 2-core machine.
#
# Extra sec-load flags via SEC_LOAD_ARGS, e.g. SEC_LOAD_ARGS="--duration-secs 2 --concurrency 8".
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO="${CARGO:-cargo}"
OUT=target/bench
mkdir -p "$OUT"
stamp="$OUT/.bench-start"
touch "$stamp"

echo "== criterion (sec-common, crypto-svc, sec-edge) =="
"$CARGO" bench -p sec-common -p crypto-svc -p sec-edge --benches 2>&1 | tee "$OUT/criterion.log"

echo "== sec-load (end to end, loopback) =="
# shellcheck disable=SC2086 # SEC_LOAD_ARGS is a list of flags
"$CARGO" run --release -q -p sec-load -- --out "$OUT/load.json" ${SEC_LOAD_ARGS:-}

echo "== audit-svc: end-to-end ingest (publisher -> NATS -> PostgreSQL, chain on; 60 s) =="
"$CARGO" bench -p audit-svc --bench ingest 2>&1 | tee "$OUT/audit-ingest.log"

echo "== auth-svc: client_credentials at the facade vs oidc-provider (wrk) =="
if command -v wrk >/dev/null && command -v node >/dev/null; then
  scripts/bench-auth.sh
else
  echo "skipped: wrk or node not found (tests/interop/oidc/ensure-chromium.sh installs wrk)"
fi

echo "== edge protection: facade with the layers on vs off (wrk) =="
if command -v wrk >/dev/null; then
  scripts/bench-edge.sh
else
  echo "skipped: wrk not found (tests/interop/oidc/ensure-chromium.sh installs it)"
fi

echo "== session-svc: Redis memory per session (scratch redis-server) =="
if command -v redis-server >/dev/null; then
  scripts/bench-session-memory.sh "${SESSION_MEMORY_SESSIONS:-1000000}"
else
  echo "skipped: redis-server not found"
  rm -f "$OUT/session-memory.json"
fi

echo "== summary =="
python3 - "$stamp" "$OUT/load.json" "$OUT/summary.json" "$OUT/criterion.log" <<'PY'
import json, os, sys, glob, time
stamp, load_path, out_path, criterion_log = sys.argv[1:5]
since = os.path.getmtime(stamp)
micro = []
for est in sorted(glob.glob("target/criterion/**/new/estimates.json", recursive=True)):
    if os.path.getmtime(est) < since:
        continue  # a bench that did not run this time
    d = os.path.dirname(est)
    try:
        name = json.load(open(os.path.join(d, "benchmark.json")))["full_id"]
    except (OSError, KeyError, ValueError):
        name = os.path.relpath(os.path.dirname(d), "target/criterion")
    micro.append({"bench": name, "median_ns": json.load(open(est))["median"]["point_estimate"]})
load = json.load(open(load_path))
w = max([len(m["bench"]) for m in micro] + [len("criterion bench")])
print(f"{'criterion bench':<{w}} | {'median':>12}")
print(f"{'-' * w}-|-{'-' * 12}")
for m in micro:
    ns = m["median_ns"]
    shown = f"{ns:.1f} ns" if ns < 1e3 else f"{ns / 1e3:.3f} µs" if ns < 1e6 else f"{ns / 1e6:.3f} ms"
    print(f"{m['bench']:<{w}} | {shown:>12}")
print()
# The local token verifier beside bare aws-lc-rs verification of the same token (target >= 85%).
medians = {m["bench"]: m["median_ns"] for m in micro}
ratios = []
for name, bare in sorted(medians.items()):
    if name.startswith("verifier/") and name.endswith("/bare_aws_lc_rs"):
        group = name[: -len("/bare_aws_lc_rs")]
        local = medians.get(group + "/local_verify")
        if local:
            ratios.append({"alg": group.split("/", 1)[1], "bare_ns": bare, "local_ns": local, "ratio": bare / local})
if ratios:
    print(f"{'local verifier':<14} | {'bare (µs)':>9} | {'verify (µs)':>11} | {'rate vs bare':>12}")
    print(f"{'-' * 14}-|-{'-' * 9}-|-{'-' * 11}-|-{'-' * 12}")
    for r in ratios:
        flag = "" if r["ratio"] >= 0.85 else "  (below the 85% target)"
        print(f"{r['alg']:<14} | {r['bare_ns'] / 1e3:>9.2f} | {r['local_ns'] / 1e3:>11.2f} | {r['ratio'] * 100:>11.1f}%{flag}")
    # The same ratio from alternating blocks (robust to load changing between benches).
    for line in open(criterion_log, encoding="utf-8", errors="replace"):
        if "/paired:" in line:
            print(line.rstrip())
    print()
rs = load["results"]
w = max([len(r["scenario"]) for r in rs] + [len("scenario")])
print(f"{'scenario':<{w}} | {'throughput (ops/s)':>18} | {'p50 (ms)':>9} | {'p99 (ms)':>9} | {'errors':>6}")
print(f"{'-' * w}-|-{'-' * 18}-|-{'-' * 9}-|-{'-' * 9}-|-{'-' * 6}")
for r in rs:
    print(f"{r['scenario']:<{w}} | {r['throughput_ops_s']:>18.0f} | {r['p50_ms']:>9.3f} | {r['p99_ms']:>9.3f} | {r['errors']:>6}")
session_memory = None
if os.path.exists("target/bench/session-memory.json") and os.path.getmtime("target/bench/session-memory.json") >= since:
    session_memory = json.load(open("target/bench/session-memory.json"))
    print(f"\nsession-svc Redis memory: {session_memory['bytes_per_session']:.1f} bytes/session "
          f"({session_memory['sessions']} sessions, target < 600)")
summary = {
    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "criterion": micro,
    "verifier_vs_bare": ratios,
    "load": load,
    "session_memory": session_memory,
}
with open(out_path, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print(f"\nwrote {out_path} ({load['environment']['nproc']} cpus, {load['environment']['profile']} build)")
PY
rm -f "$stamp"
