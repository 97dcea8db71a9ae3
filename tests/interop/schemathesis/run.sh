#!/usr/bin/env bash
# schemathesis (PyPI) against a running facade's /openapi.json: every generated request
# (positive and negative) must get an answer that is not a server error (5xx).
#
#   tests/interop/schemathesis/run.sh http://127.0.0.1:8080
#
# Starts nothing itself: the caller runs the platform (the Rust test
# `auth_meta::schemathesis_finds_no_server_errors` does). Installs schemathesis into a
# venv under the target directory ($SEC_TARGET_DIR, else $CARGO_TARGET_DIR, else
# ./target) on first use.
#
# Bounded: SCHEMATHESIS_MAX_EXAMPLES cases per operation (default 30), and a hard limit
# of SCHEMATHESIS_TIME_LIMIT seconds (default 300) after which the run is killed and
# fails. (Not schemathesis' --max-time: that makes fuzzing repeat until it is spent.)
#
# Exit: 0 no server error; 3 schemathesis could not be installed; else failures found
# (or the run did not finish).
set -uo pipefail

base=${1:?usage: run.sh BASE_URL}
base=${base%/}
target=${SEC_TARGET_DIR:-${CARGO_TARGET_DIR:-target}}
venv="$target/schemathesis-venv"
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-30}
time_limit=${SCHEMATHESIS_TIME_LIMIT:-300}

if [ ! -x "$venv/bin/st" ]; then
  echo "installing schemathesis into $venv" >&2
  python3 -m venv "$venv" >&2 || exit 3
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.3,<5' >&2 || {
    rm -rf "$venv"
    exit 3
  }
fi

timeout --kill-after=10 "$time_limit" "$venv/bin/st" run "$base/openapi.json" \
  --url "$base" \
  --checks not_a_server_error \
  --max-examples "$max_examples" \
  --request-timeout 10 \
  --workers 1 \
  --phases examples,coverage,fuzzing \
  --no-shrink \
  --seed 17 \
  --suppress-health-check all \
  --wait-for-schema 30
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "schemathesis did not finish within $time_limit s" >&2
fi
exit "$status"
