#!/usr/bin/env bash
# `make bench`: criterion micro-benches of sec-common, crypto-svc and sec-edge, then the end-to-end load run
# (sec-load: the whole platform in-process on loopback), then one combined table and
# target/bench/summary.json.
#
# Duration: about 1 minute of measurement (criterion: 3 benches x ~10 s; sec-load:
# 2 scenarios x (1 s warm-up + 5 s) plus start/stop). The first run also compiles the
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
"$CARGO" bench -p sec-common -p crypto-svc -p sec-edge --benches

echo "== sec-load (end to end, loopback) =="
# shellcheck disable=SC2086 # SEC_LOAD_ARGS is a list of flags
"$CARGO" run --release -q -p sec-load -- --out "$OUT/load.json" ${SEC_LOAD_ARGS:-}

echo "== summary =="
python3 - "$stamp" "$OUT/load.json" "$OUT/summary.json" <<'PY'
import json, os, sys, glob, time
stamp, load_path, out_path = sys.argv[1:4]
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
rs = load["results"]
w = max([len(r["scenario"]) for r in rs] + [len("scenario")])
print(f"{'scenario':<{w}} | {'throughput (ops/s)':>18} | {'p50 (ms)':>9} | {'p99 (ms)':>9} | {'errors':>6}")
print(f"{'-' * w}-|-{'-' * 18}-|-{'-' * 9}-|-{'-' * 9}-|-{'-' * 6}")
for r in rs:
    print(f"{r['scenario']:<{w}} | {r['throughput_ops_s']:>18.0f} | {r['p50_ms']:>9.3f} | {r['p99_ms']:>9.3f} | {r['errors']:>6}")
summary = {
    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "criterion": micro,
    "load": load,
}
with open(out_path, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print(f"\nwrote {out_path} ({load['environment']['nproc']} cpus, {load['environment']['profile']} build)")
PY
rm -f "$stamp"
