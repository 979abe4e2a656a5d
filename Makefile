# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AZURITE_VERSION := 3.37.0
AZURITE := .cache/azurite/installed-$(AZURITE_VERSION)

.PHONY: demo test lint bench bench-quick azurite clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Azure Blob on loopback for the tests and benchmarks (npm; measured ~25 s, ~360 MB).
$(AZURITE):
	npm install --prefix .cache/azurite --no-save --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)
	touch $(AZURITE)

azurite: $(AZURITE)

demo: $(STAMP)  ## the sample pipeline on the embedded default (emulator + ./falflow-archive + ephemeral Prefect)
	$(BIN)/falflow run sample

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint $(AZURITE)  ## lint, type-check, then the whole test suite
	$(BIN)/pytest

bench: $(STAMP) $(AZURITE)
	$(BIN)/python -m bench

bench-quick: $(STAMP) $(AZURITE)
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .cache falflow-archive .pytest_cache .mypy_cache .ruff_cache
