# wmpo developer commands. Everything runs inside .venv, which `make venv` creates from pyproject.toml.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv sim-deps proto lint format test demo images clean

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

DEMO_ARGS ?=

demo: $(STAMP) sim-deps  ## WMPO end to end on the local stack -> demo-report/index.html (DEMO_ARGS=--quick: ~3 min)
	$(BIN)/wmpo demo $(DEMO_ARGS)

# Container images from deploy/Dockerfile (a target per service). VARIANT=cuda takes torch from the CUDA index
# and tags the images <tag>-cuda. Needs a Docker engine with BuildKit; tests/test_deploy.py reads `make -n images`.
IMAGE_SERVICES := policy worldmodel trainer
IMAGE_TAG ?= dev
VARIANT ?= cpu
CPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CUDA_TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
IMAGE_SUFFIX = $(if $(filter cuda,$(VARIANT)),-cuda,)
TORCH_INDEX = $(if $(filter cuda,$(VARIANT)),$(CUDA_TORCH_INDEX),$(CPU_TORCH_INDEX))

images:  ## build the service images with Docker (VARIANT=cpu|cuda, IMAGE_TAG=dev; see deploy/README.md)
	@case "$(VARIANT)" in cpu|cuda) ;; *) echo "make images: VARIANT must be cpu or cuda, got '$(VARIANT)'"; exit 2;; esac
	@command -v docker >/dev/null 2>&1 \
	  || { echo "make images: needs Docker (docker build with BuildKit); no docker client is installed here"; exit 2; }
	@docker info >/dev/null 2>&1 \
	  || { echo "make images: the docker client cannot reach a Docker engine (docker info failed); start one or build elsewhere"; exit 2; }
	$(foreach s,$(IMAGE_SERVICES),DOCKER_BUILDKIT=1 docker build --file deploy/Dockerfile --target $(s) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX) --tag wmpo-$(s):$(IMAGE_TAG)$(IMAGE_SUFFIX) . &&) true

clean:  ## remove the venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
