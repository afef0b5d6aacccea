# wmpo developer commands. Everything runs inside .venv, which `make venv` creates from pyproject.toml.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv sim-deps proto lint format test demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create .venv and install wmpo with every extra (editable)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' 2>/dev/null \
	  || { echo "wmpo needs Python 3.11 or 3.12 (found: $(PYTHON)); install python3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) \
	  || { echo "cannot create a virtual environment: install the venv module (Debian: apt-get install python3.11-venv)"; exit 2; }
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25"
	$(BIN)/python -m pip install --quiet --progress-bar off -e ".[all]"
	@touch $(STAMP)

sim-deps:  ## the system libraries MuJoCo's offscreen rendering needs (installs them as root)
	@bash scripts/ensure_render_libs.sh

proto: $(STAMP)  ## regenerate the gRPC stubs from proto/wmpo/v1/*.proto
	$(BIN)/python scripts/gen_proto.py

format: $(STAMP)  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: $(STAMP)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint sim-deps  ## lint, then the whole test suite (starts real Redis, Triton and gRPC servers itself)
	@$(BIN)/python -m wmpo.common.redis_server --check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo:  ## the end-to-end WMPO demo (not built yet)
	@echo "make demo: the end-to-end demo is not built yet (see README, Status); make test runs what exists"; exit 2

clean:  ## remove the venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
