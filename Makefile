# Flotilla: build, test, demo. Every target installs what it needs.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/flotilla/cargo-target
CARGO ?= cargo
TESTENV_BIN := $(CURDIR)/target/testenv/bin

.PHONY: all build testenv tools test unit e2e lint demo demo-stop bench clean

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

clean:
	rm -rf target
