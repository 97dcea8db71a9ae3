#!/usr/bin/env bash
# Interop suite: a third-party gRPC client (Python grpcio, grpcio-health-checking and
# grpcio-reflection from PyPI) must see every secd service SERVING.
#
# Builds secd if needed (SECD_BIN=path tests a prebuilt binary instead), keeps a venv in
# <target>/interop-venv, starts `secd dev` on a fresh data directory with every port 0,
# runs grpc_health_check.py against the seven gRPC addresses from the banner (health,
# reflection v1/v1alpha, audit authentication), then stops secd with SIGTERM and
# requires exit 0 within 10 s.
#
# Without python3/venv/pip, or when the packages cannot be installed, the suite skips
# loudly and exits 0, unless SEC_TEST_INTEROP=required (then it fails).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# Keep a relative CARGO_TARGET_DIR meaning what it meant where we were invoked.
if [[ -n ${CARGO_TARGET_DIR:-} && ${CARGO_TARGET_DIR} != /* ]]; then
  export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi
cd "$root"

CARGO="${CARGO:-cargo}"
REQUIREMENTS=('grpcio>=1.60,<2' 'grpcio-health-checking>=1.60,<2' 'grpcio-reflection>=1.60,<2')
IMPORT_CHECK='import grpc, google.protobuf, grpc_health.v1.health_pb2_grpc, grpc_reflection.v1alpha.reflection_pb2_grpc, grpc_reflection.v1alpha.proto_reflection_descriptor_database; print(grpc.__version__)'
SERVICES=(audit crypto token session auth gdpr assess)
START_TIMEOUT=30 # seconds for the banner to appear
STOP_TIMEOUT=10  # seconds for secd to exit after SIGTERM
CHECK_TIMEOUT=180
PIP_TIMEOUT=600

now_ms() {
  if [[ -n ${EPOCHREALTIME:-} ]]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo $((10#$t / 1000))
  else
    echo $(($(date +%s) * 1000))
  fi
}
secs() { printf '%d.%02d' $(($1 / 1000)) $((($1 % 1000) / 10)); }
t_start=$(now_ms)

die() {
  echo "interop: FAILED: $*" >&2
  exit 1
}

# No usable Python client: a hard failure only when the suite is required.
skip() {
  if [[ ${SEC_TEST_INTEROP:-} == required ]]; then
    die "$* (SEC_TEST_INTEROP=required)"
  fi
  printf '\n*** SKIPPED interop suite: %s; set SEC_TEST_INTEROP=required to make this fatal ***\n\n' "$*" >&2
  exit 0
}

with_timeout() {
  local secs=$1
  shift
  if command -v timeout >/dev/null 2>&1; then
    timeout "$secs" "$@"
  else
    "$@"
  fi
}

# A pid is alive until it exits; a zombie (exited, not yet reaped) counts as gone.
alive() {
  local pid=$1 st
  if [[ -d /proc/$pid ]]; then
    st=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st%% *} != Z ]]
  elif command -v ps >/dev/null 2>&1; then
    st=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
    [[ -n $st && $st != Z* ]]
  else
    kill -0 "$pid" 2>/dev/null
  fi
}

# ---- 1. secd -----------------------------------------------------------------------
target_dir=$("$CARGO" metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p') || true
target_dir=${target_dir:-${CARGO_TARGET_DIR:-$root/target}}

if [[ -n ${SECD_BIN:-} ]]; then
  # A prebuilt binary (CI artifact, release build): test that one, build nothing.
  secd_bin=$SECD_BIN
  [[ -x $secd_bin ]] || die "SECD_BIN=$secd_bin is not an executable"
  echo "interop: using SECD_BIN=$secd_bin (no build)"
else
  echo "interop: building secd (cargo build -q -p secd)"
  "$CARGO" build -q -p secd || die "cargo build -p secd failed"
  secd_bin="$target_dir/debug/secd"
  [[ -x $secd_bin ]] || die "no secd binary at $secd_bin after the build"
fi
t_built=$(now_ms)

# ---- 2. Python client ----------------------------------------------------------------
venv="$target_dir/interop-venv"
py="$venv/bin/python"
command -v python3 >/dev/null 2>&1 || skip "python3 not found"

# Serialize venv setup between concurrent runs (flock is optional).
mkdir -p "$target_dir"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$target_dir/interop-venv.lock"
  flock -w "$PIP_TIMEOUT" 9 || die "timed out waiting for $target_dir/interop-venv.lock"
fi
if ! grpcio_version=$("$py" -c "$IMPORT_CHECK" 2>/dev/null); then
  if ! "$py" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"
    echo "interop: creating $venv"
    if ! venv_log=$(python3 -m venv "$venv" 2>&1); then
      rm -rf "$venv"
      skip "python3 -m venv failed (python3-venv missing?): $(tail -n 1 <<<"$venv_log")"
    fi
    "$py" -m pip --version >/dev/null 2>&1 || {
      rm -rf "$venv"
      skip "the venv has no pip"
    }
  fi
  echo "interop: installing ${REQUIREMENTS[*]}"
  if ! pip_log=$(with_timeout "$PIP_TIMEOUT" "$py" -m pip install -q --disable-pip-version-check \
    "${REQUIREMENTS[@]}" 2>&1); then
    printf '%s\n' "$pip_log" | tail -n 15 >&2
    skip "pip install ${REQUIREMENTS[*]} failed"
  fi
  grpcio_version=$("$py" -c "$IMPORT_CHECK" 2>&1) ||
    skip "the installed packages do not import: $(tail -n 1 <<<"$grpcio_version")"
fi
if command -v flock >/dev/null 2>&1; then exec 9>&-; fi
echo "interop: python client: grpcio $grpcio_version in $venv"
t_venv=$(now_ms)

# ---- 3. start secd -------------------------------------------------------------------
tmp=""
secd_pid=""
check_pid=""
term_sent=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $check_pid ]]; then
    kill -TERM "$check_pid" 2>/dev/null || true
    wait "$check_pid" 2>/dev/null || true
  fi
  if [[ -n $secd_pid ]]; then
    kill -TERM "$secd_pid" 2>/dev/null || true
    local waited=0
    ((term_sent)) && waited=$((STOP_TIMEOUT * 10)) # it already had its chance
    while alive "$secd_pid" && ((waited < STOP_TIMEOUT * 10)); do
      sleep 0.1
      waited=$((waited + 1))
    done
    kill -KILL "$secd_pid" 2>/dev/null || true
    wait "$secd_pid" 2>/dev/null || true
  fi
  if ((rc != 0)) && [[ -n $tmp && -s $tmp/secd.err ]]; then
    echo "---- secd stdout ----" >&2
    cat "$tmp/secd.out" >&2 || true
    echo "---- secd stderr (last 40 lines) ----" >&2
    tail -n 40 "$tmp/secd.err" >&2 || true
  fi
  [[ -z $tmp ]] || rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tmp=$(mktemp -d "${TMPDIR:-/tmp}/sec-interop.XXXXXX")
data="$tmp/data"
mkdir -m 700 "$data"
: >"$tmp/secd.out"

# Hermetic: the embedded default, whatever SEC_* configuration this shell carries
# (a database URL, TLS or a fixed admin token hash would change what is being tested).
env_args=()
while IFS= read -r var; do
  [[ $var == SEC_* ]] && env_args+=(-u "$var")
done < <(compgen -e)
env_args+=(SEC_FACADE__HTTP_ADDR=127.0.0.1:0)
for s in "${SERVICES[@]}"; do
  S=$(tr '[:lower:]' '[:upper:]' <<<"$s")
  env_args+=("SEC_SERVICES__${S}__GRPC_ADDR=127.0.0.1:0" "SEC_SERVICES__${S}__ADMIN_ADDR=127.0.0.1:0")
done

env "${env_args[@]}" "$secd_bin" dev --data-dir "$data" >"$tmp/secd.out" 2>"$tmp/secd.err" &
secd_pid=$!

deadline=$(($(now_ms) + START_TIMEOUT * 1000))
until grep -q '^press Ctrl-C to stop' "$tmp/secd.out"; do
  if ! alive "$secd_pid"; then
    rc=0
    wait "$secd_pid" || rc=$?
    secd_pid=""
    die "secd exited with status $rc before it was ready"
  fi
  (($(now_ms) < deadline)) || die "secd printed no 'press Ctrl-C to stop' within ${START_TIMEOUT}s"
  sleep 0.1
done
t_ready=$(now_ms)

targets=()
for s in "${SERVICES[@]}"; do
  addr=$(awk -v s="$s" '$1 == s && $2 == "grpc" { print $3; exit }' "$tmp/secd.out")
  [[ $addr == *:* && $addr != *:0 ]] || die "no gRPC address for $s in the secd banner"
  targets+=("$s=$addr")
done
token_file="$data/admin.token"
[[ -s $token_file ]] || die "secd wrote no admin token at $token_file"
echo "interop: secd ready in $(secs $((t_ready - t_venv)))s (pid $secd_pid, data $data)"

# ---- 4. the third-party client -------------------------------------------------------
# In the background so a signal to this script interrupts `wait` and cleans up at once.
# (A plain command, not a function: `check_pid` must be timeout/python, not a subshell.)
bound=()
if command -v timeout >/dev/null 2>&1; then bound=(timeout "$CHECK_TIMEOUT"); fi
${bound[@]+"${bound[@]}"} "$py" "$here/grpc_health_check.py" \
  --token-file "$token_file" "${targets[@]}" &
check_pid=$!
rc=0
wait "$check_pid" || rc=$?
check_pid=""
((rc == 0)) || die "the grpcio client rejected secd (exit $rc; see above)"
t_checked=$(now_ms)

# ---- 5. SIGTERM: exit 0, promptly ----------------------------------------------------
t_term=$(now_ms)
term_sent=1
kill -TERM "$secd_pid"
while alive "$secd_pid"; do
  (($(now_ms) - t_term < STOP_TIMEOUT * 1000)) || die "secd still running ${STOP_TIMEOUT}s after SIGTERM"
  sleep 0.05
done
stop_ms=$(($(now_ms) - t_term))
rc=0
wait "$secd_pid" || rc=$?
secd_pid=""
((rc == 0)) || die "secd exited with status $rc after SIGTERM (want 0), after $(secs "$stop_ms")s"
grep -q '^secd stopped cleanly' "$tmp/secd.out" || die "secd exited 0 without 'secd stopped cleanly'"
echo "interop: SIGTERM -> secd exited 0 in $(secs "$stop_ms")s"

t_end=$(now_ms)
echo "interop: timing: build $(secs $((t_built - t_start)))s, venv $(secs $((t_venv - t_built)))s," \
  "start $(secs $((t_ready - t_venv)))s, checks $(secs $((t_checked - t_ready)))s," \
  "stop $(secs "$stop_ms")s, total $(secs $((t_end - t_start)))s"
echo "interop: ${#SERVICES[@]}/${#SERVICES[@]} services SERVING to grpcio $grpcio_version"
