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

.PHONY: help install study test test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install workbench with its dev tools (once; a stamp file marks it)

# torch/torchvision pinned for this machine: pip takes both from its local cache (a CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'torch==2.14.1' 'torchvision==0.29.1'
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

study: install ## run a study: make study [STUDY=studies/x.toml] [DATA=path] [TRIALS=n] [WORKERS=n]
	$(BIN)/workbench study $(STUDY) $(ARGS)

test: install ## the test suite without the slow end-to-end runs (< 15 min here)
	$(BIN)/pytest -m "not slow" -q

test-all: install ## every test, slow end-to-end runs included
	$(BIN)/pytest -q

lint: install ## ruff, formatting, mypy and the import DAG (import-linter)
	$(BIN)/ruff check workbench tests
	$(BIN)/ruff format --check workbench tests
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix workbench tests
	$(BIN)/ruff format workbench tests

clean: ## remove results of studies (runs/) and reports; keeps .venv
	rm -rf runs reports/*.html reports/bench
