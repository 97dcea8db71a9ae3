#!/usr/bin/env bash
# Redis memory per session: starts a scratch redis-server on a free port (never the
# shared one), writes N sessions (default 1,000,000, 2 per user) through session-svc's
# Redis store, and prints used_memory before/after and bytes per session as JSON
# (also to target/bench/session-memory.json).
#
# Usage: scripts/bench-session-memory.sh [sessions] [sessions-per-user]
# A debug build is fine: the writes are pipelined (64 in flight) and Redis does the work.
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO="${CARGO:-cargo}"
N="${1:-1000000}"
PER_USER="${2:-2}"
OUT=target/bench
mkdir -p "$OUT"
command -v redis-server >/dev/null || { echo "bench-session-memory: redis-server not found" >&2; exit 1; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done

"$CARGO" run -q -p session-svc --example session_memory -- "redis://127.0.0.1:$port" "$N" "$PER_USER" | tee "$OUT/session-memory.json"
