# Loyalty platform: one entry point for setup, infrastructure, services, checks and benchmarks.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Python 3.12, the project's one interpreter: the first of these that runs and is 3.12 (pyenv's shim fails
# without a PYENV_VERSION that names it, so its versions are tried directly too); PYTHON=... overrides.
PYTHON ?= $(shell for p in python3.12 "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
            /usr/local/bin/python3.12 /usr/bin/python3.12 python3; do \
            "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
LOCAL := .local
RUN_DIR := $(LOCAL)/run
SERVICES := ledger rules metrics
# service:port pairs; the ports are the services' defaults (LEDGER_HTTP_PORT etc. override them)
SERVICE_PORTS := ledger:$${LEDGER_HTTP_PORT:-8001} rules:$${RULES_HTTP_PORT:-8002} metrics:$${METRICS_HTTP_PORT:-8003}
PYTEST_ARGS ?=

.PHONY: help setup prometheus kafka-jars kafka-up kafka-down db-up db-down db-migrate topics infra up down run test test-fast \
        lint fmt typecheck schemas check-schemas bench bench-ledger bench-rules bench-metrics bench-segments bench-clv clean native chaos

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it or run make PYTHON=/path/to/python3.12"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || \
	  { echo "$(VENV) runs Python $$($(PY) -c 'import platform; print(platform.python_version())'), not 3.12: remove it (rm -rf $(VENV)) and run make again"; exit 1; }
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

setup: $(VENV)/.installed kafka-jars native prometheus ## Create .venv, install the pinned dependencies, fetch the Kafka jars, Prometheus

# The modules pyproject.toml lists under [tool.loyalty] mypyc (the rules engine, the consumer's per-event batch
# code, the state rows) compiled by mypyc into .local/native, with a manifest of the sources they were built
# from: ~40 % less CPU per evaluated event. Python uses them only while the manifest matches the sources
# (shared/native.py); after an edit the code runs interpreted, with a warning, until the next `make native`.
# LOYALTY_NATIVE=1 (run, test, bench) refuses to run interpreted. The build is skipped when the sources did not change.
NATIVE := LOYALTY_NATIVE=1
native: $(VENV)/.installed ## Compile the modules listed for mypyc into .local/native (part of setup; again on change)
	@mkdir -p $(LOCAL)
	@rm -f services/rules/rules/*.build  # the stamps of the per-file build this replaced
	@$(PY) -m shared.native > $(LOCAL)/mypyc.log 2>&1 || { cat $(LOCAL)/mypyc.log; exit 1; }
	@tail -n 1 $(LOCAL)/mypyc.log

# tests/e2e/test_dashboards.py runs a Prometheus of its own on a free loopback port and checks /metrics with
# promtool; the package's system daemon (on :9090) is not used, so it is stopped and disabled right after install.
prometheus: ## Install Debian's prometheus package (prometheus, promtool) when missing
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
	  :; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "prometheus/promtool missing and not root: run 'sudo apt-get install -y prometheus' (the dashboard test needs them)"; \
	else \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null && \
	  if [ -d /run/systemd/system ]; then systemctl disable --now prometheus; else service prometheus stop >/dev/null 2>&1 || true; fi; \
	fi

kafka-jars: ## Resolve the Apache Kafka broker classpath from Maven Central
	@deploy/kafka/kafka.sh jars

kafka-up: $(VENV)/.installed ## Start the local Kafka broker (KRaft); reuse it when running
	@deploy/kafka/kafka.sh up

kafka-down: ## Stop the local Kafka broker
	@deploy/kafka/kafka.sh down

db-up: ## Start PostgreSQL 15 when it is down; create the role and databases
	@deploy/postgres/db-up.sh

db-down: ## Stop the local PostgreSQL cluster
	pg_ctlcluster 15 main stop || true

db-migrate: $(VENV)/.installed db-up ## Apply every service's alembic migrations
	$(BIN)/loyalty migrate

topics: kafka-up ## Create the platform's topics (idempotent)
	$(BIN)/loyalty topics

infra: kafka-up db-up ## Kafka and PostgreSQL up

up: native infra db-migrate topics ## Infrastructure, migrations and the three services in the background
	@mkdir -p $(RUN_DIR)
	@for s in $(SERVICES); do \
	  if [ -f $(RUN_DIR)/$$s.pid ] && kill -0 $$(cat $(RUN_DIR)/$$s.pid) 2>/dev/null; then \
	    echo "$$s: already running (pid $$(cat $(RUN_DIR)/$$s.pid))"; \
	  else \
	    $(NATIVE) setsid nohup $(PY) -m $$s > $(RUN_DIR)/$$s.log 2>&1 < /dev/null & echo $$! > $(RUN_DIR)/$$s.pid; \
	    echo "$$s: started (pid $$!, log $(RUN_DIR)/$$s.log)"; \
	  fi; \
	done
	@for pair in $(SERVICE_PORTS); do \
	  s=$${pair%%:*}; port=$${pair##*:}; \
	  for i in $$(seq 1 60); do \
	    if curl -fs http://127.0.0.1:$$port/readyz >/dev/null; then echo "$$s: ready on http://127.0.0.1:$$port"; break; fi; \
	    if ! kill -0 $$(cat $(RUN_DIR)/$$s.pid) 2>/dev/null; then echo "$$s: exited; see $(RUN_DIR)/$$s.log"; tail -n 20 $(RUN_DIR)/$$s.log; exit 1; fi; \
	    sleep 1; \
	    if [ $$i = 60 ]; then echo "$$s: not ready after 60 s"; exit 1; fi; \
	  done; \
	done

down: ## Stop the services and the Kafka broker (PostgreSQL stays up: make db-down)
	@for s in $(SERVICES); do \
	  if [ -f $(RUN_DIR)/$$s.pid ]; then kill $$(cat $(RUN_DIR)/$$s.pid) 2>/dev/null && echo "$$s: stopped"; rm -f $(RUN_DIR)/$$s.pid; fi; \
	done
	@deploy/kafka/kafka.sh down

run: up ## Everything up, sample events in, then stay in the foreground (Ctrl-C stops it all)
	@scripts/run-demo.sh

test: setup infra ## The whole suite against the real Kafka and PostgreSQL (started when down)
	$(NATIVE) $(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed ## Tests that need neither Kafka nor PostgreSQL
	$(BIN)/pytest -m "not kafka and not db and not disruptive" $(PYTEST_ARGS)

lint: $(VENV)/.installed ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(VENV)/.installed ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV)/.installed ## mypy (strict) over shared, services, ops and tests
	$(BIN)/mypy shared services/ledger/ledger services/rules/rules services/metrics/metrics ops tests

# Its own broker (port 19092, .local/chaos/kafka) and PostgreSQL cluster (15/chaos, port 5433), so restarting
# them disturbs no one; both are stopped at the end. CHAOS_ARGS: --seed, --rate, --duration, --keep (tests/chaos/chaos.py).
CHAOS_ARGS ?=
chaos: $(VENV)/.installed kafka-jars native ## Kill -9 each service, restart Kafka and PostgreSQL under a stream of events; reconcile every point
	$(PY) -m tests.chaos.chaos $(CHAOS_ARGS)

bench: bench-ledger bench-rules bench-metrics bench-segments bench-clv ## Every benchmark (prints figures)

# The ledger and metrics benchmarks run on databases of their own, dropped and created afresh each run, so their
# figures do not depend on what earlier runs left (on a dev database grown by a dozen runs the metrics ingestion
# fell from ~10,500 to ~6,000 events/s). BENCH_PG: the server's URL without a database.
BENCH_PG ?= postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432
fresh-db = LOYALTY_PG_TUNE=0 LOYALTY_DB_FRESH=1 LOYALTY_DATABASES=$(1) deploy/postgres/db-up.sh

bench-ledger: setup infra ## Ledger benchmark: earn entries/s from Kafka, redeem p50/p99, balance reads/s, rewards
	$(call fresh-db,loyalty_ledger_bench)
	LEDGER_DATABASE_URL=$(BENCH_PG)/loyalty_ledger_bench $(NATIVE) $(PY) bench/ledger_bench.py

bench-rules: setup infra db-migrate ## Rules benchmark: in-process events/s per core, consume→produce events/s
	$(NATIVE) $(PY) bench/rules_bench.py

bench-segments: setup infra db-migrate ## Segments benchmark: classification of 50,000 customers, customer list p95
	$(NATIVE) $(PY) bench/segments_bench.py

bench-metrics: setup infra ## Metrics benchmark: ingestion events/s through Kafka, KPI query p95 on 1M purchases, RSS
	$(call fresh-db,loyalty_metrics_bench)
	METRICS_DATABASE_URL=$(BENCH_PG)/loyalty_metrics_bench $(PY) bench/metrics_bench.py

bench-clv: setup infra db-migrate ## CLV benchmark: fit time and peak RSS for 50,000 customers (1,000,000 orders)
	$(PY) bench/clv_bench.py

schemas: $(VENV)/.installed ## Re-export the event JSON Schemas into shared/schemas
	$(PY) -m shared.schema_export

check-schemas: $(VENV)/.installed ## Fail when a checked-in JSON Schema differs from its model
	$(PY) -m shared.schema_export --check

clean: down ## Stop everything and remove local state (Kafka data, logs)
	rm -rf $(LOCAL)/kafka/data $(LOCAL)/kafka/logs $(RUN_DIR)
