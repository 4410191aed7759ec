# One entry point per job; everything runs inside .venv at the repo root.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup browser postgres lint test test-fast bench ui

setup: $(VENV)/.installed browser postgres

# The MLflow UI test drives Debian's Chromium (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else \
	    echo "make setup: Debian's chromium is missing for the UI test; run: sudo apt-get install -y chromium" >&2; exit 0; fi; \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

# The shared-servers test starts Debian's PostgreSQL on 127.0.0.1 (a lab's MLflow and Optuna backend).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else \
	    echo "make setup: Debian's postgresql is missing for the shared-servers test; run: sudo apt-get install -y postgresql" >&2; exit 0; fi; \
	  $$SUDO apt-get install -y -q postgresql >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q postgresql >/dev/null; }; }

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# This machine's pip config lists local mirrors that lack most packages; drop pip's notes about them.
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]" 2>&1 | grep -v "is ignored: it is neither a file" ; exit $${PIPESTATUS[0]}
	touch $@

# Pyflakes and pycodestyle errors (settings in pyproject.toml); part of `make test`.
lint: setup
	$(BIN)/ruff check src tests benchmarks pipelines

test: setup lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --timeout=1500 --durations=40

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --timeout=600

bench: setup
	$(BIN)/python benchmarks/run_all.py

UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000

# The MLflow UI for a person, on this machine only unless UI_HOST says otherwise.
ui: setup
	@echo "MLflow UI: http://$(UI_HOST):$(UI_PORT)/#/experiments?workflowType=machine_learning  (Ctrl-C stops it)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts --host $(UI_HOST) --port $(UI_PORT)
