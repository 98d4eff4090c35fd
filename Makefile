# Accessline's single entry point. `make up` runs the system; `make check` runs every
# check and test (what CI runs). Both set up what they need on a fresh machine.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf

.DEFAULT_GOAL := help
.PHONY: help setup console gen client gen-check lint typecheck buflint test-deps test check up demo bench clean

help:
	@echo "make up        set up and run etcd + the five services on this machine"
	@echo "               (make up SIP=1: with the SIP edge, Kamailio on UDP 5060)"
	@echo "make check     set up and run every check and test (what CI runs)"
	@echo "make demo      play the whole flow against a running \`make up\`"
	@echo "make gen       regenerate gen/ from protos/"
	@echo "make client    build accessline-api, the slim client package, into dist/"
	@echo "make console   build the agent console Presence serves at /console/"
	@echo "make test      run the tests only"
	@echo "make bench     run the benchmarks in bench/"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	# `npm install` (not `npm ci`): the lock pins buf exactly but lists only the
	# platform binaries the registry offered when it was written.
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# The agent console Presence serves at /console/ (TypeScript, bundled by esbuild).
CONSOLE := accessline_server/presence/console/index.html
$(CONSOLE): node_modules/.installed console/build.mjs console/index.html console/console.css \
		$(shell find console/src -name '*.ts')
	node console/build.mjs

console: node_modules/.installed
	node console/build.mjs

setup: $(BIN)/.installed node_modules/.installed $(CONSOLE)

gen: setup
	$(BIN)/python tools/gen_protos.py

# The slim client distribution (accessline-api): the generated stubs alone, in dist/.
client: setup
	$(BIN)/python tools/build_client.py

gen-check: setup
	$(BIN)/python tools/gen_protos.py --check

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy
	node_modules/.bin/tsc -p console

buflint: setup
	$(BUF) lint

test-deps:
	tools/ensure-test-deps.sh

test: setup test-deps
	$(BIN)/pytest

check: lint typecheck buflint gen-check test

bench: setup
	$(BIN)/python -m bench.store_bench
	$(BIN)/python -m bench.reservation_bench
	$(BIN)/python -m bench.match_bench
	$(BIN)/python -m bench.security_bench
	$(BIN)/python -m bench.tracing_bench
	$(BIN)/python -m bench.presence_bench
	$(BIN)/python -m bench.notification_bench
	$(BIN)/python -m bench.routing_bench
	$(BIN)/python -m bench.e2e_bench
	$(BIN)/python -m bench.sip_bench
	$(BIN)/python -m bench.journey_bench

# `make up SIP=1` also runs the SIP edge (Kamailio on UDP 5060 and the SIP adapter).
up: setup
	$(BIN)/accessline up $(if $(SIP),--sip)

demo: setup
	$(BIN)/accessline demo

clean:
	rm -rf $(VENV) node_modules .accessline .pytest_cache .mypy_cache .ruff_cache
