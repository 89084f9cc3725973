# workbench: `make study` and `make test` do all set-up on a fresh machine. `make help` lists targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDY ?= studies/digits.toml
DATA ?=
TRIALS ?=
WORKERS ?=
ARGS := $(if $(DATA),--data $(DATA)) $(if $(TRIALS),--trials $(TRIALS)) $(if $(WORKERS),--workers $(WORKERS))
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: help install system-deps study check ensemble report ui dashboard test test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install workbench with its dev tools (once; a stamp file marks it)

# torch/torchvision pinned for this machine: pip takes both from its local cache (a CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'torch==2.14.1' 'torchvision==0.29.1'
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Debian's chromium renders the HTML report in the browser test; a private PostgreSQL server
# backs the storage tests (installed as root, as on CI, or with sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps: ## Debian packages the tests use: chromium (report rendering), postgresql (storage tests)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

study: install ## run a study: make study [STUDY=studies/x.toml] [DATA=path] [TRIALS=n] [WORKERS=n] [BUDGET=10m]
	$(BIN)/workbench study $(STUDY) $(ARGS) $(if $(BUDGET),--budget $(BUDGET))

check: install ## check STUDY's machine, storage, tracking and data, and print its plan; no training
	$(BIN)/workbench check $(STUDY) $(ARGS)

ensemble: install ## rerun only the ensemble stage on the stored studies of STUDY
	$(BIN)/workbench ensemble $(STUDY) $(if $(DATA),--data $(DATA))

report: install ## rewrite reports/<study>.html from the stored results of STUDY
	$(BIN)/workbench report $(STUDY) $(if $(DATA),--data $(DATA))

UI_PORT ?= 5000
ui: install ## the MLflow UI on the default store (runs/mlflow), at http://127.0.0.1:5000
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT) (a study's own page, on its runs: the 'MLflow:' line make study printed)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --host 127.0.0.1 \
		--port $(UI_PORT) --workers 1 --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow/mlflow.db \
		--default-artifact-root file://$(CURDIR)/runs/mlflow/artifacts --no-serve-artifacts

DASHBOARD_PORT ?= 8080
dashboard: install ## optuna-dashboard on STUDY's storage (SQLite, or its PostgreSQL URL) at http://127.0.0.1:8080
	$(BIN)/workbench dashboard $(STUDY) --port $(DASHBOARD_PORT)

test: install system-deps ## the test suite without the slow end-to-end runs (< 15 min here)
	$(BIN)/pytest -m "not slow" -q

test-all: install system-deps ## every test, slow end-to-end runs included
	$(BIN)/pytest -q

lint: install ## ruff, formatting, mypy and the import DAG (import-linter)
	$(BIN)/ruff check workbench tests bench
	$(BIN)/ruff format --check workbench tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix workbench tests bench
	$(BIN)/ruff format workbench tests bench

BENCH_ARGS ?=
bench: install ## workbench beside its floors (~10 min, quiet machine): reports/bench/; BENCH_ARGS=--quick|--full|--profile
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean: ## remove results of studies (runs/) and reports; keeps .venv
	rm -rf runs reports/*.html reports/bench
