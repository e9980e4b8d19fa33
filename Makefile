# The commands the README shows. Everything installs into .venv from the project's own files.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, from the exact release (a CUDA build that also runs on the CPU).
TORCH  := $(shell grep -v '^\#' deploy/images/constraints.txt)
# `make images`: the base image, and the tags of the two images built.
BASE_IMAGE   ?= python:3.11-slim
API_IMAGE    ?= gemmaq-api:latest
WORKER_IMAGE ?= gemmaq-worker:latest

.PHONY: install dev test test-unit lint clean test-tools images

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,worker]'
	touch $@

install: $(VENV)/.installed

## dev: install, then run everything on this machine (embedded PostgreSQL + Redis unless GEMMAQ_* URLs are set)
dev: install
	$(BIN)/gemmaq dev

# The speech tests synthesise their input with espeak-ng (Debian/Ubuntu: apt-get install espeak-ng).
test-tools:
	@command -v espeak-ng >/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng >/dev/null; \
	  else echo "install espeak-ng for the speech tests" >&2; exit 1; fi; }

## test: install, then run the test suite against real PostgreSQL, Redis and model weights
## (it ends with the 30 slowest tests, so that a slow run shows where its time went)
test: install test-tools
	$(BIN)/pytest --durations=30

## images: both images built with the network off, from a wheelhouse of every wheel they need
## (deploy/images/wheelhouse.sh; where no registry answers, BASE_IMAGE=gemmaq-standin/python:3.11
## after deploy/images/standins.sh). The classic builder: no BuildKit or buildx needed.
images:
	deploy/images/wheelhouse.sh
	DOCKER_BUILDKIT=0 docker build --quiet --network none -f deploy/images/wheelhouse.Dockerfile \
	  -t gemmaq-wheelhouse:latest build/wheelhouse >/dev/null
	for target in api worker; do \
	  tag=$$( [ $$target = api ] && echo $(API_IMAGE) || echo $(WORKER_IMAGE) ); \
	  DOCKER_BUILDKIT=0 docker build --quiet --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	    --build-arg WHEELHOUSE_IMAGE=gemmaq-wheelhouse:latest --build-arg WHEELHOUSE_ONLY=1 \
	    --target $$target -t $$tag . >/dev/null || exit 1; \
	  echo "$$tag: $$(docker image inspect -f '{{.Size}}' $$tag | awk '{printf "%.2f GB", $$1/1e9}')"; \
	done

## test-unit: the unit tier only (no stack, no model weights): well under a minute
test-unit: install
	$(BIN)/pytest -m unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
