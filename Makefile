# Flotilla: build, test, demo. Every target installs what it needs.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/flotilla/cargo-target
CARGO ?= cargo
TESTENV_BIN := $(CURDIR)/target/testenv/bin

.PHONY: all build testenv tools test unit e2e lint torture fuzz demo demo-stop bench bench-build bench-hub bench-fleet bench-reconnect bench-wire bench-agent bench-large bench-git bench-planner bench-ui bench-report bench-compare clean

all: build

## build: the hub, the agent and the CLI (debug)
build:
	$(CARGO) build --workspace --bins

## testenv: the Kubernetes test control plane, kubectl, helm and kustomize, built from Go modules (cached)
testenv:
	bash scripts/install-deps.sh
	bash tests/testenv/build.sh
	bash tests/testenv/build-tools.sh

## test: lint, unit and component tests, then end-to-end tests on real clusters
test: testenv build lint
	FLOTILLA_TESTENV_BIN=$(TESTENV_BIN) FLOTILLA_BIN_DIR=$(CARGO_TARGET_DIR)/debug FLOTILLA_REQUIRE_E2E=1 \
		$(CARGO) test --workspace -- --test-threads=2

## torture: kill -9, partitions and a failing API server at full scale (~30-45 min on 2 cores), then RELIABILITY.md
torture: testenv build
	FLOTILLA_TESTENV_BIN=$(TESTENV_BIN) FLOTILLA_BIN_DIR=$(CARGO_TARGET_DIR)/debug CARGO="$(CARGO)" bash scripts/torture.sh

## fuzz: the property-based fuzz targets with many cases (FLOTILLA_FUZZ_CASES, default 20000)
FLOTILLA_FUZZ_CASES ?= 20000
fuzz:
	FLOTILLA_FUZZ_CASES=$(FLOTILLA_FUZZ_CASES) $(CARGO) test -p flotilla-shared -p flotilla-proto -p flotilla-agent --test fuzz
	FLOTILLA_FUZZ_CASES=$(FLOTILLA_FUZZ_CASES) $(CARGO) test -p flotilla-hub --lib gateway::fuzz

unit:
	$(CARGO) test --workspace --lib --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## demo: hub, two test clusters, two agents and a local Git repo, end to end
demo: testenv build
	FLOTILLA_TESTENV_BIN=$(TESTENV_BIN) FLOTILLA_BIN_DIR=$(CARGO_TARGET_DIR)/debug bash deploy/demo/demo.sh

demo-stop:
	bash deploy/demo/demo.sh stop

## bench: every benchmark part (release builds), then BENCHMARKS.md; each part also runs alone
BENCH := $(CARGO_TARGET_DIR)/release/flotilla-bench
# Simulated agents each hold a connection: raise the open-file limit to the hard limit.
BENCH_RUN := ulimit -n $$(ulimit -Hn) && FLOTILLA_BENCH_BIN_DIR=$(CARGO_TARGET_DIR)/release FLOTILLA_TESTENV_BIN=$(TESTENV_BIN) $(BENCH)

bench: bench-hub bench-fleet bench-reconnect bench-wire bench-agent bench-large bench-git bench-planner bench-ui bench-report

bench-build:
	$(CARGO) build --release -p flotilla-hub -p flotilla-agent -p flotilla-bench --bins

## bench-hub: hub capacity and commit-to-fleet latency with 100 to 10,000 simulated agents (FLOTILLA_BENCH_AGENTS=100,1000)
bench-hub: bench-build
	$(BENCH_RUN) hub
	$(BENCH_RUN) report

## bench-fleet: commit to fleet by push webhook (source polled hourly) with 1,000 and 10,000 simulated agents (FLOTILLA_BENCH_AGENTS=1000)
bench-fleet: bench-build
	$(BENCH_RUN) fleet
	$(BENCH_RUN) report

## bench-reconnect: mass reconnect of 10,000 simulated agents after a hub kill -9 (FLOTILLA_BENCH_AGENTS=1000)
bench-reconnect: bench-build
	$(BENCH_RUN) reconnect
	$(BENCH_RUN) report

## bench-wire: bytes the hub sends an agent for a one-line change in a bundle of 500 objects
bench-wire: bench-build
	$(BENCH_RUN) wire
	$(BENCH_RUN) report

## bench-agent: a release agent on a test cluster: first apply of 1,000 objects vs kubectl, idle RSS and CPU
bench-agent: bench-build testenv
	$(BENCH_RUN) agent
	$(BENCH_RUN) report

## bench-large: one bundle of 5,000 ConfigMaps and 50 MiB from a commit to Ready on a test cluster, hub and agent peak memory
bench-large: bench-build testenv
	$(BENCH_RUN) large
	$(BENCH_RUN) report

## bench-git: fetch + render of 200 bundle directories, cold and incremental, vs git clone / fetch
bench-git: bench-build
	$(BENCH_RUN) git
	$(BENCH_RUN) report

## bench-compare: BASE=<rev> [NEW=<rev>]: both builds side by side, alternating, in one session (compare block of BENCHMARKS.md)
bench-compare: testenv
	FLOTILLA_TESTENV_BIN=$(TESTENV_BIN) CARGO="$(CARGO)" bash scripts/bench-compare.sh $(BASE) $(NEW)

## bench-planner: the rollout planner's time per step at 1,000 and 10,000 clusters in 10 partitions (FLOTILLA_BENCH_CLUSTERS=1000)
bench-planner: bench-build
	$(BENCH_RUN) planner
	$(BENCH_RUN) report

## bench-ui: the web UI's overview and matrix pages and /metrics at 10,000 clusters × 50 bundles, in process (FLOTILLA_BENCH_UI_CLUSTERS=1000)
bench-ui: bench-build
	$(BENCH_RUN) ui
	$(BENCH_RUN) report

bench-report: bench-build
	$(BENCH_RUN) report

clean:
	rm -rf target
