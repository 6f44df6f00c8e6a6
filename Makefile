# Two commands on a fresh machine: `make demo` (install, then start the router with its embedded
# demo) and `make test` (install with the dev extra, check the import layering, then run the whole suite).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test lint install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/mvllm run

# lint-imports checks pyproject's [tool.importlinter] contracts: a broken layer fails the build.
test: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mvllm tests benchmarks
