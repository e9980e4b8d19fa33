# The commands the README shows. Everything installs into .venv from the project's own files.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, from the exact release (a CUDA build that also runs on the CPU).
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install dev test test-unit lint clean test-tools

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
test: install test-tools
	$(BIN)/pytest

## test-unit: the unit tier only (no stack, no model weights): well under a minute
test-unit: install
	$(BIN)/pytest -m unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
