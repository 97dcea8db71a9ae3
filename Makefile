# Every workflow of the project. CI (.ci/run) runs `make lint` and `make test`.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= always
SHELL := bash

.PHONY: dev test lint fmt bench build check-config deny deploy-check help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

dev: ## run the whole platform on the embedded default (data in ./.secdata)
	$(CARGO) run -p secd -- dev

test: ## run every test; backend suites skip loudly (and are listed at the end) unless SEC_TEST_BACKENDS=required
	@mkdir -p target
	set -o pipefail; $(CARGO) test --workspace --all-targets 2>&1 | tee target/test.log
	@# reuse the secd the tests just built (a separate `cargo build` would recompile it)
	@set -o pipefail; SECD_BIN=$${CARGO_TARGET_DIR:-target}/debug/secd tests/interop/run.sh 2>&1 | tee -a target/test.log
	@skipped=$$(grep -h '^\*\*\* SKIPPED' target/test.log | sort -u); \
	if [ -n "$$skipped" ]; then printf '\n%s\n%s\n' "skipped suites (start the servers, or set SEC_TEST_BACKENDS=required):" "$$skipped"; \
	else echo "no suite skipped"; fi

lint: ## formatting check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

bench: ## criterion benches and the end-to-end load run; table + JSON in target/bench/
	scripts/bench.sh

build: ## release binaries
	$(CARGO) build --release -p secd -p secctl

check-config: ## validate the configuration secd would use
	$(CARGO) run -q -p secd -- check-config

deny: ## licenses, duplicate versions, banned crates (needs cargo-deny)
	cargo deny check

deploy-check: ## render and validate deploy/ (schemas, checkov, promtool, PSS, metrics vs secd, runbook CLI)
	scripts/deploy-check.sh
